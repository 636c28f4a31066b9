"""Curvature of the entropy along a step: δH₂ = s²/2 · d²H/ds², and where first order ends.

Along θ(s) = θ + s·Δθ, with S = S_θ(s)(y) (at temperature τ), Ṡ = dS/ds, S̈ = d²S/ds² and
Lmax[n] fixed, H_n(s) = E_{y~π_s}[f], f = −S/Lmax. Differentiating Σ_y π_s(y) f_s(y) with
dπ/ds = π·Ṡ and d²π/ds² = π·(Ṡ² + S̈):

    dH/ds   = E[Ṡ f + ḟ]                      = −E[Ṡ·S] / Lmax              (E[Ṡ] = 0)
    d²H/ds² = E[(Ṡ² + S̈) f + 2 Ṡ ḟ + f̈]      = −E[(Ṡ² + S̈)(S + 1) + Ṡ²] / Lmax
                                               = −E[(Ṡ² + S̈)(S − b) + Ṡ²] / Lmax

for any b independent of y, because E[Ṡ² + S̈] = d²/ds² Σ_y π = 0 (likewise E[Ṡ] = 0 lets b
enter dH/ds). With G responses per prompt drawn from π_θ, b_g = the leave-one-out mean of S
keeps each term unbiased; dH/ds is then exactly the dr_grpo X loss's <∇Lx, Δθ>, so d1 below is
δH₁ per unit s for this step. Ṡ and S̈ come from nested forward mode — `torch.func.jvp` of a jvp
over the plain pure forward (`sequence_logprobs`), one pass per microbatch.

Per prompt d1_n, d2_n; d1 = mean_n d1_n, d2 = mean_n d2_n, each ± SE over prompts (float64,
stats.moments); δH₁(s) = s·d1, δH₂(s) = s²/2·d2, and s* = 2·fraction·|d1| / |d2| is where
|δH₂| = fraction·|δH₁|: the edge of the first-order range (its SE by the delete-one jackknife
over prompts).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch
from torch import Tensor
from torch.func import jvp

from .batch import Batch
from .logprobs import check_temperature, prepared, sequence_logprobs
from .model import FunctionalModel
from .model.functional import check_same_keys_and_shapes
from .stats import jackknife_se, moments


def step_derivatives(
    model: FunctionalModel, lora: Mapping[str, Tensor], step: Mapping[str, Tensor], batch: Batch, *,
    temperature: float = 1.0, microbatch: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """(S, Ṡ, S̈), each [N, G] float64: S(lora + s·step) and its first two s-derivatives at s = 0,
    by jvp of jvp over `sequence_logprobs` (`microbatch` prompts per pass)."""
    model.check_lora(lora)
    check_same_keys_and_shapes({k: v.shape for k, v in lora.items()}, step, what="step", owner="lora")
    temperature = check_temperature(temperature)
    batch = prepared(model, batch)
    step = {k: step[k].to(lora[k].dtype) for k in lora}  # in lora's key order: jvp matches trees by structure
    parts = []
    for part in batch.split(microbatch or len(batch)):

        def logprobs(theta, part=part):
            return sequence_logprobs(model, theta, part, temperature=temperature)

        def first(theta, logprobs=logprobs):
            S, S_dot = jvp(logprobs, (theta,), (step,))
            return S_dot, S

        S_dot, S_ddot, S = jvp(first, (dict(lora),), (step,), has_aux=True)
        parts.append([t.detach().double() for t in (S, S_dot, S_ddot)])
    return tuple(torch.cat(col) for col in zip(*parts, strict=True))


def entropy_derivatives(
    S: Tensor, S_dot: Tensor, S_ddot: Tensor, lmax: Tensor, weights: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Per prompt (dH_n/ds, d²H_n/ds²), each [N] float64, from S, Ṡ, S̈ [N, G] and Lmax [N].

    Without `weights`: the responses are G draws from π and the Monte-Carlo terms with the
    leave-one-out baseline b are averaged (module docstring). With `weights` [N, G] (π(y) of an
    exhaustive list of responses, rows summing to 1): the exact expectations, b = 0.
    """
    S, S_dot, S_ddot = (t.double() for t in (S, S_dot, S_ddot))
    group = S.shape[1]
    if weights is None:
        if group < 2:
            raise ValueError(f"the leave-one-out baseline needs at least 2 responses per prompt, got G = {group}")
        centred = S - (S.sum(1, keepdim=True) - S) / (group - 1)
        mean = lambda t: t.mean(1)  # noqa: E731
    else:
        centred = S
        mean = lambda t: (weights.double() * t).sum(1)  # noqa: E731
    lmax = lmax.double().to(S.device)
    d1 = -mean(S_dot * centred) / lmax
    d2 = -mean((S_dot.square() + S_ddot) * centred + S_dot.square()) / lmax
    return d1, d2


@dataclass(frozen=True)
class Curvature:
    """Entropy along a step, per unit scale: δH₁(s) = s·d1, δH₂(s) = s²/2·d2 (nats per token)."""

    d1: float
    d1_se: float
    d2: float
    d2_se: float
    fraction: float
    s_star: float | None  # |δH₂(s*)| = fraction·|δH₁(s*)|; None when d2 = 0
    s_star_se: float | None  # delete-one jackknife over prompts (stats.jackknife_se)
    B_E: int
    group_size: int
    d1_per_prompt: list[float]
    d2_per_prompt: list[float]

    def delta_h2(self, scale: float) -> tuple[float, float]:
        """(δH₂, SE) at `scale`: s²/2 · (d2, d2_se)."""
        return 0.5 * scale**2 * self.d2, 0.5 * scale**2 * self.d2_se

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def curvature(
    model: FunctionalModel, lora: Mapping[str, Tensor], step: Mapping[str, Tensor], E: Batch, *,
    fraction: float = 0.1, temperature: float = 1.0, microbatch: int | None = None,
) -> Curvature:  # fmt: skip
    """d1 = dH/ds and d2 = d²H/ds² along θ + s·`step` from E's responses (draws from π_θ at τ),
    each ± SE over prompts, and s* where |δH₂| = `fraction`·|δH₁|. Lmax = E.max_lengths."""
    if not (isinstance(fraction, int | float) and 0 < fraction < math.inf):
        raise ValueError(f"fraction={fraction!r}; expected a finite number > 0")
    if not isinstance(E, Batch) or len(E) < 2:
        raise ValueError(f"E must be a Batch of at least 2 prompts (the SE is over prompts), got {E!r:.80}")
    if E.group_size < 2:
        raise ValueError(f"curvature needs at least 2 responses per prompt in E, got G = {E.group_size}")
    S, S_dot, S_ddot = step_derivatives(model, lora, step, E, temperature=temperature, microbatch=microbatch)
    d1_n, d2_n = entropy_derivatives(S, S_dot, S_ddot, E.max_lengths)
    m1, m2 = moments(d1_n), moments(d2_n)
    s_star = s_star_se = None
    if m2.mean_x != 0:
        s_star = 2 * fraction * abs(m1.mean_x) / abs(m2.mean_x)
        s_star_se = jackknife_se(torch.stack([d1_n, d2_n], 1), lambda m: 2 * fraction * m[:, 0].abs() / m[:, 1].abs())
    return Curvature(
        d1=m1.mean_x, d1_se=math.sqrt(m1.var_of_mean_x()), d2=m2.mean_x, d2_se=math.sqrt(m2.var_of_mean_x()),
        fraction=float(fraction), s_star=s_star, s_star_se=s_star_se, B_E=len(E), group_size=E.group_size,
        d1_per_prompt=d1_n.tolist(), d2_per_prompt=d2_n.tolist(),
    )  # fmt: skip
