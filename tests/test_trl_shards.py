"""trainer_probe(distributed=True) on 2 gloo ranks against one process on the union of both ranks'
rows and E (float64, tiny model), per loss type grpo / bnpo / dr_grpo / dapo.

The generation batch (4 prompts with 3, 1, 4, 2 completions, advantages and num_items_in_batch of
the whole batch, as TRL computes them on gathered rewards) is laid out as TRL's sampler lays it:
a prompt's rows together, rank 0 the first 6 rows, rank 1 the last 4, so prompt 2 straddles the
ranks; each rank shuffles its rows and splits them into its GA = 2 micro-batches (3+3, 2+2), and
numbers its groups locally. E (5 prompts) is sharded 3|2. The reference is the single-process
trainer_probe (itself held against the optimizer's own step, finite differences and per-prompt
loops in test_trl_probe) on the union with loss.num_processes = 2."""

from __future__ import annotations

import os
import time
from dataclasses import asdict, replace

import pytest
import torch
import torch.distributed as dist
from helpers import dict_rel_err, error_of, random_rollouts
from test_distributed import same, spawn
from test_trl_loss import random_rows

import functional_probe as fp
from functional_probe.rendezvous import ENV_TIMEOUT
from functional_probe.trl_probe import trainer_probe

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
KEYS = ("bars_dot", "delta_h1", "V_X", "V_Y", "se", "se_conditional", "se_jackknife", "clip_coef")
LONE_TIMEOUT = 1.0


def relabel(rows: fp.TrainerRows) -> fp.TrainerRows:
    """Groups numbered by first appearance (a rank knows only its own prompts)."""
    first: dict[int, int] = {}
    return replace(rows, group=torch.tensor([first.setdefault(g, len(first)) for g in rows.group.tolist()]))


def setting(loss_type: str):
    """Model, loss, each rank's micro-batches (global group indices), E and its shards, a stepped
    AdamW: built the same way (seeded) in the parent and in every rank."""
    model = fp.tiny_model(seed=0, quantize=None, dtype=torch.float64)
    loss = fp.TrainerLoss(loss_type=loss_type, max_completion_length=8, gradient_accumulation_steps=2,
                          num_processes=2)  # fmt: skip
    rows = random_rows(loss, model, seed=3)
    rows = rows.select(torch.argsort(rows.group, stable=True))  # TRL's sampler: a prompt's rows together
    gen = torch.Generator().manual_seed(5)
    per_rank = []
    for part, micro in ((range(0, 6), 3), (range(6, 10), 2)):
        mine = rows.select(part)
        per_rank.append(mine.select(torch.randperm(mine.num_rows, generator=gen)).split(micro))
    pe, re_, _ = random_rollouts(5, 3, model.vocab_size, seed=11)
    E = fp.make_batch(pe, re_)
    params = {k: torch.nn.Parameter(v.clone()) for k, v in model.lora.items()}
    opt = torch.optim.AdamW(params.values(), lr=1e-4, weight_decay=0.01)
    for _ in range(2):  # momentum from earlier steps
        for p in params.values():
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype) * 1e-3
        opt.step()
    return model, loss, per_rank, E, opt, params


def rank_results(rank: int, world: int) -> dict:
    out = {}
    for loss_type in LOSS_TYPES:
        model, loss, per_rank, E, opt, params = setting(loss_type)
        mbs, lora = [relabel(mb) for mb in per_rank[rank]], {k: p.detach() for k, p in params.items()}
        got = trainer_probe(model, lora, mbs, loss, fp.shard_batch(E, rank, world), optimizer=opt,
                            named_params=params, max_grad_norm=1.0, distributed=True)  # fmt: skip
        out[loss_type] = {"result": asdict(got.result), "grad": got.grad, "delta": got.delta}
    kw = dict(optimizer=opt, named_params=params)
    E_r = fp.shard_batch(E, rank, world)
    bad = [replace(mbs[0], completion_ids=mbs[0].completion_ids + model.vocab_size * rank), *mbs[1:]]  # rank 1 only
    out["errors"] = {
        "unset": error_of(lambda: trainer_probe(model, lora, mbs, loss, E_r, **kw)),
        "local": error_of(lambda: trainer_probe(model, lora, mbs, loss, E_r, distributed=False, **kw)),
        "processes": error_of(lambda: trainer_probe(model, lora, mbs, replace(loss, num_processes=1), E_r,
                                                    distributed=True, **kw)),  # fmt: skip
        "groups": error_of(lambda: trainer_probe(model, lora, mbs, loss, E_r, num_groups=9, distributed=True, **kw)),
        "small_E": error_of(lambda: trainer_probe(model, lora, mbs, loss, E_r[:1] if rank == 0 else None,
                                                  distributed=True, **kw)),  # fmt: skip
        "vocab": error_of(lambda: trainer_probe(model, lora, bad, loss, E_r, distributed=True, **kw)),
    }
    os.environ[ENV_TIMEOUT] = str(LONE_TIMEOUT)
    start = time.monotonic()
    if rank == 0:  # the is_world_process_zero() pattern: rank 1 never calls
        out["errors"]["lone"] = error_of(lambda: trainer_probe(model, lora, mbs, loss, E_r, distributed=True, **kw))
    out["lone_seconds"] = time.monotonic() - start
    dist.barrier()
    return out


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield spawn(2, tmp_path_factory.mktemp("trl_shards"), rank_results)
    finally:
        torch.set_num_threads(threads)


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b) if b else abs(a)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_two_ranks_equal_one_process_on_the_union(ranks, loss_type):
    model, loss, per_rank, E, opt, params = setting(loss_type)
    lora = {k: p.detach() for k, p in params.items()}
    ref = trainer_probe(model, lora, per_rank[0] + per_rank[1], loss, E, optimizer=opt, named_params=params,
                        max_grad_norm=1.0, distributed=False)  # fmt: skip
    got = ranks[0][loss_type]
    r = got["result"]
    for key in KEYS:
        assert rel(r[key], getattr(ref.result, key)) <= 1e-10, (key, r[key], getattr(ref.result, key))
    assert (r["B_E"], r["B_U"], r["ranks"]) == (5, 4, 2) and ref.result.ranks == 1
    assert r["s"] == pytest.approx(ref.result.s, rel=1e-10)
    assert sorted(r["t"]) == pytest.approx(sorted(ref.result.t), rel=1e-10)  # prompt order may differ
    assert dict_rel_err(got["grad"], ref.grad) <= 1e-12 and dict_rel_err(got["delta"], ref.delta) <= 1e-10
    assert r["V_Y"] > 0 and r["se_jackknife"] > 0 and r["delta_h1"] != 0


def test_every_rank_gets_bit_identical_results(ranks):
    for loss_type in LOSS_TYPES:
        assert same(ranks[0][loss_type], ranks[1][loss_type]), loss_type


def test_configurations_that_cannot_be_exact_are_refused_on_every_rank(ranks):
    for rank, res in enumerate(ranks):
        e = res["errors"]
        assert "pass distributed=True" in e["unset"], rank
        assert "distributed=False) under a process group of 2 ranks" in e["local"], rank
        assert "loss.num_processes=1 but the process group has 2 ranks" in e["processes"], rank
        assert "num_groups is for distributed=False" in e["groups"], rank
        assert "at least 2 prompts in E" in e["small_E"] and "got 1 across 2 ranks" in e["small_E"], rank
        assert e["vocab"].startswith("rank 1: ") and "outside the vocabulary" in e["vocab"], rank


def test_a_call_on_rank_zero_alone_errors_within_the_timeout(ranks):
    lone = ranks[0]["errors"]["lone"]
    assert "rank(s) [1] of 2 did not call it" in lone and "distributed=False" in lone
    assert LONE_TIMEOUT <= ranks[0]["lone_seconds"] < LONE_TIMEOUT + 5
