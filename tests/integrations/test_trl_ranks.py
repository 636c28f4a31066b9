"""EntropyProbeCallback in a real 2-process GRPOTrainer run (torchrun, accelerate MULTI_CPU, gloo;
tiny float64 PEFT Llama, `trl_ranks_run.py` on each rank) against what the ranks' own recorder saw
and against `fp.trainer_probe` in ONE process on the union of both ranks' rows and E; plus the
one-process behaviour of `trl_ranks`' helpers and the DeepSpeed / FSDP refusals.

Two layouts (G = 4, GA = 2): 3 prompts per generation batch (prompt 1 straddles the ranks; E is
3 prompts, all on rank 0, rank 1 holds none; rank 0's sampling slowed past the rendezvous timeout) and 5 prompts (prompt 2 straddles; E on both ranks;
the seeded sampler draws one prompt text twice here, which is one prompt, as in the trainer's
grouping by token ids)."""

from __future__ import annotations

import math
import os
import pickle
import statistics
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import assert_not_trivial, dict_rel_err
from test_trl import whole_rel_err
from test_trl_loss import peft_llama

import functional_probe as fp
from functional_probe.integrations.trl import EntropyProbeCallback
from functional_probe.integrations.trl_ranks import (
    eval_share,
    multi_process,
    rank_seed,
    slowest,
    union_estimate,
)
from functional_probe.model import from_peft
from functional_probe.optim_step import AdamState
from functional_probe.realized import estimate
from functional_probe.trl_probe import trainer_probe
from functional_probe.trl_rows import micro_batches_from_inputs

pytest.importorskip("trl")

SCRIPT = Path(__file__).with_name("trl_ranks_run.py")
TOL = 1e-5
LAYOUTS = {"3prompts": ("dapo", 3), "5prompts": ("grpo", 5)}


@pytest.fixture(scope="module", params=list(LAYOUTS))
def run(request, tmp_path_factory):
    """Both ranks' dumps of one torchrun launch, and the layout's name."""
    loss_type, rows = LAYOUTS[request.param]
    out = tmp_path_factory.mktemp(request.param)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(SCRIPT),
           str(out), loss_type, str(rows)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=out, env=env, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-6000:]
    return request.param, [pickle.loads((out / f"rank{r}.pkl").read_bytes()) for r in range(2)]


def prompt_key(mb, i: int) -> tuple[int, ...]:
    return tuple(mb.prompt_ids[i][mb.prompt_mask[i]].tolist())


def union_rows(dumps: list[dict], step: int) -> tuple[list, list[set]]:
    """Every rank's micro-batches of `step`, groups renumbered by the sorted distinct prompts of
    both ranks, and the prompts each rank holds."""
    per_rank = [micro_batches_from_inputs(d["inputs"][step]) for d in dumps]
    held = [{prompt_key(mb, i) for mb in mbs for i in range(mb.num_rows)} for mbs in per_rank]
    index = {k: n for n, k in enumerate(sorted(set().union(*held)))}
    rows = [replace(mb, group=torch.tensor([index[prompt_key(mb, i)] for i in range(mb.num_rows)]))
            for mbs in per_rank for mb in mbs]  # fmt: skip
    return rows, held


def union_E(dumps: list[dict], step: int) -> fp.Batch:
    drawn = [d["history"][step].samples for d in dumps if d["history"][step].samples is not None]
    prompts = [p for s in drawn for p in s.prompts]
    return fp.make_batch(prompts, [r for s in drawn for r in s.responses()], max_lengths=[6] * len(prompts))


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and its SE, stdev/√n (the statistics module, exact rational sums)."""
    return statistics.fmean(values), statistics.stdev(values) / math.sqrt(len(values))


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b) if b else abs(a)


def test_the_run_is_data_parallel_with_a_straddling_prompt(run):
    name, dumps = run
    assert [(d["rank"], d["world"], d["distributed"], d["loss"].num_processes, d["type"]) for d in dumps] == \
        [(0, 2, True, 2, "MULTI_CPU"), (1, 2, True, 2, "MULTI_CPU")]  # fmt: skip
    for step in range(2):
        _, held = union_rows(dumps, step)
        assert held[0] & held[1], "no prompt straddles the ranks: the layout does not test the matching"
        owners = [d["history"][step].samples for d in dumps]
        sizes = [0 if s is None else len(s.prompts) for s in owners]
        got = sorted(tuple(p) for s in owners if s is not None for p in s.prompts)
        assert all(n == 0 or n >= 2 for n in sizes) and sum(sizes) == len(got), sizes
        assert (sizes[1] == 0) == (name == "3prompts"), sizes  # 3 prompts: rank 1 has no E
        assert got == sorted(set().union(*held)), "E is not the step's distinct prompts, each once"


def test_prediction_is_this_trainers_step_on_every_rank(run):
    _, dumps = run
    for d in dumps:
        assert len(d["history"]) == len(d["grads"]) == 2
        for i, h in enumerate(d["history"]):
            assert_not_trivial(d["grads"][i])
            clipped = {k: h.probe.result.clip_coef * v for k, v in h.probe.grad.items()}
            assert dict_rel_err(clipped, d["grads"][i]) < TOL
            taken = {k: d["after"][i][k].double() - d["before"][i][k].double() for k in d["before"][i]}
            assert whole_rel_err(h.probe.delta, taken) < TOL
            assert h.logs["grad_rel_err"] < TOL and h.logs["step_rel_err"] < TOL


def test_both_ranks_log_identical_numbers(run):
    """Also with rank 0's sampling 1.5 s slower than the 0.5 s rendezvous timeout (3prompts, see
    trl_ranks_run): the run completes, and the seconds logged are the slow rank's."""
    name, dumps = run
    logs = [[{k: v for k, v in e.items() if k.startswith("entropy_probe/")} for e in d["logs"]] for d in dumps]
    assert len(logs[0]) == 2 and len(logs[0][0]) == 13
    assert logs[0] == logs[1]
    if name == "3prompts":
        assert all(e["entropy_probe/seconds_predict"] >= 1.5 for e in logs[0])


def test_logs_equal_one_process_on_the_union(run):
    """δH₁ and its SE as trainer_probe computes them in one process on both ranks' rows and E; the
    realized ΔH as the per-prompt values of both ranks give it (two-pass float64 mean ± SE)."""
    _, dumps = run
    model = from_peft(peft_llama().to(torch.float64))
    for i, h in enumerate(dumps[0]["history"]):
        rows, _ = union_rows(dumps, i)
        state = AdamState.from_state_dict(*dumps[0]["states"][i])
        ref = trainer_probe(model, h.theta, rows, dumps[0]["loss"], union_E(dumps, i), optimizer=state,
                            max_grad_norm=dumps[0]["max_grad_norm"], distributed=False).result  # fmt: skip
        log = dumps[0]["logs"][i]
        for key in ("delta_h1", "se"):
            assert rel(log[f"entropy_probe/{key}"], getattr(ref, key)) <= 1e-10, (key, log, ref)
        assert (log["entropy_probe/B_E"], log["entropy_probe/B_U"]) == (ref.B_E, ref.B_U)
        for name, key in (("rb", "realized"), ("crn", "realized_crn")):
            parts = [d["history"][i].realized for d in dumps if d["history"][i].realized is not None]
            values = [v for r in parts for v in r.points[0].estimates[name].per_prompt]
            assert len(values) == ref.B_E
            mean, se = mean_se(values)
            assert rel(log[f"entropy_probe/{key}"], mean) <= 1e-12
            assert rel(log[f"entropy_probe/{key}_se"], se) <= 1e-12 and se > 0


class Trainer:
    def __init__(self, processes: int = 1, **flags):
        self.accelerator = type("A", (), {"num_processes": processes})()
        self.__dict__.update(flags)


def test_one_process_and_the_refusals():
    assert not multi_process(Trainer()) and multi_process(Trainer(processes=2))
    kinds = [{"is_deepspeed_enabled": True}, {"is_fsdp_enabled": True}, {"is_fsdp_xla_enabled": True}]
    for flags, what in zip(kinds, ("trainer.is_deepspeed_enabled", "trainer.is_fsdp_enabled", "trainer.is_fsdp_xla"),
                           strict=True):  # fmt: skip
        probe = EntropyProbeCallback()
        with pytest.raises(ValueError, match=f"{what}.* is True; DeepSpeed, FSDP and Megatron-LM shard"):
            probe.attach(Trainer(**flags))
        assert probe.trainer is None
    fsdp = Trainer(processes=2)
    fsdp.accelerator.distributed_type = type("T", (), {"value": "FSDP"})()
    with pytest.raises(ValueError, match="accelerator.distributed_type is FSDP; "):
        multi_process(fsdp)
    assert eval_share(((1, 2), (3,)), False, of_rows=False) == [[1, 2], [3]]
    assert rank_seed(7, 3, False) == 13 and rank_seed(7, 3, False, stream=1) == 14
    est = estimate(torch.tensor([0.1, 0.4, 0.2]))
    assert union_estimate(est, False) is est and slowest({"seconds_x": 1.5}, False) == {"seconds_x": 1.5}


def test_helpers_on_the_two_ranks(run):
    """`trl_ranks_run.helpers_on_ranks` on the run's process group, against closed forms."""
    got = [d["helpers"] for d in run[1]]
    assert [g["rows"] for g in got] == [[[5, 6], [7]], [[8, 9], [10]]]  # [7] once, on rank 0
    assert [g["five"] for g in got] == [[[1], [2], [3]], [[4], [5]]]
    assert [g["three"] for g in got] == [[[1], [2], [3]], []]  # shards of ≥ 2: rank 1 holds none
    assert [g["seed"] for g in got] == [13, 13 + 2**32]
    union, lone = mean_se([0.1, 0.4, 0.2, -0.3, 0.05]), mean_se([0.1, 0.4])
    for g in got:
        assert g["union"].per_prompt == [0.1, 0.4, 0.2, -0.3, 0.05]
        assert g["union"].value == pytest.approx(union[0], rel=1e-14) and g["union"].se == pytest.approx(union[1], rel=1e-14)
        assert (g["lone"].value, g["lone"].se) == pytest.approx(lone, rel=1e-14)
        assert g["slow"] == {"seconds_a": 2.0, "seconds_b": 5.0} and g["multi"]
