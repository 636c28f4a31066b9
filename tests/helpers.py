"""Shared test utilities: error measures (DESIGN §1) and the references tests compare against."""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from einops import repeat
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from functional_probe.cli import main
from functional_probe.model import FunctionalModel
from functional_probe.rollouts import Rollouts


def rel_err(a: Tensor, b: Tensor) -> float:
    """‖a − b‖ / ‖b‖ (Frobenius), in float64."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm()).item()


def dict_rel_err(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    """Worst per-tensor relative error over two dicts with the same keys."""
    assert set(a) == set(b), sorted(set(a) ^ set(b))[:3]
    return max(rel_err(a[k], b[k]) for k in b)


def proj_rel_err(a: Tensor, b: Tensor) -> float:
    """max_n |a_n − b_n| / max_n |b_n| for vectors of projections."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max()).item()


def assert_not_trivial(grads: dict[str, Tensor], floor: float = 1e-6) -> None:
    """Every compared gradient tensor has a norm well above zero (both LoRA factors live)."""
    small = {k: v.norm().item() for k, v in grads.items() if v.norm() <= floor}
    assert not small, f"trivially small gradients: {list(small.items())[:3]}"


def token_logliks(logits: Tensor, input_ids: Tensor, target_mask: Tensor) -> Tensor:
    """Σ_t log softmax(logits_{t−1})[y_t] over positions where target_mask is True: [B]."""
    logp = logits[:, :-1].log_softmax(-1).gather(-1, input_ids[:, 1:, None])[..., 0]
    return (logp * target_mask[:, 1:]).sum(-1)


def teacher_forcing_inputs(vocab: int, seed: int = 0):
    """ids [3, 24], mask (row 1 left-padded by 7), targets (the last 14 positions)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (3, 24), generator=gen)
    mask = torch.ones(3, 24, dtype=torch.bool)
    mask[1, :7] = False
    targets = mask.clone()
    targets[:, :10] = False
    return ids, mask, targets


def peft_reference(peft_model, ids, mask, targets):
    """Logits and the gradient of Σ teacher-forced log-likelihood over the PEFT model's
    trainable parameters, by plain torch.autograd (positions from the mask, as ours)."""
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    logits = peft_model(input_ids=ids, attention_mask=mask.long(), position_ids=pos).logits
    params = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    loss = token_logliks(logits, ids, targets).sum()
    grads = torch.autograd.grad(loss, list(params.values()))
    return logits.detach(), dict(zip(params, grads, strict=True))


def random_direction(like: dict[str, Tensor], seed: int = 0) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in like.items()}


def peft_sequence_logprob(peft_model, prompt: list[int], response: list[int], temperature: float = 1.0):
    """log p(response | prompt) from a PEFT/transformers model run on the sequence alone, unpadded."""
    ids = torch.tensor([prompt + response])
    logits = peft_model(input_ids=ids).logits[0, len(prompt) - 1 : -1] / temperature
    return logits.log_softmax(-1).gather(-1, torch.tensor(response)[:, None]).sum()


def reference_loss(S, lengths, lmax, adv, loss: str, weighting: str = "dr_grpo"):
    """DESIGN §1 transcribed per element for one prompt: S, lengths, adv are length-G lists."""
    G = len(S)
    if loss == "y":
        return sum(adv[g] / lmax * S[g] for g in range(G)) / G
    w = [S[g] / (lmax if weighting == "dr_grpo" else lengths[g]) for g in range(G)]
    total = 0.0
    for g in range(G):
        b = (sum(w) - w[g]) / max(G - 1, 1)
        c = (w[g] - b).detach()
        total = total - c * S[g]
    return total / G


def peft_prompt_grads(peft_model, prompts, responses, advantages, loss: str, weighting: str = "dr_grpo"):
    """Per-prompt ∇ L[n] over the PEFT model's trainable parameters, by torch.autograd."""
    params = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    out = []
    for n, prompt in enumerate(prompts):
        S = [peft_sequence_logprob(peft_model, prompt, r) for r in responses[n]]
        lengths = [len(r) for r in responses[n]]
        L = reference_loss(S, lengths, max(lengths), list(advantages[n]), loss, weighting)
        grads = torch.autograd.grad(L, list(params.values()))
        out.append(dict(zip(params, grads, strict=True)))
    return out


def random_rollouts(n: int, g: int, vocab: int, seed: int = 0, max_prompt: int = 9, max_response: int = 12):
    """Ragged random prompts [n] and responses [n][g] of token ids, plus advantages [n][g]."""
    gen = torch.Generator().manual_seed(seed)

    def seq(hi: int) -> list[int]:
        length = int(torch.randint(1, hi + 1, (1,), generator=gen))
        return torch.randint(0, vocab, (length,), generator=gen).tolist()

    prompts = [seq(max_prompt) for _ in range(n)]
    responses = [[seq(max_response) for _ in range(g)] for _ in range(n)]
    return prompts, responses, torch.randn(n, g, generator=gen).tolist()


def error_of(fn) -> str | None:
    """The message of the ValueError `fn()` raises, or None (for checks run inside worker processes)."""
    try:
        fn()
    except ValueError as err:
        return str(err)
    return None


@torch.no_grad()
def sample_rollouts(
    model: FunctionalModel,
    lora: Mapping[str, Tensor],
    *,
    num_prompts: int,
    group_size: int,
    prompt_length: int = 8,
    response_length: int = 12,
    temperature: float = 1.0,
    seed: int = 0,
) -> Rollouts:
    """Random prompts, G responses each sampled from the model (no KV cache: it is tiny),
    truncated at random lengths; reward = share of response tokens in the lower half of the
    vocabulary, centred per prompt into advantages as in GRPO."""
    gen = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, model.vocab_size, (num_prompts, prompt_length), generator=gen)
    ids = repeat(prompts, "n t -> (n g) t", g=group_size).to(model.device)
    for _ in range(response_length):
        logits = model(lora, ids)[:, -1].float().cpu() / temperature  # [N·G, V]
        nxt = torch.multinomial(logits.softmax(-1), 1, generator=gen)
        ids = torch.cat([ids, nxt.to(ids.device)], dim=1)
    lengths = torch.randint(
        response_length // 2, response_length + 1, (num_prompts * group_size,), generator=gen
    )
    rows = ids[:, prompt_length:].cpu().tolist()
    responses = [rows[i][: int(lengths[i])] for i in range(len(rows))]
    rewards = torch.tensor([sum(t < model.vocab_size // 2 for t in r) / len(r) for r in responses])
    adv = rewards.reshape(num_prompts, group_size)
    adv = adv - adv.mean(1, keepdim=True)
    group = lambda xs, n: xs[n * group_size : (n + 1) * group_size]  # noqa: E731
    return Rollouts(
        prompts=prompts.tolist(),
        responses=[group(responses, n) for n in range(num_prompts)],
        advantages=adv.tolist(),
    )


def run_args(saved_run, tmp_path, **override):
    """`run --quiet` argv over the `saved_run` fixture's files; an override of None drops the option."""
    base_dir, adapter_dir, root, _ = saved_run
    args = {"--model": base_dir, "--adapter": adapter_dir, "--optimizer-state": root / "optimizer.pt",
            "--lr": "1e-3", "--eval": root / "E.jsonl", "--update": root / "U.jsonl",
            "--out": tmp_path / "r.json"}  # fmt: skip
    args.update(override)
    return ["run", "--quiet", *[str(x) for kv in args.items() if kv[1] is not None for x in kv]]


def assert_usage_error(argv, capsys, *needles):
    """`main(argv)` exits 2 with one line on stderr containing every needle."""
    assert main(argv) == 2
    message = capsys.readouterr().err.strip().splitlines()
    assert len(message) == 1, message
    for needle in needles:
        assert needle in message[0], message[0]


def torch_step_delta(opt, params, grads, theta):
    """Δθ of torch's own `opt.step()` on a copy of `opt` with p.grad = grads[name]: the reference step."""
    twin = copy.deepcopy(opt)
    copied = dict(zip(params, twin.param_groups[0]["params"], strict=True))  # the optimizer's order
    for k, q in copied.items():
        q.grad = grads[k]
    twin.step()
    return {k: q.detach() - theta[k] for k, q in copied.items()}


class LargestOutput(TorchDispatchMode):
    """Records the largest number of elements of any tensor an ATen op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out
