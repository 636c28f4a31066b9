"""CachedDecoder against the full (uncached) forward: the same logits token by token for left-padded
prompts, on the tiny model (fp32, NF4) and other families; in bf16 the same logit change for a
small LoRA step (kept low-rank, not merged and rounded away)."""

import pytest
import torch
from enumerable import random_step, shifted
from helpers import rel_err
from test_dual import LLAMA, QWEN3, family_model

import functional_probe as fp
from functional_probe.model.cached_decoder import CachedDecoder
from functional_probe.model.decoder import PROJECTIONS

MODELS = {
    "tiny-fp32": lambda: fp.tiny_model(quantize=None),
    "tiny-nf4": lambda: fp.tiny_model(quantize="nf4"),
    "llama-gqa-tied-partial-lora": lambda: family_model(LLAMA, ("q_proj", "v_proj", "down_proj")),
    "qwen3-qknorm": lambda: family_model(QWEN3, PROJECTIONS),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_kv_cached_logits_equal_the_full_forward(name):
    model = MODELS[name]()
    lora = model.lora
    gen = torch.Generator().manual_seed(0)
    lengths, steps = [3, 7, 5], 6
    prompts = [torch.randint(0, model.vocab_size, (k,), generator=gen).tolist() for k in lengths]
    cont = torch.randint(0, model.vocab_size, (3, steps), generator=gen)
    width = max(lengths)
    ids = torch.zeros(3, width + steps, dtype=torch.long)
    mask = torch.zeros(3, width + steps, dtype=torch.bool)
    for r, p in enumerate(prompts):  # left-padded prompt, then the continuation
        ids[r, width - len(p) : width], mask[r, width - len(p) :] = torch.tensor(p), True
    ids[:, width:] = cont
    full = model(lora, ids, mask)[:, width - 1 :]  # logits predicting tokens width .. end
    decoder = CachedDecoder(model, lora)
    hidden = [decoder.start(ids[:, :width], mask[:, :width], width + steps)]
    hidden += [decoder.step(cont[:, t]) for t in range(steps)]
    cached = torch.stack(hidden, 1) @ model.head_weight.T
    assert full.abs().max() > 1
    assert rel_err(cached, full) <= 1e-5
    assert max(rel_err(cached[r], full[r]) for r in range(3)) <= 1e-5


def test_bf16_keeps_lora_unmerged_so_small_steps_are_not_rounded_away():
    model = fp.tiny_model(quantize=None, dtype=torch.bfloat16)
    lora = model.lora
    step = {k: v.to(torch.bfloat16) for k, v in random_step({k: v.float() for k, v in lora.items()}, scale=0.02).items()}
    ids = torch.randint(0, model.vocab_size, (4, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids, dtype=torch.bool)

    def last_logits(theta):
        cached = CachedDecoder(model, theta).start(ids, mask, 10) @ model.head_weight.T
        return cached.float(), model(theta, ids, mask)[:, -1].float()

    (c0, f0), (c1, f1) = last_logits(lora), last_logits(shifted(lora, step, 1.0))
    assert torch.equal(c0, f0) and (f1 - f0).abs().max() > 0.01
    assert rel_err(c1 - c0, f1 - f0) < 1e-6
