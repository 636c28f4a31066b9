"""Teacher-forced sequence log-probs S, with the output head applied in chunks of tokens.

S[n, g] = Σ_t log softmax(z_t / τ)[y_t] over the response tokens of row (n, g), where
z_t = h_{t−1} Wᵀ are the logits that predict token t. The head runs only on response columns
(every prompt ends at the batch's `prompt_end`), a chunk of columns at a time, as
`z[y] − logsumexp(z)`: no [rows × T × V] logits or log-softmax exist at once. With
`Kernels(head="recompute")` (first-order reverse) the head is `head.chunked_logprobs`, whose
backward recomputes each chunk's logits, so reverse mode keeps nothing of size [tokens × V].
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from .batch import Batch
from .head import chunked_logprobs
from .model import FunctionalModel
from .model.fast_primal import fast_sequence_logprobs
from .model.kernels import PLAIN, Kernels, transform_active
from .model.packing import Packing, needed, row_sums

DEFAULT_CHUNK_TOKENS = 1024


def check_temperature(temperature: float) -> float:
    if not (isinstance(temperature, int | float) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature={temperature!r}; expected a finite number > 0")
    return float(temperature)


def prepared(model: FunctionalModel, batch: Batch) -> Batch:
    """The batch checked against the model's vocabulary and moved to its device."""
    batch.check_vocab(model.vocab_size)
    return batch.to(model.device)


def token_logprobs(
    hidden: Tensor,
    head_weight: Tensor,
    targets: Tensor,
    *,
    temperature: float = 1.0,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> Tensor:
    """log softmax(h Wᵀ / τ)[y] per position: hidden [R, L, D], targets [R, L] -> [R, L].

    Computed in at least fp32 as gather − logsumexp over chunks of columns holding at most
    about `chunk_tokens` positions. Memory bound, no-grad and forward mode: the largest
    vocabulary-sized tensors are a few of [R, max(1, chunk_tokens // R), V] at a time. Reverse
    mode saves each chunk's logits for the backward (no recomputation), so what it keeps grows
    like R × L × V — but never the full log-softmax beside the logits; first-order reverse
    passes use `head.chunked_logprobs` instead, which keeps only [R × L, D]. Measured by
    bench/logprobs_memory.py (vocab 32768, 16 × 512 tokens): peak 398 MiB vs 3088 MiB for full
    logits + log_softmax without grad, 984 vs 5161 MiB under jvp, 1758 vs 4368 MiB under grad.
    Static shapes only, so it runs under vmap as well as grad, jvp and vjp.
    """
    rows, length = targets.shape
    step = max(1, chunk_tokens // max(rows, 1))
    acc_dtype = torch.promote_types(hidden.dtype, torch.float32)
    pieces = []
    for start in range(0, length, step):
        h = hidden[:, start : start + step]  # [R, c, D]
        z = (h @ head_weight.T).to(acc_dtype) / temperature  # [R, c, V]
        y = targets[:, start : start + step, None]  # [R, c, 1]
        pieces.append(z.gather(-1, y)[..., 0] - z.logsumexp(-1))
    return torch.cat(pieces, dim=1)


def sequence_logprobs(
    model: FunctionalModel,
    lora: Mapping[str, Tensor],
    batch: Batch,
    *,
    temperature: float = 1.0,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    kernels: Kernels = PLAIN,
    derivatives: bool = True,
) -> Tensor:
    """S [N, G] in at least fp32 (nats), summed over response tokens only; pure in `lora`.

    A row's S does not depend on its batch or padding: positions come from the mask and
    padded targets are masked out. Memory of the head: see `token_logprobs`. `kernels`:
    PLAIN composes with every transform; `model.kernels.first_order_kernels` is for
    first-order reverse (grad, vmap(grad)) and no-grad passes. `derivatives=False` says the
    caller takes no derivative of S (realized-ΔH sweeps, first-order checks): then the merged-LoRA
    no-graph fast primal runs (model/fast_primal.py; `kernels` unused) and S carries no graph;
    under a torch.func transform that raises ValueError.
    """
    temperature = check_temperature(temperature)
    batch = prepared(model, batch)
    args = (batch.input_ids, batch.attention_mask, batch.position_ids, batch.response_mask)
    kw = dict(prompt_end=batch.prompt_end, temperature=temperature, chunk_tokens=chunk_tokens)
    if not derivatives:
        if transform_active(lora):
            raise ValueError("sequence_logprobs(derivatives=False) under a torch.func transform or forward AD; "
                             "expected derivatives=True there")  # fmt: skip
        return fast_sequence_logprobs(model, lora, *args, **kw)
    return grouped_logprobs(model, lora, *args, **kw, kernels=kernels)


def grouped_logprobs(
    model: FunctionalModel,
    lora: Mapping[str, Tensor],
    input_ids: Tensor,
    attention_mask: Tensor,
    position_ids: Tensor,
    response_mask: Tensor,
    *,
    prompt_end: int,
    temperature: float = 1.0,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    kernels: Kernels = PLAIN,
) -> Tensor:
    """S on the tensors of a Batch: [..., G, T] inputs -> [..., G], no data-dependent shapes,
    so a vmap over prompts (leading dim) works. Inputs are unchecked: see `sequence_logprobs`."""
    lead = input_ids.shape[:-1]
    flat = lambda t: t.reshape(-1, t.shape[-1])  # noqa: E731  [(...·G), T]
    ids, response = flat(input_ids), flat(response_mask)
    hidden = model.hidden_states(lora, ids, flat(attention_mask), flat(position_ids), kernels=kernels)
    h_cols, y_cols = slice(prompt_end - 1, -1), slice(prompt_end, None)
    keep = response[:, y_cols]  # [R, L]
    targets = torch.where(keep, ids[:, y_cols], 0)  # pad ids may lie outside the vocabulary
    head = chunked_logprobs if kernels.head == "recompute" else token_logprobs
    logp = head(hidden[:, h_cols], model.head_weight, targets, temperature=temperature, chunk_tokens=chunk_tokens)
    return (logp * keep).sum(-1).reshape(lead)


def sequence_logprobs_and_tangent(
    model: FunctionalModel,
    lora: Mapping[str, Tensor],
    direction: Mapping[str, Tensor],
    batch: Batch,
    *,
    temperature: float = 1.0,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> tuple[Tensor, Tensor]:
    """(S, Ṡ), both [N, G]: S and its derivative d/dε S(lora + ε·direction), by the dual forward.

    One pass carrying primal and tangent (no autograd graph) over the needed tokens only (pads and
    what follows a row's last response token skipped, model/packing.py); the head runs on response
    positions only, `chunk_tokens` rows at a time, and never forms tangent logits.
    """
    from .model.dual import dual_tokens
    from .model.head_stream import head_logprobs_tangent

    temperature = check_temperature(temperature)
    batch = prepared(model, batch)
    n, g = batch.num_prompts, batch.group_size
    flat = lambda t: t.reshape(n * g, -1)  # noqa: E731  [N·G, T]
    ids = flat(batch.input_ids)
    keep, head_rows, rows, cols = needed(flat(batch.attention_mask), flat(batch.response_mask), batch.prompt_end)
    packing = Packing.of(keep, flat(batch.position_ids))
    hidden, hidden_dot = dual_tokens(model, lora, direction, ids, packing, last=head_rows)  # [M, D] each
    logp, logp_dot = head_logprobs_tangent(
        hidden, hidden_dot, model.head_weight, ids[rows, cols + 1], temperature=temperature, chunk_size=chunk_tokens
    )
    S, S_dot = (row_sums(v, rows, cols, ids.shape) for v in (logp, logp_dot))
    return S.reshape(n, g), S_dot.reshape(n, g)
