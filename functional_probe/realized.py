"""Does δH₁ come true? The entropy change that a step really makes, three ways, each ± SE.

With Lmax[n] = E.max_lengths[n] held fixed and S at the sampling temperature τ,

    H_n(θ) = E_{y ~ q_θ(·|prompt n)}[−S_θ(y)] / Lmax[n],     ΔH(s) = mean_n [H_n(θ + s·Δθ) − H_n(θ)],

q_θ being the sampling distribution (π = softmax(z/τ), after top-k/top-p when given). For each
scale s, per prompt n a difference d_n is formed and ΔH = mean_n d_n, SE = sqrt(Σ(d_n − d̄)² /
(N(N−1))) over prompts (float64, stats.moments):

* ``snis`` — self-normalized importance sampling on E's own G responses (which must be draws
  from π_θ; not with top-k/top-p, whose support moves with θ so that no weights on E's responses
  can cover q_θ'): ℓ_g = S'_g − S_g, truncated above at
  logmeanexp(ℓ) + c (c = ½·log G by default: weights capped at √G × their mean, Ionides 2008),
  w = softmax_g(ℓ), d_n = [Σ_g w_g (−S'_g) − mean_g(−S_g)] / Lmax[n]; effective sample size
  ESS_n = 1 / Σ_g w_g² is reported, and a warning raised when it falls below
  `ess_warn_fraction`·G. Not independent of the probe: its slope at s → 0 is the X loss's.
* ``crn`` — G' fresh responses per prompt at θ and at θ' from `sampling.sample` with the same
  seed (common random numbers: the same uniforms, so few responses differ at small s):
  d_n = [mean_g(−S'_g) − mean_g(−S_g)] / Lmax[n], the SE from these paired differences.
* ``rb`` — on the same samples, −S(y) replaced by Σ_t C_t, C_t = −Σ_v q_v log π_v the
  full-vocabulary (cross-)entropy at each response position (E[−log π(y_t) | y_<t] = C_t):
  d_n = mean_g(R'_g − R_g) / Lmax[n], lower variance at the same draws.
* ``rb_is`` — θ's fresh responses only, teacher-forced at θ', token entropies reweighted by
  prefix importance weights with a leave-one-out control variate (`realized_is`): smooth in s,
  its SE ∝ s at small s where crn/rb decouple; unfiltered sampling only, ESS and clip as snis.

`crn`, `rb` and `rb_is` estimate the H of the sampler settings passed here; `snis` that of whatever
produced E — equal when E was sampled with the same temperature, filters, EOS and length cap.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from .batch import Batch
from .entropy import DEFAULT_CHUNK_ROWS, TokenStats, check_filters, sequence_statistics
from .grads import dot64
from .logprobs import check_temperature, prepared
from .model import FunctionalModel
from .model.functional import check_same_keys_and_shapes
from .realized_is import capped_log_weights, effective_sample_size, rb_is_terms, samples_batch
from .sampling import Samples, check_sampling_args, sample
from .stats import moments

ESTIMATORS = ("snis", "crn", "rb", "rb_is")
REWEIGHTED = ("snis", "rb_is")  # importance weights: unfiltered sampling only


class EntropyEstimateWarning(UserWarning):
    """An estimate of the realized entropy change is unreliable (e.g. importance weights collapsed)."""


@dataclass(frozen=True)
class Estimate:
    """ΔH (nats per token, at one scale) by one estimator: value ± se over `per_prompt` d_n."""

    value: float
    se: float
    per_prompt: list[float]
    diagnostics: dict = field(default_factory=dict)


@dataclass(frozen=True)
class RealizedPoint:
    scale: float
    relative_step: float | None  # |s|·‖Δθ‖ / ‖θ‖ (None when θ = 0)
    estimates: dict[str, Estimate]
    step_rounding: float = 0.0  # ‖(θ + s·Δθ) − θ − s·Δθ‖ / ‖s·Δθ‖ in the LoRA dtype (bf16: coarse)


@dataclass(frozen=True)
class RealizedEntropyChange:
    """ΔH(s) for every scale and estimator; `baseline` holds H(θ) itself by each estimator."""

    points: list[RealizedPoint]
    baseline: dict[str, Estimate]
    estimators: list[str]
    num_prompts: int
    group_size: int  # G of E (snis)
    samples_per_prompt: int  # G' of the fresh samples (crn, rb)
    settings: dict  # temperature, top_k, top_p, eos_token_id, max_new_tokens, seed, snis_clip

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict) -> RealizedEntropyChange:
        est = lambda e: Estimate(**e)  # noqa: E731
        points = [RealizedPoint(**{**p, "estimates": {k: est(v) for k, v in p["estimates"].items()}})
                  for p in d["points"]]  # fmt: skip
        return cls(**{**d, "points": points, "baseline": {k: est(v) for k, v in d["baseline"].items()}})

    @classmethod
    def from_json(cls, text: str) -> RealizedEntropyChange:
        return cls.from_dict(json.loads(text))


def estimate(d: Tensor, **diagnostics) -> Estimate:
    """Mean ± SE over prompts of the per-prompt values d [N] (two-pass float64)."""
    m = moments(d)
    return Estimate(m.mean_x, math.sqrt(m.var_of_mean_x()), d.double().tolist(), diagnostics)


def snis_estimate(base: TokenStats, moved: TokenStats, lmax: Tensor, clip: float, ess_warn_fraction: float,
                  scale: float) -> Estimate:  # fmt: skip
    """The SNIS difference on E's responses, from teacher-forced stats at θ (`base`) and θ' (`moved`)."""
    log_w, clipped = capped_log_weights(moved.logp - base.logp, clip)  # [N, G]: S' − S
    w = log_w.softmax(1)
    d = ((w * -moved.logp).sum(1) - (-base.logp).mean(1)) / lmax
    return weighted_estimate("snis", d, effective_sample_size(log_w), log_w.shape[1], clipped, clip,
                             ess_warn_fraction, scale)  # fmt: skip


def weighted_estimate(name: str, d: Tensor, ess: Tensor, group: int, clipped: int, clip: float,
                      ess_warn_fraction: float, scale: float) -> Estimate:  # fmt: skip
    """Estimate of per-prompt d [N] with the importance weights' diagnostics; warns
    (EntropyEstimateWarning) when the smallest ESS [N] falls below `ess_warn_fraction`·`group`."""
    worst = int(ess.argmin())
    if float(ess[worst]) < ess_warn_fraction * group:
        warnings.warn(EntropyEstimateWarning(
            f"{name} at scale {scale}: effective sample size {float(ess[worst]):.2f} of {group} responses on "
            f"prompt {worst} (below {ess_warn_fraction} of them); the importance weights have collapsed at "
            "this step size, prefer crn/rb"), stacklevel=4)  # fmt: skip
    return estimate(d, clip=clip, clipped=clipped, ess_min=float(ess.min()), ess_mean=float(ess.mean()),
                    ess_per_prompt=ess.tolist())  # fmt: skip


def sampled_estimates(base: Samples, moved: Samples, lmax: Tensor, wanted: Sequence[str]) -> dict[str, Estimate]:
    """crn and rb paired differences between the coupled sample sets at θ and θ'."""
    differ = (base.tokens != moved.tokens).any(-1) | (base.lengths != moved.lengths)  # [N, G']
    diag = dict(differing_fraction=float(differ.double().mean()))
    out = {}
    if "crn" in wanted:
        out["crn"] = estimate((-moved.stats.logp + base.stats.logp).mean(1) / lmax, **diag)
    if "rb" in wanted:
        out["rb"] = estimate((moved.stats.entropy - base.stats.entropy).mean(1) / lmax, **diag)
    return out


def step_rounding(lora: Mapping[str, Tensor], theta: Mapping[str, Tensor], step: Mapping[str, Tensor], scale: float,
                  warn_above: float = 0.01) -> float:  # fmt: skip
    """Relative error of the step the LoRA dtype really takes, ‖(θ' − θ) − s·Δθ‖ / ‖s·Δθ‖ (float64);
    warns (EntropyEstimateWarning) above `warn_above`: in bf16, steps below ~1/256 of θ round away."""
    if scale == 0:
        return 0.0
    err = sum(float(((theta[k].double() - lora[k].double()) - scale * step[k].double()).square().sum()) for k in lora)
    size = scale**2 * dot64(step, step)
    rel = math.sqrt(err / size) if size > 0 else 0.0
    if rel > warn_above:
        warnings.warn(EntropyEstimateWarning(
            f"at scale {scale} the LoRA dtype {next(iter(lora.values())).dtype} rounds the step θ + s·Δθ "
            f"with relative error {rel:.2g}: the realized change is that of another step"), stacklevel=3)  # fmt: skip
    return rel


def check_arguments(model: FunctionalModel, lora, step, E, scales, estimators, ess_warn_fraction, snis_clip,
                    filters, samples_per_prompt):  # fmt: skip
    """ValueError naming the first bad argument; returns (scales, estimators) as lists."""
    model.check_lora(lora)
    check_same_keys_and_shapes({k: v.shape for k, v in lora.items()}, step, what="step", owner="lora")
    for k, v in step.items():
        if not bool(torch.isfinite(v).all()):
            raise ValueError(f"step[{k!r}] has a non-finite entry")
    if isinstance(scales, str | bytes) or not isinstance(scales, Sequence) or not scales:
        raise ValueError(f"scales={scales!r}; expected a non-empty sequence of finite numbers")
    for i, s in enumerate(scales):
        if isinstance(s, bool) or not isinstance(s, int | float) or not math.isfinite(s):
            raise ValueError(f"scales[{i}] = {s!r}; expected a finite number")
    if isinstance(estimators, str) or not estimators or any(e not in ESTIMATORS for e in estimators) \
            or len(set(estimators)) != len(estimators):  # fmt: skip
        raise ValueError(f"estimators={estimators!r}; expected a non-empty subset of {ESTIMATORS}")
    if not isinstance(E, Batch) or len(E) < 2:
        raise ValueError(f"E must be a Batch of at least 2 prompts (the SE is over prompts), got {E!r:.80}")
    weighted = [e for e in estimators if e in REWEIGHTED]
    if weighted and any(f is not None for f in check_filters(*filters, model.vocab_size)):
        raise ValueError(f"{weighted[0]} needs unfiltered sampling, got top_k, top_p = {filters}: the support of "
                         "the filtered distribution moves with θ, so responses cannot be reweighted to θ'; "
                         "use estimators=('crn', 'rb')")  # fmt: skip
    if "rb_is" in estimators and samples_per_prompt == 1:  # other bad values: the sampler's own check
        raise ValueError(f"rb_is needs samples_per_prompt >= 2 (its leave-one-out baseline), got {samples_per_prompt!r}")
    if "snis" in estimators and E.group_size < 2:
        raise ValueError(f"snis needs at least 2 responses per prompt in E, got G = {E.group_size}")
    if not (isinstance(ess_warn_fraction, int | float) and 0 < ess_warn_fraction <= 1):
        raise ValueError(f"ess_warn_fraction={ess_warn_fraction!r}; expected a number in (0, 1]")
    if snis_clip is not None and not (isinstance(snis_clip, int | float) and 0 <= snis_clip < math.inf):
        raise ValueError(f"snis_clip={snis_clip!r}; expected None or a finite number >= 0")
    return [float(s) for s in scales], list(estimators)


def rb_is_estimate(base: TokenStats, moved: TokenStats, lmax: Tensor, clip: float, ess_warn_fraction: float,
                   scale: float) -> Estimate:  # fmt: skip
    """The rb_is difference (`realized_is`) from per-token stats [N, G', T] at θ and θ'."""
    d, ess, clipped = rb_is_terms(base, moved, lmax, clip)
    return weighted_estimate("rb_is", d, ess, base.logp.shape[1], clipped, clip, ess_warn_fraction, scale)


def prompts_of(E: Batch) -> list[list[int]]:
    p = E.prompt_end
    return [E.input_ids[n, 0, p - int(E.prompt_lengths[n]) : p].tolist() for n in range(len(E))]


def realized_entropy_change(
    model: FunctionalModel,
    lora: Mapping[str, Tensor],
    step: Mapping[str, Tensor],
    E: Batch,
    scales: Sequence[float],
    *,
    estimators: Sequence[str] = ESTIMATORS,
    samples_per_prompt: int = 8,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    max_new_tokens: int | None = None,
    seed: int = 0,
    snis_clip: float | None = None,
    ess_warn_fraction: float = 0.25,
    microbatch: int | None = None,
    max_rows: int = 256,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> RealizedEntropyChange:
    """ΔH(s) along θ + s·Δθ (`step`, a dict like `lora`) for each of `scales`, by each estimator.

    Fresh samples (crn, rb): `samples_per_prompt` per prompt of E, up to `max_new_tokens`
    (default: the largest Lmax of E) or an EOS id, drawn with `seed`; θ's samples are drawn once
    and reused for every scale. snis: E's responses, teacher-forced at θ and each θ',
    `microbatch` prompts at a time; `snis_clip` is c above (None: ½·log G; rb_is: ½·log G'). Units: nats per
    token (ΔH of the per-token entropy rate with Lmax fixed), like δH₁. See the module docstring.
    """
    scales, estimators = check_arguments(model, lora, step, E, scales, estimators, ess_warn_fraction, snis_clip,
                                         (top_k, top_p), samples_per_prompt)  # fmt: skip
    E = prepared(model, E)
    check_temperature(temperature)
    max_new_tokens = int(E.max_lengths.max()) if max_new_tokens is None else max_new_tokens
    sampled = [e for e in estimators if e in ("crn", "rb", "rb_is")]
    coupled = [e for e in sampled if e != "rb_is"]
    if sampled:  # the sampler's own checks, before any heavy work
        check_filters(top_k, top_p, model.vocab_size)
        check_sampling_args(model, prompts_of(E), samples_per_prompt, max_new_tokens, eos_token_id, seed, None,
                            max_rows)  # fmt: skip
    lmax = E.max_lengths.double().cpu()
    clip = 0.5 * math.log(E.group_size) if snis_clip is None else float(snis_clip)
    is_clip = 0.5 * math.log(samples_per_prompt) if snis_clip is None else float(snis_clip)
    head = dict(temperature=temperature, top_k=top_k, top_p=top_p, chunk_rows=chunk_rows)
    draw = dict(samples_per_prompt=samples_per_prompt, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                seed=seed, max_rows=max_rows, **head)  # fmt: skip
    at = lambda s: {k: v + s * step[k].to(v.dtype) for k, v in lora.items()}  # noqa: E731
    step_norm, theta_norm = math.sqrt(dot64(step, step)), math.sqrt(dot64(lora, lora))

    baseline = {}
    if "snis" in estimators:
        base_stats = sequence_statistics(model, lora, E, microbatch=microbatch, **head)
        baseline["snis"] = estimate((-base_stats.logp).mean(1) / lmax)
    if sampled:
        base_samples = sample(model, lora, prompts_of(E), **draw)
        if "crn" in sampled:
            baseline["crn"] = estimate((-base_samples.stats.logp).mean(1) / lmax)
        if "rb" in sampled:
            baseline["rb"] = estimate(base_samples.stats.entropy.mean(1) / lmax)
    if "rb_is" in sampled:
        fresh = samples_batch(base_samples, lmax)
        table = lambda theta: sequence_statistics(model, theta, fresh, microbatch=microbatch, per_token=True, **head)  # noqa: E731
        base_table = table(lora)
        baseline["rb_is"] = estimate(base_table.entropy.sum(-1).mean(1) / lmax)
    points = []
    for s in scales:
        theta, estimates = at(s), {}
        if "snis" in estimators:
            moved = sequence_statistics(model, theta, E, microbatch=microbatch, **head)
            estimates["snis"] = snis_estimate(base_stats, moved, lmax, clip, ess_warn_fraction, s)
        if coupled:
            estimates |= sampled_estimates(base_samples, sample(model, theta, prompts_of(E), **draw), lmax, coupled)
        if "rb_is" in sampled:
            estimates["rb_is"] = rb_is_estimate(base_table, table(theta), lmax, is_clip, ess_warn_fraction, s)
        relative = abs(s) * step_norm / theta_norm if theta_norm > 0 else None
        rounding = step_rounding(lora, theta, step, s)
        points.append(RealizedPoint(s, relative, {e: estimates[e] for e in estimators}, rounding))
    settings = dict(temperature=float(temperature), top_k=top_k, top_p=top_p, max_new_tokens=max_new_tokens,
                    eos_token_id=eos_token_id if eos_token_id is None or isinstance(eos_token_id, int)
                    else list(eos_token_id), seed=seed, snis_clip=clip, rb_is_clip=is_clip, ess_warn_fraction=ess_warn_fraction)  # fmt: skip
    return RealizedEntropyChange(points, baseline, estimators, len(E), E.group_size, samples_per_prompt, settings)
