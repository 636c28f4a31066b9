"""The whole δH₁ probe: μX over E, μY = P(mean ∇Ly) over U, projections both ways, standard errors.

Cost: two reverse passes (μX, μY) and two projection passes (s on E, t on U); no per-prompt
backward loops. Formulas: DESIGN §1.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

from torch import Tensor

from .alpha import alpha_projections
from .batch import Batch
from .grads import dot, mean_grad
from .model import FunctionalModel
from .stats import moments

Preconditioner = Callable[[Mapping[str, Tensor]], dict[str, Tensor]]


@dataclass
class ProbeResult:
    """δH₁ = η·<μX, μY> and its uncertainty. Variances are of the mean, per unit step (no η);
    `se`, `se_conditional` and `delta_h1` are scaled by η. `s` [B_E] and `t` [B_U] are the
    projections; `shared_prompts` counts prompts found in both E and U (cross term included)."""

    eta: float
    bars_dot: float
    delta_h1: float
    V_X: float
    V_Y: float
    C_XY: float
    se: float
    se_conditional: float
    B_E: int
    B_U: int
    shared_prompts: int
    method: str
    weighting: str
    s: list[float]
    t: list[float]
    timings: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> ProbeResult:
        return cls(**json.loads(text))


@contextmanager
def timed(timings: dict[str, float], name: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    timings[name] = time.perf_counter() - start


def shared_pairs(E: Batch, U: Batch) -> list[tuple[int, int]]:
    """(n, p) for every prompt of E whose token ids equal a prompt of U (first match)."""

    def prompts(b: Batch) -> list[tuple[int, ...]]:
        p = b.prompt_end
        return [tuple(b.input_ids[i, 0, p - int(b.prompt_lengths[i]) : p].tolist()) for i in range(len(b))]

    index = {}
    for p, key in enumerate(prompts(U)):
        index.setdefault(key, p)
    return [(n, index[key]) for n, key in enumerate(prompts(E)) if key in index]


def cross_term(s: Tensor, t: Tensor, pairs: list[tuple[int, int]]) -> float:
    """C_XY = Cov(s̄, t̄) from prompts in both batches: k/(B_E·B_U) · Σ_pairs(s−s̄)(t−t̄)/(k−1).

    With E and U the same batch this is Σ(s_n − s̄)(t_n − t̄)/(B(B−1)); no pairs give 0.
    """
    k = len(pairs)
    if k < 2:
        return 0.0
    m = moments(s[[n for n, _ in pairs]], t[[p for _, p in pairs]])
    return k / (len(s) * len(t)) * m.sample_cov()


def probe(
    model: FunctionalModel,
    lora: Mapping[str, Tensor],
    E: Batch,
    U: Batch,
    *,
    preconditioner: Preconditioner,
    eta: float,
    method: str = "jvp",
    weighting: str = "dr_grpo",
    microbatch: int | None = None,
    temperature: float = 1.0,
    progress: Callable[[str], None] | None = None,
) -> ProbeResult:
    """δH₁ of one preconditioned step θ → θ + η·μY, with SE = η·sqrt(V_X + V_Y + 2·C_XY).

    V_X = Σ(s_n − s̄)²/(B_E(B_E−1)) with s_n = <X_n, μY>; V_Y likewise with t_p = <∇Ly[p], P(μX)>
    (P diagonal, so = <Y_p, μX>). C_XY ≠ 0 only when E and U share prompts (compared by token
    ids). `se_conditional` = η·sqrt(V_X), the SE given U. `progress(phase)` is called before
    each of the four phases.
    """
    for name, b in (("E", E), ("U", U)):
        if len(b) < 2:
            raise ValueError(f"the probe needs at least 2 prompts in {name} for a variance, got {len(b)}")
    say = progress or (lambda _: None)
    kw = dict(microbatch=microbatch, temperature=temperature)
    timings: dict[str, float] = {}
    with timed(timings, "total"):
        say("mean X gradient over E")
        with timed(timings, "mu_x"):
            mu_x = mean_grad(model, lora, E, loss="x", weighting=weighting, **kw)
        say("preconditioned mean Y gradient over U")
        with timed(timings, "mu_y"):
            mu_y = mean_grad(model, lora, U, loss="y", preconditioner=preconditioner, **kw)
        say("projections s of E on mu_Y")
        with timed(timings, "proj_s"):
            s = alpha_projections(model, lora, E, mu_y, loss="x", weighting=weighting, method=method, **kw)
        say("projections t of U on P(mu_X)")
        with timed(timings, "proj_t"):
            t = alpha_projections(model, lora, U, preconditioner(mu_x), loss="y", method=method, **kw)
    pairs = shared_pairs(E, U)
    V_X, V_Y = moments(s).var_of_mean_x(), moments(t).var_of_mean_x()
    C_XY = cross_term(s, t, pairs)
    bars_dot = float(dot({k: v.double() for k, v in mu_x.items()}, mu_y))
    return ProbeResult(
        eta=float(eta), bars_dot=bars_dot, delta_h1=eta * bars_dot, V_X=V_X, V_Y=V_Y, C_XY=C_XY,
        se=abs(eta) * math.sqrt(max(V_X + V_Y + 2 * C_XY, 0.0)), se_conditional=abs(eta) * math.sqrt(V_X),
        B_E=len(E), B_U=len(U), shared_prompts=len(pairs), method=method, weighting=weighting,
        s=s.double().tolist(), t=t.double().tolist(), timings=timings,
    )  # fmt: skip
