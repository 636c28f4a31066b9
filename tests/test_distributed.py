"""Sharded E and U under torch.distributed (gloo on CPU) against one process on the whole batch.

One spawn per world size (2 and 3 ranks) runs every check (`rank_results`) and pickles its
results; the parent compares them with the single-process functions on the unsharded
batches. Shards (np.array_split) of E = 5 prompts, E[:2] and U = 4 prompts:
2 ranks: E 3|2, E[:2] 1|1, U 2|2;  3 ranks: E 2|2|1, E[:2] 1|1|0 (an empty rank), U 2|1|1.
Float64 model: ≤ 1e-10 relative; fp32: ≤ 1e-5. Plus `torchrun -m functional_probe run`.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import time
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import error_of, proj_rel_err, random_direction, random_rollouts

import functional_probe as fp
from functional_probe.grads import dot
from functional_probe.rollouts import Rollouts

ETA = 2e-3
KEYS = ("bars_dot", "delta_h1", "V_X", "V_Y", "C_XY", "se", "se_conditional")
SPAWN_TIMEOUT = 400.0


# --------------------------------------------------------------------- shared setting


def setting(dtype: torch.dtype):
    """Model, stepped LoRA dict, Adam preconditioner, E (5 prompts), U (4), a direction:
    built the same way (seeded) in the parent and in every rank."""
    model = fp.tiny_model(seed=0, quantize=None, dtype=dtype)
    pe, re_, ae = random_rollouts(5, 3, model.vocab_size, seed=11)
    E = fp.make_batch(pe, re_, advantages=ae)
    pu, ru, au = random_rollouts(4, 3, model.vocab_size, seed=12)
    U = fp.make_batch(pu, ru, advantages=au)
    params = {k: torch.nn.Parameter(v.clone()) for k, v in model.lora.items()}
    opt = torch.optim.AdamW(params.values(), lr=ETA)
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        for p in params.values():
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.01
        opt.step()
    pre = fp.AdamPreconditioner.from_optimizer(opt, params)
    lora = {k: p.detach() for k, p in params.items()}
    return model, lora, pre, E, U, random_direction(lora, seed=3)


def bad_U(vocab: int) -> fp.Batch:
    """U whose LAST prompt has a token id outside the vocabulary (so only the last rank sees it)."""
    pu, ru, au = random_rollouts(4, 3, vocab, seed=12)
    pu[-1] = pu[-1] + [vocab + 5]
    return fp.make_batch(pu, ru, advantages=au)


def rank_results(rank: int, world: int) -> dict:
    """Everything one rank computes on its shards (and the errors it raises)."""
    out = {}
    model, lora, pre, E, U, d = setting(torch.float64)
    sh = lambda b: fp.shard_batch(b, rank, world)  # noqa: E731
    kw = dict(preconditioner=pre, eta=ETA, distributed=True)
    out["probe"] = asdict(fp.probe(model, lora, sh(E), sh(U), **kw))
    out["probe_small_E"] = asdict(fp.probe(model, lora, sh(E[:2]), sh(U), **kw))
    out["probe_shared"] = asdict(fp.probe(model, lora, sh(E), sh(E), **kw))
    out["probe_vjp"] = asdict(fp.probe(model, lora, sh(E), sh(U), method="vjp", microbatch=1, **kw))
    out["mean_x"] = fp.mean_grad(model, lora, sh(E[:2]), loss="x", distributed=True)
    out["mean_y"] = fp.mean_grad(model, lora, sh(U), loss="y", preconditioner=pre, distributed=True)
    out["alpha"] = asdict(fp.alpha_variance(lora, sh(E), model=model, direction=d, eta=ETA, distributed=True))
    out["alpha_small"] = asdict(fp.alpha_variance(lora, sh(E[:2]), model=model, direction=d, eta=ETA, distributed=True))
    out["local"] = asdict(fp.alpha_variance(lora, E, model=model, direction=d, distributed=False))
    out["errors"] = {
        "probe": error_of(lambda: fp.probe(model, lora, sh(E[:1]), sh(U), **kw)),
        "alpha": error_of(lambda: fp.alpha_variance(lora, sh(E[:1]), model=model, direction=d, distributed=True)),
        "mean": error_of(lambda: fp.mean_grad(model, lora, None, distributed=True)),
        "vocab": error_of(lambda: fp.probe(model, lora, sh(E), sh(bad_U(model.vocab_size)), **kw)),
    }
    model32, lora32, pre32, E32, U32, _ = setting(torch.float32)
    out["probe_fp32"] = asdict(fp.probe(model32, lora32, sh(E32), sh(U32), preconditioner=pre32, eta=ETA, distributed=True))
    return out


def worker(rank: int, world: int, root: str, results=None) -> None:
    """`results(rank, world)` (default `rank_results`) on a gloo group, pickled to root/rank<r>.pkl."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root}/store", rank=rank, world_size=world,
                            timeout=timedelta(seconds=300))  # fmt: skip
    try:
        result = (results or rank_results)(rank, world)
    finally:
        dist.destroy_process_group()
    Path(root, f"rank{rank}.pkl").write_bytes(pickle.dumps(result))


def spawn(world: int, root: Path, results=None) -> list[dict]:
    """`worker` on `world` gloo processes (OMP_NUM_THREADS=1); a hang fails the test. `results`: a
    module-level function (rank, world) -> picklable, run on every rank (default `rank_results`)."""
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        ctx = mp.start_processes(worker, args=(world, str(root), results), nprocs=world, join=False,
                                 start_method="spawn")  # fmt: skip
    finally:
        if old is None:
            del os.environ["OMP_NUM_THREADS"]
        else:
            os.environ["OMP_NUM_THREADS"] = old
    deadline = time.monotonic() + SPAWN_TIMEOUT
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{world} ranks did not finish in {SPAWN_TIMEOUT} s (a hang?)")
    return [pickle.loads(Path(root, f"rank{r}.pkl").read_bytes()) for r in range(world)]


# ------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"{w}ranks")
def ranks(request, tmp_path_factory):
    return request.param, spawn(request.param, tmp_path_factory.mktemp(f"dist{request.param}"))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread in this module: the model is tiny, and a 2-thread pool crawls when
    the 2 cores are also busy with the ranks (or anything else)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def whole():
    """The single-process references on the unsharded batches."""
    return references()


def references() -> dict:
    model, lora, pre, E, U, d = setting(torch.float64)
    kw = dict(preconditioner=pre, eta=ETA)
    model32, lora32, pre32, E32, U32, _ = setting(torch.float32)
    mu_x, mu_y = (
        fp.mean_grad(model32, lora32, E32),
        fp.mean_grad(model32, lora32, U32, loss="y", preconditioner=pre32),
    )
    return {
        "scale_fp32": float((dot(mu_x, mu_x) * dot(mu_y, mu_y)).sqrt()),
        "probe": fp.probe(model, lora, E, U, **kw),
        "probe_small_E": fp.probe(model, lora, E[:2], U, **kw),
        "probe_shared": fp.probe(model, lora, E, E, **kw),
        "probe_vjp": fp.probe(model, lora, E, U, method="vjp", **kw),
        "mean_x": fp.mean_grad(model, lora, E[:2], loss="x"),
        "mean_y": fp.mean_grad(model, lora, U, loss="y", preconditioner=pre),
        "alpha": fp.alpha_variance(lora, E, model=model, direction=d, eta=ETA),
        "alpha_small": fp.alpha_variance(lora, E[:2], model=model, direction=d, eta=ETA),
        "probe_fp32": fp.probe(model32, lora32, E32, U32, preconditioner=pre32, eta=ETA),
    }


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b) if b else abs(a)


# --------------------------------------------------------------------------- tests


def test_shard_range_is_array_split():
    for n in range(0, 9):
        for world in range(1, 5):
            got = [list(fp.shard_range(n, r, world)) for r in range(world)]
            assert got == [list(a) for a in np.array_split(np.arange(n), world)], (n, world)


def test_shard_batch_and_rollouts_partition_the_prompts(tiny_fp32):
    p, r, a = random_rollouts(3, 2, tiny_fp32.vocab_size, seed=1)
    rollouts = Rollouts(p, r, a, max_lengths=[max(map(len, g)) + 1 for g in r])
    shards = [fp.shard_rollouts(rollouts, k, 4) for k in range(4)]
    assert [len(s) for s in shards] == [1, 1, 1, 0]
    assert sum((s.prompts for s in shards), []) == p and shards[1].max_lengths == rollouts.max_lengths[1:2]
    batch = rollouts.to_batch()
    assert fp.shard_batch(batch, 3, 4) is None
    one = fp.shard_batch(batch, 1, 4)
    assert torch.equal(one.input_ids, shards[1].to_batch().input_ids)
    assert torch.equal(one.max_lengths, batch.max_lengths[1:2])


def test_batch_none_needs_a_process_group(tiny_fp32):
    with pytest.raises(ValueError, match="empty shard"):
        fp.mean_grad(tiny_fp32, tiny_fp32.lora, None)
    with pytest.raises(ValueError, match="no torch.distributed process group"):
        fp.mean_grad(tiny_fp32, tiny_fp32.lora, None, distributed=True)


@pytest.mark.parametrize("case", ["probe", "probe_small_E", "probe_shared", "probe_vjp"])
def test_probe_sharded_equals_whole_float64(ranks, whole, case):
    world, results = ranks
    ref = whole[case]
    got = results[0][case]
    for key in KEYS:
        assert rel(got[key], getattr(ref, key)) <= 1e-10, (key, got[key], getattr(ref, key))
    assert (got["B_E"], got["B_U"], got["shared_prompts"]) == (ref.B_E, ref.B_U, ref.shared_prompts)
    assert proj_rel_err(torch.tensor(got["s"]), torch.tensor(ref.s)) <= 1e-10
    assert proj_rel_err(torch.tensor(got["t"]), torch.tensor(ref.t)) <= 1e-10
    if case == "probe_shared":
        assert got["shared_prompts"] == 5 and abs(got["C_XY"]) > 0


def test_probe_sharded_equals_whole_fp32(ranks, whole):
    """<μX, μY> cancels (|bars_dot| ≈ ‖μX‖‖μY‖ / 4000 here), so as in test_probe its error is
    measured on ‖μX‖‖μY‖; the variances and SEs relative to themselves."""
    world, results = ranks
    ref, got = whole["probe_fp32"], results[0]["probe_fp32"]
    assert abs(got["bars_dot"] - ref.bars_dot) <= 1e-5 * whole["scale_fp32"]
    assert abs(got["delta_h1"] - ref.delta_h1) <= 1e-5 * ETA * whole["scale_fp32"]
    for key in ("V_X", "V_Y", "se", "se_conditional"):
        assert rel(got[key], getattr(ref, key)) <= 1e-5, key


def same(a, b) -> bool:
    """Exact equality of nested results (tensors bitwise); probe timings are per rank."""
    if isinstance(a, dict):
        keys = set(a) - {"timings"}
        return keys == set(b) - {"timings"} and all(same(a[k], b[k]) for k in keys)
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and torch.equal(a, b)
    return a == b


def test_every_rank_gets_bit_identical_results(ranks):
    world, results = ranks
    for r in range(1, world):
        for key, value in results[0].items():
            if key != "errors":
                assert same(value, results[r][key]), (r, key)


def test_mean_grad_sharded_divides_by_the_global_count(ranks, whole):
    world, results = ranks
    for name in ("mean_x", "mean_y"):
        got, ref = results[-1][name], whole[name]  # the last rank: empty shard of E[:2] with 3 ranks
        for k in ref:
            assert got[k].dtype == ref[k].dtype
            assert ((got[k] - ref[k]).norm() / ref[k].norm()).item() <= 1e-10, (name, k)


@pytest.mark.parametrize("case", ["alpha", "alpha_small"])
def test_alpha_variance_sharded_gives_global_statistics_and_all_s(ranks, whole, case):
    world, results = ranks
    got, ref = results[-1][case], whole[case]
    for key in ("mean", "sample_var", "delta", "var", "se"):
        assert rel(got[key], getattr(ref, key)) <= 1e-10, key
    assert got["n"] == ref.n and got["s"].dtype == ref.s.dtype and got["s"].shape == ref.s.shape
    assert proj_rel_err(got["s"], ref.s) <= 1e-10


def test_distributed_false_is_the_local_path(ranks, whole):
    world, results = ranks
    assert results[-1]["local"]["n"] == 5
    assert rel(results[-1]["local"]["sample_var"], whole["alpha"].sample_var) <= 1e-12


def test_errors_are_raised_on_every_rank_without_a_hang(ranks):
    world, results = ranks
    for r, res in enumerate(results):
        e = res["errors"]
        assert "at least 2 prompts in E" in e["probe"] and f"got 1 across {world} ranks" in e["probe"], r
        assert "at least 2 prompts" in e["alpha"], r
        assert "no prompts on any" in e["mean"], r
        assert e["vocab"].startswith(f"rank {world - 1}: ") and "outside the vocabulary" in e["vocab"], r


# ------------------------------------------------------------------ torchrun end to end


def test_torchrun_two_ranks_gives_the_single_process_numbers(saved_run, tmp_path):
    base_dir, adapter_dir, root, model = saved_run
    args = ["run", "--model", base_dir, "--adapter", adapter_dir, "--optimizer-state", root / "optimizer.pt",
            "--lr", "1e-3", "--eval", root / "E.jsonl", "--update", root / "U.jsonl", "--quiet",
            "--out", tmp_path / "r.json"]  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "functional_probe", *map(str, args)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=SPAWN_TIMEOUT)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert out.stdout.count("SE(δH₁)") == 1, out.stdout  # rank 0 alone prints
    got = json.loads((tmp_path / "r.json").read_text())
    state = fp.AdamState.from_state_dict(torch.load(root / "optimizer.pt", weights_only=True), list(model.lora))
    E = fp.read_rollouts(root / "E.jsonl").to_batch()
    U = fp.read_rollouts(root / "U.jsonl").to_batch()
    ref = fp.probe(model, model.lora, E, U, optimizer=state, lr=1e-3)  # `run` probes the exact next step
    g_u = fp.mean_grad(model, model.lora, U, loss="y")
    mu_x = fp.mean_grad(model, model.lora, E)
    mu_y = {k: v / 1e-3 for k, v in state.step({k: -g for k, g in g_u.items()}, model.lora, lr=1e-3).delta.items()}
    scale = float((dot(mu_x, mu_x) * dot(mu_y, mu_y)).sqrt())  # <μX, μY> may cancel: see test_probe
    print({k: rel(got[k], getattr(ref, k)) for k in KEYS}, "scale/|bars_dot|:", scale / abs(ref.bars_dot))
    assert abs(got["bars_dot"] - ref.bars_dot) <= 1e-5 * scale, (got["bars_dot"], ref.bars_dot, scale)
    assert abs(got["delta_h1"] - ref.delta_h1) <= 1e-5 * 1e-3 * scale
    for key in ("V_X", "V_Y", "se", "se_conditional"):
        assert rel(got[key], getattr(ref, key)) <= 1e-5, (key, got[key], getattr(ref, key))
    assert (got["B_E"], got["B_U"], got["shared_prompts"]) == (3, 3, 0)
