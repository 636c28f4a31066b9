"""One rank of a real data-parallel GRPOTrainer run with EntropyProbeCallback, launched by
`torchrun --nproc-per-node 2` from test_trl_ranks.py (accelerate MULTI_CPU, gloo).

Usage: python trl_ranks_run.py OUT_DIR LOSS_TYPE ROWS (per_device_train_batch_size). Writes
OUT_DIR/rank<r>.pkl with what this rank saw: the callback's logs and history, the inputs
compute_loss received on each step, the optimizer state before each step (state_dict and
parameter names), an independent recorder's p.grad and θ before / after each optimizer step, and
what `trl_ranks`' helpers return on this rank (`helpers_on_ranks`).
G = 4 and GA = 2: with ROWS = 3, 12 rows per generation batch (3 prompts), 6 per rank: rank 0
holds prompt 0 and half of prompt 1, rank 1 the other half and prompt 2; with ROWS = 5, 5
prompts, prompt 2 straddling. With ROWS = 3, rank 0's E sampling is also made 1.5 s slower than
rank 1's (which has no E) while the rendezvous timeout is 0.5 s: ranks that are inside the
callback, merely unequally busy, must not be taken for ranks that never call."""

from __future__ import annotations

import copy
import os
import pickle
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import trl  # noqa: E402
from datasets import Dataset  # noqa: E402
from test_trl import Recorder  # noqa: E402
from test_trl_loss import peft_llama, tokenizer  # noqa: E402

import functional_probe.integrations.trl as callback_module  # noqa: E402
from functional_probe.integrations.trl import EntropyProbeCallback  # noqa: E402
from functional_probe.integrations.trl_ranks import (  # noqa: E402
    eval_share,
    multi_process,
    rank_seed,
    slowest,
    union_estimate,
)
from functional_probe.realized import estimate  # noqa: E402
from functional_probe.rendezvous import ENV_TIMEOUT  # noqa: E402

PROMPTS = ["t5 t6 t7", "t8 t9", "t10 t11 t12 t13", "t14", "t15 t16", "t17 t18 t19"]


class Inputs(Recorder):
    """The recorder, plus the optimizer state before each step and compute_loss's inputs per step."""

    def __init__(self, trainer):
        super().__init__()
        self.trainer, self.inputs, self.states = trainer, [], []
        original = trainer.compute_loss

        def recording(model, inputs, *args, **kwargs):
            if model.training:
                self.inputs[-1].append(inputs)
            return original(model, inputs, *args, **kwargs)

        trainer.compute_loss = recording

    def on_step_begin(self, args, state, control, **kw):
        self.inputs.append([])

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kw):
        super().on_pre_optimizer_step(args, state, control, model=model, **kw)
        names = {id(p): n for n, p in model.named_parameters()}
        order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
        self.states.append((copy.deepcopy(optimizer.state_dict()), order))


def helpers_on_ranks(rank: int, world: int) -> dict:
    """trl_ranks' helpers on 2 gloo ranks: rows' prompts [5 6], [7] | [7], [8 9], [10] ([7]
    straddles), eval prompts 5 and 3, per-prompt values 2 | 3."""
    rows = [[[5, 6], [7]], [[7], [8, 9], [10]]][rank]
    est = estimate(torch.tensor([[0.1, 0.4], [0.2, -0.3, 0.05]][rank], dtype=torch.float64))
    five, three = [[1], [2], [3], [4], [5]], [[1], [2], [3]]
    return dict(rows=eval_share(rows, True, of_rows=True), five=eval_share(five, True, of_rows=False),
                three=eval_share(three, True, of_rows=False), seed=rank_seed(7, 3, True),
                union=union_estimate(est, True), lone=union_estimate(None if rank else est, True),
                slow=slowest({"seconds_a": 1.0 + rank, "seconds_b": 5.0 - rank}, True),
                multi=multi_process(object()))  # fmt: skip


def slowed(fn, seconds: float):
    def slow(*args, **kwargs):
        time.sleep(seconds)
        return fn(*args, **kwargs)

    return slow


def main(out: str, loss_type: str, rows: int) -> None:
    args = trl.GRPOConfig(
        output_dir=tempfile.mkdtemp(), report_to=[], use_cpu=True, bf16=False, save_strategy="no",
        per_device_train_batch_size=rows, num_generations=4, max_completion_length=6, gradient_accumulation_steps=2,
        max_steps=2, logging_steps=1, learning_rate=3e-3, max_grad_norm=1.0, loss_type=loss_type, seed=0,
    )  # fmt: skip
    trainer = trl.GRPOTrainer(
        model=peft_llama().to(torch.float64), reward_funcs=lambda completions, **kw: [float(len(c)) for c in completions],
        args=args, train_dataset=Dataset.from_dict({"prompt": PROMPTS * 4}), processing_class=tokenizer(),
    )  # fmt: skip
    rec = Inputs(trainer)
    trainer.add_callback(rec)
    probe = EntropyProbeCallback(every=1, eval_generations=2).attach(trainer)
    if rows == 3:
        os.environ[ENV_TIMEOUT] = "0.5"
        if trainer.accelerator.process_index == 0:
            callback_module.sample = slowed(callback_module.sample, 1.5)
    trainer.train()
    accelerator = trainer.accelerator
    logs = [e for e in trainer.state.log_history if "entropy_probe/delta_h1" in e]
    dump = dict(rank=accelerator.process_index, world=accelerator.num_processes,
                type=accelerator.distributed_type.value, distributed=probe.distributed, logs=logs,
                history=probe.history, inputs=rec.inputs, states=rec.states, grads=rec.grads, before=rec.before,
                after=rec.after, loss=probe._loss, max_grad_norm=args.max_grad_norm)  # fmt: skip
    dump["helpers"] = helpers_on_ranks(dump["rank"], dump["world"])
    Path(out, f"rank{dump['rank']}.pkl").write_bytes(pickle.dumps(dump))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
