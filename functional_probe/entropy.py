"""Per-token distributions of the head: log-probs, sampling filters, full-vocabulary entropies.

At a response position with logits z [V] the model's distribution is π = softmax(z/τ) (what S
uses, DESIGN §1) and the sampling distribution q is π after transformers' TopK then TopP
warpers (q = π without filters). Per position this module returns, in float64:

    log π(y),  log q(y),  C = −Σ_v q_v log π_v   (= the entropy of π when q = π),

C being the Rao–Blackwellized −log π(y): E_{y~q}[−log π(y) | prefix] = C. The head runs a chunk
of `chunk_rows` positions at a time (one [chunk, V] float64 block), so no [tokens × V] logits
or log-softmax exist at once.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from .batch import Batch
from .logprobs import check_temperature, prepared
from .model import FunctionalModel

DEFAULT_CHUNK_ROWS = 64


def check_filters(top_k: int | None, top_p: float | None, vocab_size: int) -> tuple[int | None, float | None]:
    """(top_k, top_p) normalised: None where the filter is off (top_k 0/None/≥ V, top_p None/1)."""
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
        raise ValueError(f"top_k={top_k!r}; expected None, 0 (off) or a positive int")
    if top_p is not None and not (isinstance(top_p, int | float) and 0 < top_p <= 1):
        raise ValueError(f"top_p={top_p!r}; expected None or a number in (0, 1]")
    top_k = top_k if top_k and top_k < vocab_size else None
    top_p = float(top_p) if top_p is not None and top_p < 1 else None
    return top_k, top_p


def filter_logits(z: Tensor, top_k: int | None, top_p: float | None) -> Tensor:
    """z [c, V] (already divided by τ) with −inf outside the kept set, exactly as transformers'
    TopKLogitsWarper(top_k) followed by TopPLogitsWarper(top_p) (min_tokens_to_keep = 1):
    top-k drops logits below the k-th largest (ties kept); top-p drops, in ascending order, the
    tokens whose cumulative probability is ≤ 1 − top_p, always keeping the most likely one."""
    if top_k is not None:
        z = z.masked_fill(z < torch.topk(z, top_k).values[..., -1:], -math.inf)
    if top_p is not None:
        sorted_z, order = torch.sort(z, descending=False)
        drop_sorted = sorted_z.softmax(-1).cumsum(-1) <= 1 - top_p
        drop_sorted[..., -1] = False
        z = z.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), -math.inf)
    return z


def head_chunks(
    hidden: Tensor, head_weight: Tensor, *, temperature: float, top_k: int | None, top_p: float | None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> Iterator[tuple[slice, Tensor, Tensor]]:  # fmt: skip
    """For hidden [M, D] and the head [V, D]: per chunk of rows, (rows, log π [c, V], log q [c, V]),
    float64, logits formed in the compute dtype (≥ fp32) then z/τ in float64."""
    acc = torch.promote_types(hidden.dtype, torch.float32)
    weight = head_weight.to(acc)
    for start in range(0, hidden.shape[0], chunk_rows):
        rows = slice(start, min(start + chunk_rows, hidden.shape[0]))
        z = (hidden[rows].to(acc) @ weight.T).double() / temperature  # [c, V]
        log_pi = z.log_softmax(-1)
        if top_k is None and top_p is None:
            yield rows, log_pi, log_pi
        else:
            yield rows, log_pi, filter_logits(z, top_k, top_p).log_softmax(-1)


def cross_entropy_rows(log_pi: Tensor, log_q: Tensor) -> Tensor:
    """C = −Σ_v q_v log π_v per row [c, V] -> [c] float64 (q_v = 0 terms contribute 0)."""
    q = log_q.exp()
    return -(q * log_pi.masked_fill(q == 0, 0.0)).sum(-1)


@dataclass(frozen=True)
class TokenStats:
    """Per position (or, summed, per sequence), float64: log π(y), log q(y) and C (see module doc)."""

    logp: Tensor
    logq: Tensor
    entropy: Tensor


def token_statistics(
    hidden: Tensor, head_weight: Tensor, targets: Tensor, *, temperature: float = 1.0,
    top_k: int | None = None, top_p: float | None = None, chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> TokenStats:  # fmt: skip
    """hidden [M, D] (the states that predict `targets` [M]) -> TokenStats of [M] float64."""
    m = targets.shape[0]
    out = [hidden.new_empty(m, dtype=torch.float64) for _ in range(3)]
    with torch.no_grad():
        for rows, log_pi, log_q in head_chunks(
            hidden, head_weight, temperature=temperature, top_k=top_k, top_p=top_p, chunk_rows=chunk_rows
        ):
            y = targets[rows, None]
            out[0][rows] = log_pi.gather(-1, y)[:, 0]
            out[1][rows] = log_q.gather(-1, y)[:, 0]
            out[2][rows] = cross_entropy_rows(log_pi, log_q)
    return TokenStats(*out)


def sequence_statistics(
    model: FunctionalModel, lora: Mapping[str, Tensor], batch: Batch, *, temperature: float = 1.0,
    top_k: int | None = None, top_p: float | None = None, microbatch: int | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS, per_token: bool = False,
) -> TokenStats:  # fmt: skip
    """Teacher-forced TokenStats summed over each response: fields [N, G] float64 (nats).

    `logp` is the project's S (π = softmax(z/τ)); `logq` the log-probability under the
    filtered sampling distribution; `entropy` Σ_t C_t. `microbatch` prompts run at a time.
    `per_token`: the unsummed values instead, [N, G, T_r] (T_r the longest response; 0 past
    each response's end).
    """
    temperature = check_temperature(temperature)
    top_k, top_p = check_filters(top_k, top_p, model.vocab_size)
    batch = prepared(model, batch)
    head = dict(temperature=temperature, top_k=top_k, top_p=top_p, chunk_rows=chunk_rows)
    parts = [response_tokens(model, lora, part, **head) for part in batch.split(microbatch or len(batch))]
    width = max(v.shape[-1] for part in parts for v in part)  # microbatches are trimmed: pad them back
    pad = lambda v: torch.nn.functional.pad(v, (0, width - v.shape[-1]))  # noqa: E731
    return TokenStats(*(torch.cat([pad(v) for v in col]) if per_token else torch.cat([v.sum(-1) for v in col])
                        for col in zip(*parts, strict=True)))  # fmt: skip


def response_tokens(model: FunctionalModel, lora: Mapping[str, Tensor], batch: Batch, **head) -> list[Tensor]:
    """[logp, logq, entropy] at each response position of a prepared batch, each [N, G, T − P]
    float64 (0 at padding)."""
    n, g, p = batch.num_prompts, batch.group_size, batch.prompt_end
    flat = lambda t: t.reshape(n * g, -1)  # noqa: E731  [N·G, T]
    ids = flat(batch.input_ids)
    with torch.no_grad():
        hidden = model.hidden_states(lora, ids, flat(batch.attention_mask), flat(batch.position_ids))
    rows, cols = flat(batch.response_mask)[:, p:].nonzero(as_tuple=True)  # M response tokens
    stats = token_statistics(hidden[:, p - 1 : -1][rows, cols], model.head_weight, ids[:, p:][rows, cols], **head)
    width = ids.shape[1] - p
    return [v.new_zeros(n * g, width).index_put_((rows, cols), v).reshape(n, g, width)
            for v in (stats.logp, stats.logq, stats.entropy)]  # fmt: skip
