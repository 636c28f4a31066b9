"""δH₁ ± SE of the step a TRL GRPOTrainer takes next, on the trainer's own rows.

The update is TRL's: p.grad = ∇θ of the trainer loss (`trl_loss.trainer_grad`: loss_type,
temperature, β against the adapter-free base, masked truncated completions, GA and process
normalisers) over the step's micro-batches, then clip_grad_norm_(max_grad_norm) and the
optimizer's exact next step Δθ (`optim_step`). δH₁ = <μX, Δθ> with μX the mean X gradient of the
evaluation batch E at the loss's temperature. V_X from s_n = <X_n, Δθ/η>; V_Y from
t_p = <−N·∇L_trl[p], b>, b = −Jᵀ μX/η the step's pullback (the linearisation of
`probe(step="optimizer")`), L_trl[p] the per-prompt terms of TRL's loss, which sum to it (N of
them). E and U are taken as disjoint (no cross term).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor
from torch.nn import Parameter

from .alpha import alpha_projections
from .batch import Batch
from .grads import mean_grad
from .model import FunctionalModel
from .optim_step import AdamState
from .probe import ProbeResult, assemble, probe_moments, timed
from .probe_step import pseudo_values, step_of
from .trl_config import TrainerLoss
from .trl_loss import group_count, trainer_grad, trainer_group_grads, trainer_token_logps
from .trl_rows import TrainerRows
from .x_estimators import check_x_estimator

__all__ = ["TrainerProbe", "trainer_probe", "with_reference"]

Dict = dict[str, Tensor]


@dataclass(frozen=True)
class TrainerProbe:
    """`result`: the probe of the trainer's next step. `grad`: TRL's loss gradient over the step's
    micro-batches before clipping (what the trainer's backward leaves in p.grad), a dict like
    lora. `delta`: the predicted Δθ of the optimizer step (float64, a dict like lora)."""

    result: ProbeResult
    grad: Dict
    delta: Dict


def with_reference(model: FunctionalModel, mb: TrainerRows, loss: TrainerLoss) -> TrainerRows:
    """`mb` with the reference log-probs TRL's KL term uses for a PEFT model: the adapter disabled
    (a zero LoRA dict), at the loss's temperature, without gradient."""
    zero = {k: torch.zeros_like(v) for k, v in model.lora.items()}
    with torch.no_grad():
        ref = trainer_token_logps(model, zero, mb.prompt_ids, mb.prompt_mask, mb.completion_ids, mb.completion_mask,
                                  temperature=loss.temperature)  # fmt: skip
    return replace(mb, ref_logps=ref.float())


def trainer_probe(
    model: FunctionalModel,
    lora: Mapping[str, Tensor],
    micro_batches: Sequence[TrainerRows],
    loss: TrainerLoss,
    E: Batch,
    *,
    optimizer: torch.optim.Optimizer | AdamState,
    named_params: Mapping[str, Parameter] | Iterable[tuple[str, Parameter]] | None = None,
    max_grad_norm: float | None = None,
    lr: float | Sequence[float] | None = None,
    num_groups: int | None = None,
    method: str = "jvp",
    microbatch: int | None = None,
    progress: Callable[[str], None] | None = None,
    x_estimator: str = "loo",
) -> TrainerProbe:
    """The probe of the trainer's next step (module docstring) from θ = `lora`.

    `micro_batches`: the step's GA micro-batches (rows with their prompt index; `ref_logps` are
    filled from the adapter-free model when β > 0 and missing). `optimizer`: the live optimizer
    (with `named_params`, keyed like `lora`) or an `AdamState`; `max_grad_norm`: the trainer's
    clipping; `lr`: the lr(s) of the step (default: the groups' current lr). `num_groups`: prompts
    N (default: 1 + the largest group index). Single process: E and the rows are this process's.
    `x_estimator` ("loo" | "rb"): the X loss of μX and s (`probe`). `se_jackknife` from the
    pseudo-values of the per-prompt gradients Y_p = −N·∇L_trl[p] (`probe_step.pseudo_values`;
    TRL's normalisers are kept as they are for the whole batch).
    """
    say = progress or (lambda _: None)
    check_x_estimator(x_estimator)
    if len(E) < 2:
        raise ValueError(f"trainer_probe needs at least 2 prompts in E for a variance, got {len(E)}")
    stepper = step_of(lora, preconditioner=None, eta=None, optimizer=optimizer, named_params=named_params,
                      max_grad_norm=max_grad_norm, lr=lr, step="optimizer", v_y="linear")  # fmt: skip
    mbs = list(micro_batches)
    if loss.beta:
        mbs = [mb if mb.ref_logps is not None else with_reference(model, mb, loss) for mb in mbs]
    n_u = group_count(mbs, num_groups)
    timings: dict[str, float] = {}
    kw = dict(temperature=loss.temperature, microbatch=microbatch, x_estimator=x_estimator)
    with timed(timings, "total"):
        say("mean X gradient over E")
        with timed(timings, "mu_x"):
            mu_x = mean_grad(model, lora, E, loss="x", distributed=False, **kw)
        say(f"TRL's {loss.loss_type} gradient over the rows and the optimizer's next step")
        with timed(timings, "mu_y"):
            g = trainer_grad(model, lora, mbs, loss)
            view = stepper.take({k: -v for k, v in g.items()}, lora)
        say("projections s of E on the step")
        with timed(timings, "proj_s"):
            s = alpha_projections(model, lora, E, view.direction, loss="x", method=method, **kw)
        say("per-prompt TRL gradients on the step's pullback of mu_X")
        with timed(timings, "proj_t"):
            per_prompt, b = trainer_group_grads(model, lora, mbs, loss, num_groups=n_u), view.pullback(mu_x)
            t = -n_u * sum((per_prompt[k].double() * b[k].double()).flatten(1).sum(1) for k in b)
        with timed(timings, "jackknife"):
            y = {k: -n_u * v for k, v in per_prompt.items()}
            t_jack = pseudo_values(stepper, lora, {k: -v for k, v in g.items()}, mu_x, n_u, [y])
    result = assemble(mu_x, view, stepper, probe_moments(s, t, t_jack, []), s, t, timings=timings,
                      method=method, weighting="dr_grpo", x_estimator=x_estimator)  # fmt: skip
    return TrainerProbe(result=result, grad=g, delta=dict(view.parts.delta))
