"""`EntropyProbeCallback`: inside a TRL GRPOTrainer run, every `every` steps, δH₁ ± SE of the step
the optimizer is about to take, and after the step the entropy change that happened.

    probe = EntropyProbeCallback(every=10, eval_generations=4)
    trainer = GRPOTrainer(model=peft_model, args=config, reward_funcs=reward, train_dataset=data)
    probe.attach(trainer)
    trainer.train()        # entropy_probe/* keys in trainer.state.log_history (and wandb, ...)

Why `attach` and not `callbacks=[...]` alone: a TrainerCallback is handed the model and the
optimizer, never the trainer nor the batch it trains on. `attach` adds the callback
(`trainer.add_callback`) and wraps `trainer.compute_loss`, the trainer's documented override point,
to keep references to the micro-batches of probed steps (nothing is copied or recomputed there).

On a probed step (`state.global_step % every == 0`):
- `on_pre_optimizer_step` (after gradient clipping): E = `eval_generations` fresh samples per prompt
  of the step's own prompts (or `eval_prompts`) at the current θ, as the trainer samples
  (temperature, top_k, top_p, max_completion_length; Lmax = max_completion_length);
  `fp.trainer_probe` predicts δH₁ ± SE of the optimizer's exact next step on the step's rows.
- `on_optimizer_step`: Δθ actually taken, and `fp.realized_entropy_change` of that step on E's
  prompts (fresh coupled samples at θ and θ + Δθ).
- `on_step_end`: `trainer.log` of the keys below (GRPOTrainer's own averaged metrics, if any are
  pending, go out in the same entry).

Logged (entropy changes in nats per token: the change of the per-token entropy rate with Lmax fixed):
    entropy_probe/delta_h1, /se          predicted δH₁ and its SE (delta method)
    entropy_probe/realized, /realized_se the realized ΔH, Rao–Blackwellised token entropies ("rb")
    entropy_probe/realized_crn, /realized_crn_se  the same by plain coupled sampling ("crn")
    entropy_probe/grad_rel_err           ‖c·g_TRL − p.grad‖/‖p.grad‖: our TRL gradient (c: clipping)
                                         against the trainer's; above ~1e-4 the prediction is not
                                         of this trainer's step (e.g. bf16 autocast, dropout)
    entropy_probe/step_rel_err           ‖Δθ_predicted − Δθ_taken‖/‖Δθ_taken‖
    entropy_probe/clip_coef, /B_E, /B_U  clipping factor; prompts in E and in the step
    entropy_probe/seconds_predict, /seconds_realized   wall-clock cost of the probe on this step

Several processes (DDP under accelerate or torchrun; `trl_ranks`): every rank probes its own rows
and E shard and all ranks log the same numbers, those of one process on the union (B_E, B_U
global; the seconds of the slowest rank). DeepSpeed, FSDP and Megatron-LM are refused at `attach`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor
from transformers import TrainerCallback

from ..batch import make_batch
from ..grads import dot64
from ..model import from_peft
from ..model.from_peft import unwrap_peft
from ..realized import RealizedEntropyChange, realized_entropy_change
from ..sampling import Samples, sample
from ..trl_config import TrainerLoss
from ..trl_probe import TrainerProbe, trainer_probe
from ..trl_rows import micro_batches_from_inputs
from .trl_ranks import eval_share, multi_process, rank_seed, slowest, union_estimate, wait_for_all

__all__ = ["EntropyProbeCallback", "ProbedStep"]

Dict = dict[str, Tensor]


@dataclass
class ProbedStep:
    """What the callback kept of one probed step (also in `EntropyProbeCallback.history`):
    `step` the trainer's global step after it, `probe` the prediction, `theta` the LoRA dict
    before the step, `taken` the Δθ the optimizer applied, `p_grad` the trainer's clipped
    gradient, `logs` the logged values, `samples` the draw this rank's E was made of (None: no E
    prompts on this rank), `realized` this rank's `fp.realized_entropy_change` (None likewise)."""

    step: int
    probe: TrainerProbe
    theta: Dict
    taken: Dict | None = None
    p_grad: Dict | None = None
    logs: dict[str, float] | None = None
    samples: Samples | None = None
    realized: RealizedEntropyChange | None = None


def rel_err(a: Dict, b: Dict) -> float:
    """‖a − b‖ / ‖b‖ over all tensors, float64."""
    diff = {k: a[k].double() - b[k].double() for k in b}
    return math.sqrt(dot64(diff, diff) / max(dot64(b, b), 1e-300))


def prompts_of_rows(mbs) -> list[list[int]]:
    """One token list per group of the step's rows (left padding removed), in group order."""
    prompts: dict[int, list[int]] = {}
    for mb in mbs:
        for i, g in enumerate(mb.group.tolist()):
            prompts.setdefault(g, mb.prompt_ids[i][mb.prompt_mask[i]].tolist())
    return [prompts[g] for g in sorted(prompts)]


class EntropyProbeCallback(TrainerCallback):
    """See the module docstring. `every`: probe steps 0, every, 2·every, ... (global_step before the
    step). `eval_prompts`: token-id lists for E (default: the step's own prompts).
    `eval_generations`: samples per prompt of E (≥ 2). `method`: how s is computed (`fp.alpha_projections`).
    `microbatch`: prompts per pass. `seed`: the sampler's seed (plus 2·step, so steps differ, +1 for the realized check's draws,
    so they are not E's, and rank·2³² under several processes)."""

    def __init__(self, every: int = 1, *, eval_prompts: Sequence[Sequence[int]] | None = None,
                 eval_generations: int = 4, method: str = "jvp", microbatch: int | None = None,
                 seed: int = 0) -> None:  # fmt: skip
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every={every!r}; expected a positive int (probe every k-th step)")
        if isinstance(eval_generations, bool) or not isinstance(eval_generations, int) or eval_generations < 2:
            raise ValueError(f"eval_generations={eval_generations!r}; expected an int ≥ 2")
        self.every, self.eval_prompts, self.eval_generations = every, eval_prompts, eval_generations
        self.method, self.microbatch, self.seed = method, microbatch, seed
        self.history: list[ProbedStep] = []
        self.trainer = None
        self._inputs: list[dict[str, Any]] | None = None
        self._model = self._loss = self._current = self._E = None
        self.distributed = False

    def attach(self, trainer) -> EntropyProbeCallback:
        """Add the callback to `trainer` and record the micro-batches its compute_loss sees."""
        if self.trainer is not None:
            raise ValueError("this EntropyProbeCallback is attached to a trainer already")
        self.distributed = multi_process(trainer)
        self.trainer = trainer
        original = trainer.compute_loss

        def recording(model, inputs, *args, **kwargs):
            if self._inputs is not None and model.training:
                self._inputs.append(inputs)
            return original(model, inputs, *args, **kwargs)

        trainer.compute_loss = recording
        trainer.add_callback(self)
        return self

    def on_step_begin(self, args, state, control, **kwargs):
        if self.trainer is None:
            raise ValueError("EntropyProbeCallback needs attach(trainer) before training (it must see the batch)")
        self._inputs = [] if state.global_step % self.every == 0 else None

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        if not self._inputs:
            return
        start = time.perf_counter()
        peft = unwrap_peft(model)
        if self._model is None:  # frozen weights do not change during training: convert once
            self._model = from_peft(peft)
            self._loss = TrainerLoss.from_config(args)
        named = {n: p for n, p in peft.named_parameters() if n in self._model.lora}
        theta = {k: named[k].detach().clone() for k in self._model.lora}
        mbs = micro_batches_from_inputs(self._inputs)
        drawn, E = self.eval_batch(theta, prompts_of_rows(mbs), args, state.global_step)
        wait_for_all(self.distributed)  # ranks sample unequal shards: not a rank missing the rendezvous
        probe = trainer_probe(self._model, theta, mbs, self._loss, E, optimizer=optimizer, named_params=named,
                              max_grad_norm=args.max_grad_norm if args.max_grad_norm > 0 else None,
                              method=self.method, microbatch=self.microbatch, distributed=self.distributed)  # fmt: skip
        p_grad = {k: named[k].grad.detach().clone() for k in theta}
        self._current = ProbedStep(state.global_step + 1, probe, theta, p_grad=p_grad, samples=drawn)
        self._current.logs = {"seconds_predict": time.perf_counter() - start}
        self._E = E

    def eval_batch(self, theta: Dict, prompts: list[list[int]], args, step: int) -> tuple[Samples | None, Any]:
        """This rank's E (`trl_ranks`): fresh samples at θ as the trainer samples, Lmax =
        max_completion_length; (the draw, the Batch), or (None, None) for no prompts."""
        own = self.eval_prompts is None
        prompts = eval_share(prompts if own else self.eval_prompts, self.distributed, of_rows=own)
        if not prompts:
            return None, None
        drawn = sample(self._model, theta, prompts, samples_per_prompt=self.eval_generations, **self.sampling(args),
                       seed=rank_seed(self.seed, step, self.distributed))  # fmt: skip
        return drawn, make_batch(prompts, drawn.responses(), max_lengths=[args.max_completion_length] * len(prompts))

    def sampling(self, args) -> dict[str, Any]:
        """The trainer's sampling settings (0 / 1.0 mean off in GRPOConfig)."""
        eos = self.trainer.processing_class.eos_token_id
        return dict(max_new_tokens=args.max_completion_length, temperature=args.temperature,
                    top_k=args.top_k or None, top_p=None if args.top_p in (None, 1.0) else args.top_p,
                    eos_token_id=eos)  # fmt: skip

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        cur = self._current
        if cur is None:
            return
        start = time.perf_counter()
        named = dict(unwrap_peft(model).named_parameters())
        cur.taken = {k: named[k].detach().double() - v.double() for k, v in cur.theta.items()}
        if self._E is not None:
            cur.realized = realized_entropy_change(
                self._model, cur.theta, cur.taken, self._E, [1.0], estimators=("crn", "rb"),
                samples_per_prompt=self.eval_generations, seed=rank_seed(self.seed, state.global_step, self.distributed, stream=1),
                **self.sampling(args))  # fmt: skip
        mine = cur.realized.points[0].estimates if cur.realized is not None else {}
        est = {e: union_estimate(mine.get(e), self.distributed) for e in ("rb", "crn")}
        res, pred = cur.probe.result, cur.probe
        clipped = {k: res.clip_coef * pred.grad[k] for k in pred.grad}
        cur.logs |= {
            "delta_h1": res.delta_h1, "se": res.se, "realized": est["rb"].value, "realized_se": est["rb"].se,
            "realized_crn": est["crn"].value, "realized_crn_se": est["crn"].se,
            "grad_rel_err": rel_err(clipped, cur.p_grad), "step_rel_err": rel_err(pred.delta, cur.taken),
            "clip_coef": res.clip_coef, "B_E": res.B_E, "B_U": res.B_U,
            "seconds_realized": time.perf_counter() - start,
        }  # fmt: skip

    def on_step_end(self, args, state, control, **kwargs):
        cur, self._current, self._inputs = self._current, None, None
        if cur is None:
            return
        self.history.append(cur)
        seconds = [k for k in cur.logs if k.startswith("seconds_")]
        cur.logs |= slowest({k: cur.logs[k] for k in seconds}, self.distributed)
        self.trainer.log({f"entropy_probe/{k}": float(v) for k, v in cur.logs.items()})
