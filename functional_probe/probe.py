"""The whole δH₁ probe: μX over E, the step from mean ∇Ly over U, projections both ways, standard errors.

Two steps: the exact next step of the user's optimizer (`optimizer=`; `OptimizerStep`) or the
seed's preconditioned step η·P(μY) (`preconditioner=`, `eta=`;
`PreconditionedStep`).
Cost: two reverse passes (μX, mean ∇Ly) and two projection passes (s on E, t on U); no per-prompt
backward loops. Formulas: DESIGN §1.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import Tensor
from torch.nn import Parameter

from .alpha import check_response_microbatch, shard_projections
from .batch import Batch
from .calibration import welch_dof
from .distributed import (
    agree,
    all_gather_vector,
    all_moments,
    global_counts,
    is_distributed,
    prompt_count,
    rank_and_world,
    sharded,
)
from .grads import dot64, mean_grad, require_batch
from .model import FunctionalModel
from .optim_step import AdamState
from .probe_step import Preconditioner, StepView, has_pseudo_values, jackknife_values, step_of
from .stats import Moments, moments
from .x_estimators import check_rb_split, check_x_estimator


@dataclass
class ProbeResult:
    """δH₁ = η·bars_dot and its uncertainty. Variances are of the mean, per unit step (no η);
    `se`, `se_conditional` and `delta_h1` are scaled by η. `s` [B_E] and `t` [B_U] are the
    projections; `shared_prompts` counts prompts found in both E and U (cross term included).

    `step` says which step: "optimizer" (Δθ the optimizer takes next; η = its first group's lr,
    bars_dot = <μX, Δθ>/η) or "preconditioned" (the seed's η·P(μY), bars_dot = <μX, μY>).
    For "optimizer", `delta_h1_gradient`, `_momentum`, `_decay` split δH₁ = <μX, Δθ> into this
    batch's gradient part and the momentum and weight-decay parts (they sum to `delta_h1`);
    `clip_coef` is the gradient-clipping factor applied (1.0: none); `optimizer` names it.
    These are None for the preconditioned step, which has no such parts. `ranks`: how many
    processes' shards made up E and U (1 unless distributed=True). `x_estimator`: the X loss
    whose gradient μX is ("loo" | "rb", `x_estimators`). `se_jackknife`: the delete-one-prompt
    jackknife SE of δH₁ over E and U (formula: `probe_step.pseudo_values`), scaled by η. `dof`: the
    Welch–Satterthwaite degrees of freedom of V_X + V_Y on B_E − 1 and B_U − 1 (C_XY left out)."""

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
    step: str = "preconditioned"
    optimizer: str | None = None
    clip_coef: float | None = None
    delta_h1_gradient: float | None = None
    delta_h1_momentum: float | None = None
    delta_h1_decay: float | None = None
    v_y: str = "linear"
    ranks: int = 1
    x_estimator: str = "loo"
    se_jackknife: float | None = None
    dof: float | None = None

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
    """C_XY = Cov(s̄, t̄) from the moments `m` of the k = m.n prompts in both batches:
    k/(B_E·B_U) · Σ_pairs(s−s̄)(t−t̄)/(k−1); with E = U, Σ(s_n − s̄)(t_n − t̄)/(B(B−1)); 0 for k < 2."""
    return m.n / (B_E * B_U) * m.sample_cov() if m.n >= 2 else 0.0


def probe(
    model: FunctionalModel,
    lora: Mapping[str, Tensor],
    E: Batch | None,
    U: Batch | None,
    *,
    optimizer: torch.optim.Optimizer | AdamState | None = None,
    named_params: Mapping[str, Parameter] | Iterable[tuple[str, Parameter]] | None = None,
    max_grad_norm: float | None = None,
    lr: float | Sequence[float] | None = None,
    preconditioner: Preconditioner | None = None,
    eta: float | None = None,
    step: str | None = None,
    v_y: str = "linear",
    method: str = "jvp",
    weighting: str = "dr_grpo",
    microbatch: int | None = None,
    response_microbatch: int | None = None,
    temperature: float = 1.0,
    progress: Callable[[str], None] | None = None,
    distributed: bool | None = None,
    x_estimator: str = "loo",
) -> ProbeResult:
    """δH₁ of one step from θ = `lora`, with SE = η·sqrt(V_X + V_Y + 2·C_XY).

    step="optimizer" (given `optimizer=`): Δθ is the exact next step of the optimizer (torch
    Adam/AdamW, bitsandbytes Adam-family; live with `named_params=`, or an `AdamState` read from
    a saved state) for p.grad = −g_U, g_U = mean_p ∇Ly[p] (the trainer minimises −Ly, as
    `cli_demo.adamw_state` does), after clip_grad_norm_(`max_grad_norm`), at the groups' current lr
    (or `lr=`, see `AdamState.step`); weight decay acts on `lora`. δH₁ = <μX, Δθ>, η = the first
    group's lr, μY = Δθ/η, s_n = <X_n, μY>. Δθ depends on U non-linearly (m, v, clipping), so V_Y
    is linearised: t_p = <∇Ly[p], −Jᵀ μX>/η, J = ∂Δθ/∂p.grad = diag(D) + the clipping factor's
    rank-one term (D includes v's dependence on g); the momentum and decay parts carry no
    U-variance. `v_y="jackknife"` replaces t by leave-one-prompt-out pseudo-values (see
    `probe_step.jackknife_values`; one per-sample gradient pass over U, one step per prompt) for
    where the linearisation fails, e.g. the first step (Adam ≈ −lr·sign(g)). The split of δH₁
    into gradient, momentum and decay parts is reported.

    step="preconditioned" (given `preconditioner=`, `eta=`): the seed's step θ + η·μY with
    μY = P(g_U), Adam's denominator from the state before the step, no momentum, no decay;
    t_p = <∇Ly[p], P(μX)>.

    V_X = Σ(s_n − s̄)²/(B_E(B_E−1)); V_Y likewise from t. C_XY ≠ 0 only when E and U share prompts
    (compared by token ids). `se_conditional` = η·sqrt(V_X), the SE given U. `progress(phase)` is
    called before each phase. The optimizer state is matched to `lora` (names and
    shapes) before any gradient is computed. `response_microbatch` splits each prompt's responses
    over the reverse passes of μX, g_U and method="loop" (see `mean_grad`); "jvp" needs no split.

    `distributed=True` (under a process group; every rank must call, else a ValueError naming
    the missing ranks after the rendezvous timeout): E and U are this rank's shards (`None`:
    empty); see `sharded_probe`. `distributed=False`: this process's E and U alone, even under
    a group. None under a group of several ranks raises, asking for one of the two.

    `x_estimator`: the X loss of μX and s ("loo": the leave-one-out score-function loss;
    "rb": per-token entropies + entropy-to-go score term, `x_estimators`; dr_grpo only, no
    `response_microbatch`). `se_jackknife` (`probe_step.pseudo_values`) costs an extra phase
    (one per-sample gradient pass over U, one step per prompt) only for step="optimizer" with
    v_y="linear"; v_y="jackknife" gives se = se_jackknife for the price of that phase alone.
    """
    stepper = step_of(lora, preconditioner=preconditioner, eta=eta, optimizer=optimizer,
                      named_params=named_params, max_grad_norm=max_grad_norm, lr=lr, step=step, v_y=v_y)  # fmt: skip
    check_response_microbatch(method, response_microbatch)
    check_x_estimator(x_estimator, weighting)
    check_rb_split("x", x_estimator, response_microbatch)
    kw = dict(method=method, weighting=weighting, microbatch=microbatch, response_microbatch=response_microbatch,
              temperature=temperature, x_estimator=x_estimator)  # fmt: skip
    if is_distributed(distributed, "probe"):
        with sharded("probe"):
            return sharded_probe(model, lora, E, U, stepper=stepper, progress=progress, **kw)
    for name, b in (("E", E), ("U", U)):
        require_batch(b, "probe")
        if len(b) < 2:
            raise ValueError(f"the probe needs at least 2 prompts in {name} for a variance, got {len(b)}")
    U.require_advantages("probe: the update batch U")
    timings: dict[str, float] = {}
    mu_x, view, s, t, t_jack = four_phases(model, lora, E, U, stepper, progress, timings, n_u=len(U),
                                           distributed=False, **kw)  # fmt: skip
    parts = probe_moments(s, t, t_jack, shared_pairs(E, U))
    return assemble(mu_x, view, stepper, parts, s, t, timings=timings, **kw)


def probe_moments(s: Tensor, t: Tensor, t_jack: Tensor, pairs: list[tuple[int, int]]) -> list[Moments]:
    """[moments of s, of t, of the shared (s, t) pairs, of t_jack, of the shared (s, t_jack) pairs]."""
    return [moments(s), moments(t), pair_moments(s, t, pairs), moments(t_jack), pair_moments(s, t_jack, pairs)]


def four_phases(model, lora, E, U, stepper, progress, timings, *, n_u: int, distributed: bool, method,
                weighting, **kw):  # fmt: skip
    """μX, the step from g_U = mean ∇Ly, s on E and t on U (linearised projections, or jackknife
    pseudo-values over the n_u prompts of U), and U's jackknife pseudo-values t_jack (t itself
    when t already is them, `has_pseudo_values`), each phase timed. With `distributed`, E and U are
    shards: the means are global (all_reduce), s, t and t_jack local, local errors agreed."""
    say = progress or (lambda _: None)
    with timed(timings, "total"):
        say("mean X gradient over E")
        with timed(timings, "mu_x"):
            mu_x = mean_grad(model, lora, E, loss="x", weighting=weighting, distributed=distributed, **kw)
        say(f"mean Y gradient over U and the {stepper.name} step")
        with timed(timings, "mu_y"):
            g_u = mean_grad(model, lora, U, loss="y", distributed=distributed, **kw)
            view = stepper.take(g_u, lora)
        project = agree if distributed else (lambda fn, *a, **k: fn(*a, **k))
        say("projections s of E on the step")
        with timed(timings, "proj_s"):
            s = project(shard_projections, model, lora, E, view.direction, loss="x", weighting=weighting,
                        method=method, **kw)  # fmt: skip
        with timed(timings, "proj_t"):
            if stepper.v_y == "jackknife":
                say("jackknife over the prompts of U")
                t = project(jackknife_values, model, lora, U, stepper, g_u, mu_x, n_u, **kw)
            else:
                say("projections t of U on the step's pullback of mu_X")
                t = project(shard_projections, model, lora, U, view.pullback(mu_x), loss="y", method=method, **kw)
        t_jack = t
        if not has_pseudo_values(stepper):
            say("jackknife pseudo-values over the prompts of U (for se_jackknife)")
            with timed(timings, "jackknife"):
                t_jack = project(jackknife_values, model, lora, U, stepper, g_u, mu_x, n_u, **kw)
    return mu_x, view, s, t, t_jack


def sharded_probe(model, lora, E: Batch | None, U: Batch | None, *, stepper, progress, **kw) -> ProbeResult:
    """The probe with E and U sharded over the ranks of the process group. Each rank:

    1. all_reduces the shard sizes -> B_E, B_U (< 2 raises ValueError on every rank);
    2. sums its shard's X (Y) gradients; one float64 all_reduce each gives μX and g_U, from
       which every rank computes the same step (μY and the pullback b);
    3. projects its shard: s_n = <X_n, μY>, t_p = <∇Ly[p], b(μX)> (local, no communication);
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
    mu_x, view, s, t, t_jack = four_phases(model, lora, E, U, stepper, progress, timings, n_u=B_U,
                                           distributed=True, **kw)  # fmt: skip
    pairs = shared_pairs(E, U) if E is not None and U is not None else []
    local = agree(probe_moments, s, t, t_jack, pairs)  # a non-finite s raises
    s_all, t_all = all_gather_vector(s), all_gather_vector(t)
    result = assemble(mu_x, view, stepper, all_moments(local), s_all, t_all, timings=timings, **kw)
    return replace(result, ranks=rank_and_world()[1])


def assemble(mu_x, view: StepView, stepper, parts: Sequence[Moments], s: Tensor, t: Tensor, *,
             timings: dict[str, float], method: str, weighting: str, x_estimator: str = "loo",
             **_) -> ProbeResult:  # fmt: skip
    """ProbeResult from the means, the step and the (global) `probe_moments`."""
    m_s, m_t, m_c, m_tj, m_cj = parts
    eta = stepper.eta
    V_X, V_Y = m_s.var_of_mean_x(), m_t.var_of_mean_x()
    C_XY = cross_of(m_c, m_s.n, m_t.n)
    var_jack = V_X + m_tj.var_of_mean_x() + 2 * cross_of(m_cj, m_s.n, m_tj.n)
    bars_dot = dot64(mu_x, view.direction)
    split = {}
    if view.parts is not None:
        split = {f"delta_h1_{k}": dot64(mu_x, getattr(view.parts, k)) for k in ("gradient", "momentum", "decay")}
        split["clip_coef"] = view.parts.clip_coef
    return ProbeResult(
        eta=eta, bars_dot=bars_dot, delta_h1=eta * bars_dot, V_X=V_X, V_Y=V_Y, C_XY=C_XY,
        se=abs(eta) * math.sqrt(max(V_X + V_Y + 2 * C_XY, 0.0)), se_conditional=abs(eta) * math.sqrt(V_X),
        B_E=m_s.n, B_U=m_t.n, shared_prompts=m_c.n, method=method, weighting=weighting,
        s=s.double().tolist(), t=t.double().tolist(), timings=timings, step=stepper.name,
        optimizer=stepper.source, v_y=stepper.v_y, x_estimator=x_estimator,
        se_jackknife=abs(eta) * math.sqrt(max(var_jack, 0.0)), dof=welch_dof([V_X, V_Y], [m_s.n - 1, m_t.n - 1]), **split,
    )  # fmt: skip
