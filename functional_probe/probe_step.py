"""The step a probe follows, built from g_U = mean_p ∇Ly[p] over the update batch U.

- `OptimizerStep`: the optimizer's exact next step Δθ for p.grad = −g_U (`optim_step`); μY = Δθ/η
  with η its first group's lr; the pullback b(v) = −Jᵀv/η (J = ∂Δθ/∂p.grad) linearises Δθ's
  dependence on U for V_Y, or `jackknife_values` gives the leave-one-prompt-out pseudo-values.
- `PreconditionedStep`: the seed's η·P(g_U), linear in g_U, b = P.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import Parameter

from .batch import Batch
from .grads import dot64, microbatches, per_sample_grads
from .optim_step import AdamState
from .optim_update import NextStep, clip_factor, group_lrs
from .validation import check_step_size

Preconditioner = Callable[[Mapping[str, Tensor]], dict[str, Tensor]]
Dict = dict[str, Tensor]
STEPS = ("optimizer", "preconditioned")
V_Y = ("linear", "jackknife")


@dataclass(frozen=True)
class StepView:
    """What the probe needs of a step built from g_U = mean_p ∇Ly[p]: the direction μY = Δθ/η
    (s_n = <X_n, μY>), the pullback b = ∂<v, μY>/∂(mean ∇Ly) (t_p = <∇Ly[p], b(μX)>) and the
    parts of Δθ (None for the seed's step)."""

    direction: Dict
    pullback: Callable[[Mapping[str, Tensor]], Dict]
    parts: NextStep | None


@dataclass(frozen=True)
class PreconditionedStep:
    """The seed's step θ → θ + η·P(g_U): μY = P(g_U), P diagonal and self-adjoint, b = P."""

    preconditioner: Preconditioner
    eta: float
    name = "preconditioned"
    source = None
    v_y = "linear"  # the step is linear in g_U: the linear V_Y is exact

    def take(self, g_u: Mapping[str, Tensor], lora: Mapping[str, Tensor]) -> StepView:
        return StepView(direction=self.preconditioner(g_u), pullback=self.preconditioner, parts=None)


@dataclass(frozen=True)
class OptimizerStep:
    """The optimizer's exact next step for p.grad = −g_U (the trainer minimises −Ly), from θ = lora.

    μY = Δθ/η with η the first group's lr; b(v) = −Jᵀv/η with J = ∂Δθ/∂(p.grad), the diagonal D
    plus the clipping factor's rank-one term (NextStep.pullback)."""

    state: AdamState
    max_grad_norm: float | None
    lr: float | Sequence[float] | None
    v_y: str = "linear"

    name = "optimizer"

    @property
    def source(self) -> str:
        return self.state.source

    @property
    def eta(self) -> float:
        first = next(iter(self.state.params.values())).group
        return group_lrs(self.state.params, self.lr)[first]

    def take(self, g_u: Mapping[str, Tensor], lora: Mapping[str, Tensor]) -> StepView:
        eta = self.eta
        nxt = self.state.step({k: -v for k, v in g_u.items()}, lora, max_grad_norm=self.max_grad_norm,
                              lr=self.lr)  # fmt: skip
        direction = {k: v / eta for k, v in nxt.delta.items()}
        return StepView(direction=direction, parts=nxt,
                        pullback=lambda v: {k: -b / eta for k, b in nxt.pullback(v).items()})  # fmt: skip


def step_of(
    lora: Mapping[str, Tensor],
    *,
    preconditioner: Preconditioner | None,
    eta: float | None,
    optimizer: torch.optim.Optimizer | AdamState | None,
    named_params: Mapping[str, Parameter] | Iterable[tuple[str, Parameter]] | None,
    max_grad_norm: float | None,
    lr: float | Sequence[float] | None,
    step: str | None,
    v_y: str,
) -> OptimizerStep | PreconditionedStep:
    """The step the probe follows, checked against the LoRA dict before any gradient."""
    if step is None:
        step = "preconditioned" if preconditioner is not None else "optimizer"
    if step not in STEPS:
        raise ValueError(f"step={step!r}; expected one of {STEPS}")
    if v_y not in V_Y:
        raise ValueError(f"v_y={v_y!r}; expected one of {V_Y}")
    if step == "preconditioned":
        if preconditioner is None or optimizer is not None:
            raise ValueError("step='preconditioned' needs preconditioner= and eta= (and no optimizer=)")
        eta = check_step_size(eta, "probe: eta")
        if v_y != "linear":
            raise ValueError("v_y='jackknife' is for step='optimizer': the preconditioned step is linear "
                             "in the gradient, its V_Y is exact")  # fmt: skip
        if max_grad_norm is not None or lr is not None:
            raise ValueError("max_grad_norm= and lr= are for step='optimizer'; the preconditioned step "
                             "is η·P(g) with eta=")  # fmt: skip
        return PreconditionedStep(preconditioner, eta)
    if optimizer is None or preconditioner is not None or eta is not None:
        raise ValueError("step='optimizer' needs optimizer= (a live optimizer with named_params=, or an "
                         "AdamState) and no preconditioner=/eta= (η is the optimizer's lr)")  # fmt: skip
    if isinstance(optimizer, AdamState):
        if named_params is not None:
            raise ValueError("named_params= is for a live optimizer; an AdamState is already matched")
        state = optimizer
    else:
        if named_params is None:
            raise ValueError("a live optimizer needs named_params= (name -> the Parameter it steps)")
        state = AdamState.from_optimizer(optimizer, named_params)
    state.check_shapes({k: v.shape for k, v in lora.items()})
    out = OptimizerStep(state, max_grad_norm, lr, v_y)
    check_step_size(out.eta, "the optimizer's lr (param group 0, the η of δH₁)")
    clip_factor({}, max_grad_norm)  # validates max_grad_norm now
    return out


def has_pseudo_values(step: OptimizerStep | PreconditionedStep) -> bool:
    """Whether the probe's t already are U's delete-one jackknife pseudo-values: v_y="jackknife",
    or the preconditioned step (linear in g_U, so n·θ̂ − (n−1)·θ̂₋ₚ = t_p exactly)."""
    return step.v_y == "jackknife" or step.name == "preconditioned"


def jackknife_values(model, lora, U: Batch | None, step: OptimizerStep, g_u: Mapping[str, Tensor],
                     mu_x: Mapping[str, Tensor], n_u: int, *, microbatch, temperature, **_) -> Tensor:  # fmt: skip
    """`pseudo_values` over the prompts of U (a shard of the n_u prompts; None: empty), ∇Ly[p]
    by vmap(grad) over microbatches of `microbatch` prompts."""
    if U is None:
        return torch.empty(0, dtype=torch.float64)
    per = (per_sample_grads(model, lora, mb, loss="y", temperature=temperature) for mb in microbatches(U, microbatch))
    return pseudo_values(step, lora, g_u, mu_x, n_u, per)


def pseudo_values(step: OptimizerStep, lora: Mapping[str, Tensor], g_u: Mapping[str, Tensor],
                  mu_x: Mapping[str, Tensor], n_u: int, per_prompt: Iterable[Mapping[str, Tensor]]) -> Tensor:  # fmt: skip
    """Delete-one jackknife pseudo-values over the prompts p of U: with θ̂ = <μX, Δθ(g_U)>/η and
    θ̂₋ₚ the same for g_U without prompt p, (n_u·g_U − ∇Ly[p])/(n_u − 1),

        t_p = n_u·θ̂ − (n_u − 1)·θ̂₋ₚ        (float64 [prompts])

    so sample_var(t)/n_u is the jackknife variance (n_u − 1)/n_u · Σ(θ̂₋ₚ − mean)², and t_p equals
    the linearised projection up to a constant when Δθ is linear in g_U. `per_prompt`: dicts of
    [m, *shape] ∇Ly[p] (chunks of U's prompts, in order); one optimizer step per prompt.

    The probe's `se_jackknife` = η·sqrt(J_E + J_U + 2·C_J) is the two-sample delete-one-prompt
    jackknife of θ̂ = δH₁/η: J_E over E's prompts (μX without prompt n, the step kept), J_U =
    sample_var(t)/n_u from these, C_J = `probe.cross_of` of the shared prompts' pseudo-values.
    θ̂ is linear in μX, so E's pseudo-values are s and J_E = V_X."""
    eta = step.eta

    def value(g: Mapping[str, Tensor]) -> float:
        nxt = step.state.step({k: -v for k, v in g.items()}, lora, max_grad_norm=step.max_grad_norm, lr=step.lr)
        return dot64(mu_x, nxt.delta) / eta

    full = value(g_u)
    out = []
    for per in per_prompt:
        for i in range(len(next(iter(per.values())))):
            out.append(n_u * full - (n_u - 1) * value({k: (n_u * g_u[k] - per[k][i]) / (n_u - 1) for k in g_u}))
    return torch.tensor(out, dtype=torch.float64)
