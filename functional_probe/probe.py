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

from .alpha import shard_projections
from .batch import Batch
from .distributed import (
    agree,
    all_gather_vector,
    all_moments,
    global_counts,
    is_distributed,
    prompt_count,
    rank_and_world,
)
from .grads import dot64, mean_grad, require_batch
from .model import FunctionalModel
from .stats import Moments, moments
from .validation import check_step_size

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
        return cls(**{k: v for k, v in json.loads(text).items() if k in cls.__dataclass_fields__})


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


def pair_moments(s: Tensor, t: Tensor, pairs: list[tuple[int, int]]) -> Moments:
    """Paired moments of (s_n, t_p) over the shared prompts: n = k, c_xy = Σ(s−s̄)(t−t̄)."""
    return moments(s[[n for n, _ in pairs]], t[[p for _, p in pairs]])


def cross_of(m: Moments, B_E: int, B_U: int) -> float:
    """C_XY = k/(B_E·B_U) · c_xy/(k−1) from the pair moments `m` (k = m.n); 0 for k < 2."""
    return m.n / (B_E * B_U) * m.sample_cov() if m.n >= 2 else 0.0


def cross_term(s: Tensor, t: Tensor, pairs: list[tuple[int, int]]) -> float:
    """C_XY = Cov(s̄, t̄) from prompts in both batches: k/(B_E·B_U) · Σ_pairs(s−s̄)(t−t̄)/(k−1).

    With E and U the same batch this is Σ(s_n − s̄)(t_n − t̄)/(B(B−1)); no pairs give 0.
    """
    return cross_of(pair_moments(s, t, pairs), len(s), len(t))


def probe(
    model: FunctionalModel,
    lora: Mapping[str, Tensor],
    E: Batch | None,
    U: Batch | None,
    *,
    preconditioner: Preconditioner,
    eta: float,
    method: str = "jvp",
    weighting: str = "dr_grpo",
    microbatch: int | None = None,
    temperature: float = 1.0,
    progress: Callable[[str], None] | None = None,
    distributed: bool | None = None,
) -> ProbeResult:
    """δH₁ of one preconditioned step θ → θ + η·μY, with SE = η·sqrt(V_X + V_Y + 2·C_XY).

    V_X = Σ(s_n − s̄)²/(B_E(B_E−1)) with s_n = <X_n, μY>; V_Y likewise with t_p = <∇Ly[p], P(μX)>
    (P diagonal, so = <Y_p, μX>). C_XY ≠ 0 only when E and U share prompts (compared by token
    ids). `se_conditional` = η·sqrt(V_X), the SE given U. `progress(phase)` is called before
    each of the four phases.

    Under torch.distributed (`distributed=None` and a process group initialized, or True)
    E and U are this rank's shards (`None`: empty); see `sharded_probe`.
    """
    eta = check_step_size(eta, "probe: eta")
    kw = dict(method=method, weighting=weighting, microbatch=microbatch, temperature=temperature)
    if is_distributed(distributed):
        return sharded_probe(model, lora, E, U, preconditioner=preconditioner, eta=eta,
                             progress=progress, **kw)  # fmt: skip
    for name, b in (("E", E), ("U", U)):
        require_batch(b, "probe")
        if len(b) < 2:
            raise ValueError(f"the probe needs at least 2 prompts in {name} for a variance, got {len(b)}")
    U.require_advantages("probe: the update batch U")
    timings: dict[str, float] = {}
    mu_x, mu_y, s, t = four_phases(model, lora, E, U, preconditioner, progress, timings,
                                   distributed=False, **kw)  # fmt: skip
    m_s, m_t, m_c = moments(s), moments(t), pair_moments(s, t, shared_pairs(E, U))
    return assemble(mu_x, mu_y, m_s, m_t, m_c, s, t, eta=eta, timings=timings, **kw)


def four_phases(model, lora, E, U, preconditioner, progress, timings, *, distributed: bool, method,
                weighting, **kw):  # fmt: skip
    """μX, μY = P(mean ∇Ly), s on E and t on U, each phase timed. With `distributed`, E and U
    are shards: the means are global (all_reduce), s and t local, local errors agreed."""
    say = progress or (lambda _: None)
    with timed(timings, "total"):
        say("mean X gradient over E")
        with timed(timings, "mu_x"):
            mu_x = mean_grad(model, lora, E, loss="x", weighting=weighting, distributed=distributed, **kw)
        say("preconditioned mean Y gradient over U")
        with timed(timings, "mu_y"):
            mu_y = mean_grad(model, lora, U, loss="y", preconditioner=preconditioner,
                             distributed=distributed, **kw)  # fmt: skip
        project = agree if distributed else (lambda fn, *a, **k: fn(*a, **k))
        say("projections s of E on mu_Y")
        with timed(timings, "proj_s"):
            s = project(shard_projections, model, lora, E, mu_y, loss="x", weighting=weighting,
                        method=method, **kw)  # fmt: skip
        say("projections t of U on P(mu_X)")
        with timed(timings, "proj_t"):
            t = project(
                shard_projections, model, lora, U, preconditioner(mu_x), loss="y", method=method, **kw
            )
    return mu_x, mu_y, s, t


def sharded_probe(model, lora, E: Batch | None, U: Batch | None, *, preconditioner, eta, progress,
                  **kw) -> ProbeResult:  # fmt: skip
    """The probe with E and U sharded over the ranks of the process group. Each rank:

    1. all_reduces the shard sizes -> B_E, B_U (< 2 raises ValueError on every rank);
    2. sums its shard's X (Y) gradients; one float64 all_reduce each gives μX, μY = P(Σ/B);
    3. projects its shard: s_n = <X_n, μY>, t_p = <Y_p, P(μX)> (local, no communication);
    4. all_gathers the float64 moments of s, of t and of the (s_n, t_p) pairs of prompts
       shared by its E and U shards (token ids), combines them with Chan in rank order;
    5. all_gathers s and t in rank order for the report.
    Result: the single-process ProbeResult of the unsharded E and U, identical on every rank
    except `timings` (this rank's). Limitation: a prompt of E is paired only with a prompt
    of U on the SAME rank; with E and U the same batch sharded alike, every pair is local.
    """
    B_E, B_U = global_counts(prompt_count(E), prompt_count(U))
    for name, b in (("E", B_E), ("U", B_U)):
        if b < 2:
            raise ValueError(f"the probe needs at least 2 prompts in {name} for a variance, got {b} "
                             f"across {rank_and_world()[1]} ranks")  # fmt: skip
    timings: dict[str, float] = {}
    mu_x, mu_y, s, t = four_phases(model, lora, E, U, preconditioner, progress, timings,
                                   distributed=True, **kw)  # fmt: skip
    pairs = shared_pairs(E, U) if E is not None and U is not None else []
    local = agree(lambda: [moments(s), moments(t), pair_moments(s, t, pairs)])  # a non-finite s raises
    m_s, m_t, m_c = all_moments(local)
    s_all, t_all = all_gather_vector(s), all_gather_vector(t)
    return assemble(mu_x, mu_y, m_s, m_t, m_c, s_all, t_all, eta=eta, timings=timings, **kw)


def assemble(mu_x, mu_y, m_s: Moments, m_t: Moments, m_c: Moments, s: Tensor, t: Tensor, *,
             eta: float, timings: dict[str, float], method: str, weighting: str, **_) -> ProbeResult:  # fmt: skip
    """ProbeResult from the means, the (global) moments of s, t and of the shared pairs."""
    V_X, V_Y = m_s.var_of_mean_x(), m_t.var_of_mean_x()
    C_XY = cross_of(m_c, m_s.n, m_t.n)
    bars_dot = dot64(mu_x, mu_y)
    return ProbeResult(
        eta=float(eta), bars_dot=bars_dot, delta_h1=eta * bars_dot, V_X=V_X, V_Y=V_Y, C_XY=C_XY,
        se=abs(eta) * math.sqrt(max(V_X + V_Y + 2 * C_XY, 0.0)), se_conditional=abs(eta) * math.sqrt(V_X),
        B_E=m_s.n, B_U=m_t.n, shared_prompts=m_c.n, method=method, weighting=weighting,
        s=s.double().tolist(), t=t.double().tolist(), timings=timings,
    )  # fmt: skip
