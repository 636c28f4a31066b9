"""bf16 with fp32 LoRA, directions of any dtype, and NF4 quantized in the requested dtype.

The bf16 references are transformers + PEFT with the same weights in bf16 and PEFT's
autocast_adapter_dtype (fp32 LoRA factors), run with torch.autograd; the ground truth is that
PEFT model cast to float64.

Tolerance (stated once, used for every comparison): bf16 keeps 8 mantissa bits, unit
roundoff u = 2⁻⁹ ≈ 2e-3 per rounding, and two correct bf16 implementations that round in a
different order differ by that noise, amplified through the layers and the backward.
Measured on this tiny model (seeds 0–4, dense and NF4 bases, 4 prompts × 3 responses),
relative error against the float64 truth:
  S:                            PEFT-bf16 4e-4–1e-3,  ours 4e-4–9e-4
  μX, projections s (5 methods): PEFT-bf16 4e-3–3.0e-2, ours 4e-3–2.5e-2
and between two bf16 implementations (ours vs PEFT-bf16, or two of our methods) ≤ 3.4e-2.
So each implementation must lie within TOL of the truth, TOL_S = 4e-3 (2u) and TOL_GRAD =
5e-2 (25u), about 1.7x the worst measured single error; two implementations then differ by at
most 2·TOL (triangle inequality), the bound used between them. The reference must meet its
own bound too. They are bf16-sized, not slack: the same comparisons in fp32 agree to 1e-5
(tests/test_alpha.py, test_grads.py).
"""

from __future__ import annotations

import copy

import pytest
import torch
from bitsandbytes.functional import dequantize_4bit
from helpers import dict_rel_err, proj_rel_err, random_direction, random_rollouts, reference_loss, rel_err
from helpers import teacher_forcing_inputs as inputs
from peft import PeftModel
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import functional_probe as fp
from functional_probe.nf4 import NF4Linear
from functional_probe.testing import hf_twin, peft_twin

BF16 = torch.bfloat16


def seq_logprob(peft_model, prompt: list[int], response: list[int]) -> torch.Tensor:
    """log p(response | prompt) from the PEFT model alone, log-softmax in fp32 (as ours)."""
    ids = torch.tensor([prompt + response])
    logits = peft_model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
    return logits.log_softmax(-1).gather(-1, torch.tensor(response)[:, None]).sum()


def peft_quantities(peft_model, prompts, responses, advantages, direction):
    """S [N, G], per-prompt X-loss gradients by torch.autograd, μX and s_n = <X_n, v> (float64)."""
    params = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    S, grads = [], []
    for n, prompt in enumerate(prompts):
        s = [seq_logprob(peft_model, prompt, r) for r in responses[n]]
        lengths = [len(r) for r in responses[n]]
        loss = reference_loss(s, lengths, max(lengths), advantages[n], "x")
        grads.append(dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True)))
        S.append(torch.stack(s).detach())
    mu = {k: sum(g[k] for g in grads) / len(grads) for k in params}
    proj = torch.stack([sum((g[k].double() * direction[k].double()).sum() for k in g) for g in grads])
    return {"S": torch.stack(S), "mu": mu, "s": proj}


@pytest.fixture(scope="module", params=[None, "nf4"], ids=["bf16", "nf4-bf16"])
def bf16_case(request):
    """A bf16 tiny model (dense, or NF4 with bf16 compute as in QLoRA) with fp32 LoRA, its PEFT
    twin in bf16 (NF4 weights dequantized), the float64 truth, a batch and a direction."""
    model = fp.tiny_model(seed=0, quantize=request.param, dtype=BF16)
    peft_bf16 = peft_twin(model)
    peft_64 = copy.deepcopy(peft_bf16).to(torch.float64)
    prompts, responses, adv = random_rollouts(4, 3, model.vocab_size, seed=0)
    batch = fp.make_batch(prompts, responses, advantages=adv)
    direction = random_direction(model.lora, seed=0)
    ref = peft_quantities(peft_bf16, prompts, responses, adv, direction)
    truth = peft_quantities(peft_64, prompts, responses, adv, direction)
    return model, peft_bf16, batch, direction, ref, truth


TOL_S, TOL_GRAD = 4e-3, 5e-2


def check_bf16_bound(ours, ref, truth, err, tol) -> None:
    """The module docstring's rule: PEFT-bf16 and ours within `tol` of the truth, 2·tol of each other."""
    errors = {"peft-vs-truth": err(ref, truth), "ours-vs-truth": err(ours, truth), "ours-vs-peft": err(ours, ref)}
    assert max(errors["peft-vs-truth"], errors["ours-vs-truth"]) <= tol, errors
    assert errors["ours-vs-peft"] <= 2 * tol, errors
    assert errors["peft-vs-truth"] > 1e-5, errors  # the reference really ran in bf16


def test_bf16_model_keeps_lora_in_fp32_as_peft_autocast_adapter_dtype(bf16_case):
    model, peft_bf16, *_ = bf16_case
    assert model.dtype == BF16 and all(v.dtype == torch.float32 for v in model.lora.values())
    trainable = {n: p.dtype for n, p in peft_bf16.named_parameters() if p.requires_grad}
    assert set(trainable.values()) == {torch.float32}  # PEFT's own choice, the reference
    frozen = fp.tiny_model(seed=0, quantize="nf4", dtype=BF16, autocast_adapter_dtype=False)
    assert all(v.dtype == BF16 for v in frozen.lora.values())


def test_bf16_sequence_logprobs_are_fp32_and_match_peft_bf16(bf16_case):
    model, _, batch, _, ref, truth = bf16_case
    S = fp.sequence_logprobs(model, model.lora, batch)
    assert S.dtype == torch.float32
    check_bf16_bound(S, ref["S"], truth["S"], rel_err, TOL_S)


def test_bf16_mean_grad_is_fp32_and_matches_peft_bf16(bf16_case):
    model, _, batch, _, ref, truth = bf16_case
    mu = fp.mean_grad(model, model.lora, batch, loss="x")
    assert all(v.dtype == torch.float32 for v in mu.values())
    check_bf16_bound(mu, ref["mu"], truth["mu"], dict_rel_err, TOL_GRAD)


@pytest.mark.parametrize("method", fp.METHODS)
def test_bf16_projections_match_peft_bf16(bf16_case, method):
    model, _, batch, direction, ref, truth = bf16_case
    s = fp.alpha_projections(model, model.lora, batch, direction, method=method)
    assert s.dtype == torch.float32 and torch.isfinite(s).all()
    check_bf16_bound(s, ref["s"], truth["s"], proj_rel_err, TOL_GRAD)


def test_bf16_methods_agree_with_each_other(bf16_case):
    model, _, batch, direction, *_ = bf16_case
    s = {m: fp.alpha_projections(model, model.lora, batch, direction, method=m) for m in fp.METHODS}
    worst = max(proj_rel_err(s[a], s[b]) for a in s for b in s)
    assert 0 < worst <= 2 * TOL_GRAD, worst


@pytest.mark.parametrize("method", fp.METHODS)
def test_direction_of_any_float_dtype_is_cast_to_the_lora_dtype(bf16_case, method):
    model, _, batch, direction, *_ = bf16_case
    run = lambda d: fp.alpha_projections(model, model.lora, batch[:2], d, method=method)  # noqa: E731
    as_fp32 = run(direction)
    # float64 -> fp32 is exact for fp32 values, so the result is the very same
    assert torch.equal(run({k: v.double() for k, v in direction.items()}), as_fp32)
    low = {k: v.to(BF16) for k, v in direction.items()}
    assert torch.equal(run(low), run({k: v.float() for k, v in low.items()}))


def test_integer_direction_is_refused_with_its_key(bf16_case):
    model, _, batch, direction, *_ = bf16_case
    key = next(iter(direction))
    bad = dict(direction) | {key: direction[key].long()}
    with pytest.raises(ValueError, match=rf"direction\['{key}'\] has dtype torch.int64; expected a float"):
        fp.alpha_projections(model, model.lora, batch, bad)


# ------------------------------------------------- NF4 from a bf16 checkpoint, dtype=float32

BNB_NF4 = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory, tiny_fp32):
    """The tiny model saved by transformers as a bf16 checkpoint, with its (fp32) PEFT adapter."""
    root = tmp_path_factory.mktemp("bf16")
    hf_twin(tiny_fp32).to(BF16).save_pretrained(root / "base")
    peft_twin(tiny_fp32).save_pretrained(root / "adapter")
    return root / "base", root / "adapter"


def bnb_load(base_dir, dtype):
    """transformers + bitsandbytes: from_pretrained(dtype, BitsAndBytesConfig(nf4, double quant))."""
    return AutoModelForCausalLM.from_pretrained(
        base_dir, dtype=dtype, attn_implementation="eager", device_map="cpu",
        quantization_config=BitsAndBytesConfig(**BNB_NF4, bnb_4bit_compute_dtype=dtype),
    )  # fmt: skip


def our_nf4_layers(model) -> dict[str, NF4Linear]:
    """HF module path -> our NF4Linear."""
    return {
        f"model.{name.removesuffix('.base')}": m
        for name, m in model.decoder.named_modules()
        if isinstance(m, NF4Linear)
    }


@pytest.mark.parametrize("dtype", [torch.float32, BF16])
def test_nf4_quant_state_and_weights_equal_bitsandbytes_config_load(bf16_checkpoint, dtype):
    base_dir, _ = bf16_checkpoint
    ref = bnb_load(base_dir, dtype)  # no forward ran: the bytes are in the training layout
    ours = our_nf4_layers(fp.load_model(base_dir, quantize="nf4", dtype=dtype))
    assert len(ours) == 14
    for path, layer in ours.items():
        w = ref.get_submodule(path).weight
        assert w.quant_state.dtype == dtype and layer.quant_dtype == dtype
        assert torch.equal(layer.weight_packed, w.data.view(torch.uint8))
        assert torch.equal(layer.dequantized_weight(), dequantize_4bit(w.data, w.quant_state))


def test_nf4_from_bf16_in_float32_is_not_the_bf16_quantization(bf16_checkpoint):
    """What the test above tells apart: quantizing in bf16 gives other weights (DESIGN §2)."""
    base_dir, _ = bf16_checkpoint
    w32 = our_nf4_layers(fp.load_model(base_dir, quantize="nf4", dtype=torch.float32))
    w16 = our_nf4_layers(fp.load_model(base_dir, quantize="nf4", dtype=BF16))
    path = "model.layers.0.self_attn.q_proj"
    err = rel_err(w16[path].dequantized_weight(), w32[path].dequantized_weight())
    assert 1e-4 < err < 1e-2, err


def test_nf4_from_bf16_logits_and_lora_grads_equal_bitsandbytes_peft(bf16_checkpoint):
    base_dir, adapter_dir = bf16_checkpoint
    model = fp.load_model(base_dir, adapter_dir, quantize="nf4", dtype=torch.float32)
    # bnb's own Linear4bit in train mode under torch.autograd (no CPU repack, MatMul4Bit backward)
    ref = PeftModel.from_pretrained(bnb_load(base_dir, torch.float32), adapter_dir, is_trainable=True)
    ref.train()
    ids, mask, targets = inputs(model.vocab_size, seed=3)
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    ref_logits = ref(input_ids=ids, attention_mask=mask.long(), position_ids=pos).logits
    params = {n: p for n, p in ref.named_parameters() if p.requires_grad}

    def loglik(logits):
        logp = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
        return (logp * targets[:, 1:]).sum()

    ref_grads = dict(zip(params, torch.autograd.grad(loglik(ref_logits), list(params.values())), strict=True))
    logits = model(model.lora, ids, mask)
    grads = torch.func.grad(lambda lo: loglik(model(lo, ids, mask)))(model.lora)
    assert rel_err(logits[mask], ref_logits.detach()[mask]) <= 1e-5
    assert min(v.norm() for v in ref_grads.values()) > 1e-6
    assert dict_rel_err(grads, ref_grads) <= 1e-5
