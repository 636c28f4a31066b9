"""``rb_is``: the realized entropy change on fresh responses drawn at θ, reweighted to θ' token by token.

The fresh samples of `realized` ("crn", "rb") decouple once a single token flips: a 32-token
response that differs at one position differs everywhere after it, so their paired differences
have variance ~ P(flip) ∝ s and a relative SE ~ 1/√(s·N) at small s. This estimator keeps the
responses fixed instead. G' responses y_g ~ π_θ per prompt (independent of E and of the step);
teacher-forced at θ and at θ' = θ + s·Δθ, per response position t (0 past the response's end):

    ℓ_t = log π'(y_t) − log π(y_t),   log W_<t = Σ_{u<t} ℓ_u   (the prefix weight π'(y_<t)/π(y_<t)),
    C_t, C'_t   full-vocabulary entropies of π(·|y_<t), π'(·|y_<t)  (entropy.py; C_t = 0 past the end).

Because H(θ') = Σ_t E_{π'}[C'_t] and E_π[W_<t·f(y_<t)] = E_{π'}[f(y_<t)] (a prefix weight, not the
whole sequence's: the future's ratio has mean 1 and only adds noise),

    d_g = Σ_t [ W_<t·(C'_t − b_t) + b_t − C_t ],   b_t = mean_{h≠g} C'_{h,t}  (leave-one-out),

has E[d_g] = ΔH·Lmax exactly: b_t does not depend on response g and E[W_<t] = 1, so b_t·(1 − W_<t)
is a zero-mean control variate (plain, not self-normalized, weights: self-normalizing would scale
the score part of the slope by (G'−1)/G'). At s = 0, d_g = 0 exactly; at small s, d_g ≈ s·(score
of the prefix × entropy-to-go minus its baseline, plus dC/ds): the SE shrinks ∝ s with the
effective sample size ≈ G'. Per prompt d_n = mean_g d_g / Lmax[n]; ΔH ± SE over prompts.

Truncation (as snis): log W_<t is capped at logmeanexp_g(log W_<t) + c per prompt and position;
the count of capped weights is reported (0 inside the first-order range, where W ≈ 1), and the
effective sample size of the whole-response weights, ESS_n = (Σ_g W_g)² / Σ_g W_g², per prompt,
with an `EntropyEstimateWarning` below `ess_warn_fraction`·G'. Unfiltered sampling only: with
top-k/top-p the support moves with θ and no weight on θ's responses covers it.
"""

from __future__ import annotations

import math

from torch import Tensor

from .batch import Batch, make_batch
from .entropy import TokenStats
from .sampling import Samples


def samples_batch(samples: Samples, lmax: Tensor) -> Batch:
    """The fresh responses as a Batch to teacher-force (Lmax[n] travels along unused, raised to
    the longest response when the sampler was allowed more tokens than E's Lmax)."""
    longest = samples.lengths.max(1).values
    return make_batch(samples.prompts, samples.responses(),
                      max_lengths=[max(int(a), int(b)) for a, b in zip(lmax, longest, strict=True)])  # fmt: skip


def capped_log_weights(log_w: Tensor, clip: float) -> tuple[Tensor, int]:
    """log-weights [N, G, ...] capped at their logmeanexp over the G responses (dim 1) + `clip`
    (the truncation of snis and rb_is), and how many entries the cap changed."""
    cap = log_w.logsumexp(1, keepdim=True) - math.log(log_w.shape[1]) + clip
    return log_w.minimum(cap), int((log_w > cap).sum())


def effective_sample_size(log_w: Tensor) -> Tensor:
    """ESS_n = (Σ_g W_g)² / Σ_g W_g² [N] of log-weights [N, G]."""
    return 1.0 / log_w.softmax(1).square().sum(1)


def prefix_log_weights(base: TokenStats, moved: TokenStats, clip: float) -> tuple[Tensor, int]:
    """log W_<t [N, G, T] (exclusive cumulative sum of ℓ), capped (`capped_log_weights`); and how
    many entries the cap changed."""
    ell = moved.logp - base.logp  # [N, G, T]; 0 past each end (both tables are)
    return capped_log_weights(ell.cumsum(-1) - ell, clip)


def rb_is_terms(base: TokenStats, moved: TokenStats, lmax: Tensor, clip: float) -> tuple[Tensor, Tensor, int]:
    """(d_n [N] in nats per token, ESS_n [N], clipped count) from per-token teacher-forced stats
    of the same fresh responses at θ (`base`) and θ' (`moved`), fields [N, G', T] (module doc)."""
    group = base.logp.shape[1]
    log_w, clipped = prefix_log_weights(base, moved, clip)
    c_moved = moved.entropy
    loo = (c_moved.sum(1, keepdim=True) - c_moved) / (group - 1)  # b_t for each g: [N, G, T]
    d = (log_w.exp() * (c_moved - loo) + loo - base.entropy).sum(-1)  # [N, G]
    total = (moved.logp - base.logp).sum(-1)  # log W of the whole response [N, G]
    return d.mean(1) / lmax, effective_sample_size(total), clipped
