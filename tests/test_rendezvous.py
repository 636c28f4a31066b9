"""Two gloo processes under accelerate's PartialState: the explicit modes and the rendezvous.

The file doubles as the rank script (`python test_rendezvous.py ROOT`, RANK/WORLD_SIZE/MASTER_*
set as `accelerate launch` sets them). Each rank: the probe and alpha_variance on its shard with
distributed=True (compared in the parent with one process on the whole batch), the default
distributed=None (must raise), distributed=False on the local batch, then rank 0 ALONE calls the
probe with distributed=True (must raise within the 2 s timeout, naming rank 1) while rank 1 waits
at a barrier, and finally both ranks pass one more sharded mean_grad (the group stays in step).
The parent bounds the whole run by a subprocess timeout, so a hang fails the test.
"""

from __future__ import annotations

import os
import pickle
import socket
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

import functional_probe as fp
from functional_probe.rendezvous import ENV_TIMEOUT, rendezvous, rendezvous_timeout

ETA = 2e-3
TIMEOUT = 2.0  # the rendezvous timeout the ranks run with (seconds)
RUN_TIMEOUT = 300.0  # the whole two-process run


def setting():
    """Float64 tiny model, Adam preconditioner, E (5 prompts), U (4), a direction; seeded alike on every rank."""
    from helpers import random_direction, random_rollouts

    model = fp.tiny_model(seed=0, quantize=None, dtype=torch.float64)
    pe, re_, ae = random_rollouts(5, 3, model.vocab_size, seed=11)
    pu, ru, au = random_rollouts(4, 3, model.vocab_size, seed=12)
    E, U = fp.make_batch(pe, re_, advantages=ae), fp.make_batch(pu, ru, advantages=au)
    pre = fp.AdamPreconditioner.from_state_dict(adam_state(model.lora), list(model.lora))
    return model, model.lora, pre, E, U, random_direction(model.lora, seed=3)


def adam_state(lora):
    params = [torch.nn.Parameter(v.clone()) for v in lora.values()]
    opt = torch.optim.AdamW(params, lr=ETA)
    gen = torch.Generator().manual_seed(0)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.01
    opt.step()
    return opt.state_dict()


def rank_main(root: str) -> None:
    from accelerate import PartialState
    from helpers import error_of

    torch.set_num_threads(1)
    state = PartialState(cpu=True)
    rank, world = state.process_index, state.num_processes
    model, lora, pre, E, U, d = setting()
    sh = lambda b: fp.shard_batch(b, rank, world)  # noqa: E731
    out = {"backend": str(state.backend), "world": world}
    out["probe"] = asdict(fp.probe(model, lora, sh(E), sh(U), preconditioner=pre, eta=ETA, distributed=True))
    out["alpha"] = asdict(fp.alpha_variance(lora, sh(E), model=model, direction=d, eta=ETA, distributed=True))
    out["none"] = error_of(lambda: fp.probe(model, lora, E, U, preconditioner=pre, eta=ETA))
    out["local"] = asdict(fp.probe(model, lora, E, U, preconditioner=pre, eta=ETA, distributed=False))
    if rank == 0:
        start = time.monotonic()
        out["lone"] = error_of(lambda: fp.probe(model, lora, sh(E), sh(U), preconditioner=pre, eta=ETA,
                                                distributed=True))  # fmt: skip
        out["lone_seconds"] = time.monotonic() - start
    state.wait_for_everyone()
    out["after"] = fp.mean_grad(model, lora, sh(U), loss="y", distributed=True)
    Path(root, f"rank{rank}.pkl").write_bytes(pickle.dumps(out))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    root = tmp_path_factory.mktemp("rdv")
    port = free_port()
    tests = str(Path(__file__).parent)
    base = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            "WORLD_SIZE": "2", ENV_TIMEOUT: str(TIMEOUT),
            "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    procs = [subprocess.Popen([sys.executable, __file__, str(root)], env={**base, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(2)]  # fmt: skip
    try:
        logs = [p.communicate(timeout=RUN_TIMEOUT)[0] for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"two ranks did not finish in {RUN_TIMEOUT} s (a hang?)")
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    return [pickle.loads(Path(root, f"rank{r}.pkl").read_bytes()) for r in range(2)]


@pytest.fixture(scope="module")
def whole():
    model, lora, pre, E, U, d = setting()
    return {
        "probe": fp.probe(model, lora, E, U, preconditioner=pre, eta=ETA),
        "alpha": fp.alpha_variance(lora, E, model=model, direction=d, eta=ETA),
        "local0": fp.probe(model, lora, E, U, preconditioner=pre, eta=ETA),
        "mean_y": fp.mean_grad(model, lora, U, loss="y"),
    }


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b) if b else abs(a)


def test_all_ranks_equal_one_process_on_the_gathered_batch(ranks, whole):
    assert ranks[0]["backend"] == "gloo" and ranks[0]["world"] == 2
    ref = whole["probe"]
    for got in (r["probe"] for r in ranks):
        for key in ("bars_dot", "delta_h1", "V_X", "V_Y", "C_XY", "se", "se_conditional"):
            assert rel(got[key], getattr(ref, key)) <= 1e-10, (key, got[key], getattr(ref, key))
        assert (got["B_E"], got["B_U"], got["ranks"], ref.ranks) == (5, 4, 2, 1)
    alpha, ref_a = ranks[1]["alpha"], whole["alpha"]
    assert alpha["ranks"] == 2 and alpha["n"] == 5 and rel(alpha["se"], ref_a.se) <= 1e-10


def test_default_under_a_group_raises_asking_for_the_mode(ranks):
    for r in ranks:
        assert "process group of 2 ranks" in r["none"] and "distributed=True" in r["none"], r["none"]
        assert "distributed=False" in r["none"]


def test_distributed_false_is_this_process_alone(ranks, whole):
    got = ranks[1]["local"]
    assert got["ranks"] == 1 and got["B_E"] == 5 and rel(got["se"], whole["local0"].se) <= 1e-12


def test_rank0_alone_errors_within_the_timeout_and_the_group_stays_in_step(ranks, whole):
    lone = ranks[0]["lone"]
    assert lone is not None and "rank(s) [1] of 2 did not call it within 2 s" in lone, lone
    assert "distributed=False" in lone and ENV_TIMEOUT in lone
    assert TIMEOUT <= ranks[0]["lone_seconds"] <= TIMEOUT + 3.0, ranks[0]["lone_seconds"]
    for r in ranks:  # the sharded call after the failure: both ranks, the whole-batch mean
        for k, ref in whole["mean_y"].items():
            assert ((r["after"][k] - ref).norm() / ref.norm()).item() <= 1e-10, k


def test_timeout_from_argument_environment_or_default(monkeypatch):
    monkeypatch.delenv(ENV_TIMEOUT, raising=False)
    assert rendezvous_timeout() == 10.0 and rendezvous_timeout(0.5) == 0.5
    monkeypatch.setenv(ENV_TIMEOUT, "3")
    assert rendezvous_timeout() == 3.0
    for bad in ("soon", "0", "-1", "inf"):
        monkeypatch.setenv(ENV_TIMEOUT, bad)
        with pytest.raises(ValueError, match=f"\\${ENV_TIMEOUT}='{bad}'; expected a finite number"):
            rendezvous_timeout()
    with pytest.raises(ValueError, match="timeout=0; expected"):
        rendezvous_timeout(0)


def test_no_group_is_a_no_op_and_true_without_a_group_raises(tiny_fp32):
    rendezvous("probe")  # no process group: returns at once
    with pytest.raises(ValueError, match="mean_grad: distributed=True but no torch.distributed process group"):
        fp.mean_grad(tiny_fp32, tiny_fp32.lora, None, distributed=True)


if __name__ == "__main__":
    rank_main(sys.argv[1])
