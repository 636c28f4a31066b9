"""fp.from_peft(live PeftModel) against the PEFT model itself run with torch.autograd.

Every comparison uses non-zero A and B factors and checks that the compared gradients are
not trivially small. 4-bit bases are loaded with transformers' BitsAndBytesConfig on CPU
from a saved tiny checkpoint (DESIGN §2: no forward may run in eval mode before conversion,
or bitsandbytes repacks the bytes; that case is tested separately).
"""

from __future__ import annotations

import warnings

import bitsandbytes as bnb
import pytest
import torch
import torch.distributed as dist
from bitsandbytes.functional import dequantize_4bit
from helpers import assert_not_trivial, dict_rel_err, peft_reference, rel_err, token_logliks
from helpers import teacher_forcing_inputs as inputs
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import functional_probe as fp
from functional_probe.model.decoder import PROJECTIONS
from functional_probe.nf4 import NF4Linear

TOL = 1e-5
FP32_LORA = dict(
    r=4,
    lora_alpha=8,
    target_modules=list(PROJECTIONS),
    rank_pattern={"down_proj": 2},  # per-module ranks and scalings must be honoured
    alpha_pattern={"o_proj": 3.0},
    lora_dropout=0.0,
    init_lora_weights=False,  # B != 0, so lora_A gradients are not all zero
)
# A subset, so the 4-bit model also keeps plain (un-wrapped) Linear4bit layers.
NF4_LORA = dict(
    r=4,
    lora_alpha=8,
    target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"],
    lora_dropout=0.0,
    init_lora_weights=False,
)
BNB_CONFIG = dict(
    load_in_4bit=True,
    bnb_4bit_quant_type="nf4",
    bnb_4bit_use_double_quant=True,
    bnb_4bit_compute_dtype=torch.float32,
)


# ---------------------------------------------------------------------------- builders


def fp32_peft(base_dir, seed: int = 0, **overrides):
    """The saved tiny base (fp32) with a PEFT LoRA whose A and B are both random (seeded)."""
    hf = AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation="eager")
    torch.manual_seed(seed)
    return get_peft_model(hf, LoraConfig(**(FP32_LORA | overrides)))


def nf4_peft(base_dir, seed: int = 0):
    """The saved tiny base loaded 4-bit (NF4, double quant) on CPU, with a random LoRA."""
    hf = AutoModelForCausalLM.from_pretrained(
        base_dir,
        attn_implementation="eager",
        quantization_config=BitsAndBytesConfig(**BNB_CONFIG),
        device_map="cpu",
    )
    torch.manual_seed(seed)
    return get_peft_model(hf, LoraConfig(**NF4_LORA))


def bnb_layers(peft_model) -> dict[str, bnb.nn.Linear4bit]:
    """HF module path ('model.layers.0.self_attn.q_proj') -> its bitsandbytes Linear4bit."""
    base = peft_model.get_base_model()
    out = {}
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer):
            module = module.get_base_layer()
            if isinstance(module, bnb.nn.Linear4bit):
                out[name] = module
        elif isinstance(module, bnb.nn.Linear4bit) and not name.endswith(".base_layer"):
            out[name] = module
    return out


def nf4_layers(model) -> dict[str, NF4Linear]:
    """HF module path -> the functional model's NF4Linear (under a LoRALinear or bare)."""
    return {
        "model." + name.removesuffix(".base"): module
        for name, module in model.decoder.named_modules()
        if isinstance(module, NF4Linear)
    }


def packed_bytes(layer: bnb.nn.Linear4bit) -> torch.Tensor:
    data = layer.weight.data
    return (data if data.dtype == torch.uint8 else data.view(torch.uint8)).reshape(-1).clone()


def fp32_twin(base_dir, peft_4bit):
    """An fp32 PEFT model whose base linears are bnb's dequantize_4bit of `peft_4bit`'s bytes
    and whose LoRA parameters are copies of `peft_4bit`'s."""
    hf = AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation="eager")
    with torch.no_grad():
        for path, layer in bnb_layers(peft_4bit).items():
            qs = layer.weight.quant_state
            assert not getattr(qs, "packing_format_for_cpu", False), "twin needs training layout"
            w = dequantize_4bit(layer.weight.data, qs).reshape(tuple(qs.shape))
            hf.get_submodule(path).weight.copy_(w.float())
    twin = get_peft_model(hf, LoraConfig(**NF4_LORA))
    src = dict(peft_4bit.named_parameters())
    with torch.no_grad():
        for name, p in twin.named_parameters():
            if p.requires_grad:
                p.copy_(src[name])
    return twin.eval()


def functional_loss(model, ids, mask, targets):
    return lambda lora: token_logliks(model(lora, ids, mask), ids, targets).sum()


def functional_result(model, ids, mask, targets):
    """Logits and torch.func.grad of the same log-likelihood, pure in model.lora."""
    return model(model.lora, ids, mask), torch.func.grad(functional_loss(model, ids, mask, targets))(
        model.lora
    )


def assert_matches(result, reference, mask):
    (logits, grads), (ref_logits, ref_grads) = result, reference
    assert set(grads) == set(ref_grads)
    assert_not_trivial(ref_grads)
    assert_not_trivial(grads)
    assert rel_err(logits[mask], ref_logits[mask]) <= TOL
    assert dict_rel_err(grads, ref_grads) <= TOL


@pytest.fixture(scope="module")
def base_dir(saved_tiny):
    return saved_tiny[0]


@pytest.fixture(scope="module")
def fp32_reference(base_dir):
    """Test 1's PEFT autograd reference (shared with the DDP test)."""
    peft_model = fp32_peft(base_dir).eval()
    ids, mask, targets = inputs(peft_model.config.vocab_size)
    return peft_reference(peft_model, ids, mask, targets)


# ---------------------------------------------------------------------------- 1. fp32


def test_fp32_logits_grads_and_keys_equal_peft_autograd(base_dir, fp32_reference):
    peft_model = fp32_peft(base_dir).eval()
    model = fp.from_peft(peft_model)
    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    assert set(model.lora) == set(trainable)
    for name, p in trainable.items():
        assert torch.equal(model.lora[name], p.detach()), name
    # rank_pattern / alpha_pattern really produced different ranks and scalings
    assert model.lora[next(k for k in trainable if "down_proj.lora_A" in k)].shape[0] == 2
    ids, mask, targets = inputs(model.vocab_size)
    assert_matches(functional_result(model, ids, mask, targets), fp32_reference, mask)


def test_fp32_lora_is_a_copy_not_a_view_of_the_live_parameters(base_dir):
    peft_model = fp32_peft(base_dir).eval()
    model = fp.from_peft(peft_model)
    before = {k: v.clone() for k, v in model.lora.items()}
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(1.0)
    assert all(torch.equal(model.lora[k], v) for k, v in before.items())


# ---------------------------------------------------------------------------- 2. NF4


def test_nf4_training_layout_same_bytes_and_equals_fp32_twin(base_dir):
    peft_model = nf4_peft(base_dir)
    layers = bnb_layers(peft_model)
    assert len(layers) == 14  # every projection of both layers is 4-bit, LoRA or not
    before = {p: packed_bytes(layer) for p, layer in layers.items()}

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the training layout converts exactly, silently
        model = fp.from_peft(peft_model)

    nf4 = nf4_layers(model)
    assert set(nf4) == set(layers)
    for path, layer in layers.items():
        assert torch.equal(nf4[path].weight_packed.reshape(-1), before[path]), path
        qs = layer.weight.quant_state
        w_bnb = dequantize_4bit(layer.weight.data, qs).reshape(tuple(qs.shape)).float()
        assert torch.equal(nf4[path].dequantized_weight(), w_bnb), path
    assert not any(b.dim() == 2 and b.is_floating_point() for p, b in model.named_buffers()
                   if "layers" in p), "a 4-bit layer was kept dense"  # fmt: skip

    ids, mask, targets = inputs(model.vocab_size, seed=1)
    result = functional_result(model, ids, mask, targets)
    twin = fp32_twin(base_dir, peft_model)
    assert_matches(result, peft_reference(twin, ids, mask, targets), mask)
    # the live bitsandbytes model in training mode (no repack; dropout 0) agrees as well
    assert_matches(result, peft_reference(peft_model.train(), ids, mask, targets), mask)


def test_nf4_converted_model_survives_a_later_bnb_repack(base_dir):
    """from_peft shares the training-layout bytes; a later eval-mode forward of the live
    model replaces (repacks) them, and the functional model must not see that."""
    peft_model = nf4_peft(base_dir)
    model = fp.from_peft(peft_model)
    ids, mask, _ = inputs(model.vocab_size, seed=2)
    logits = model(model.lora, ids, mask)
    with torch.no_grad():
        peft_model.eval()(input_ids=ids, attention_mask=mask.long())
    assert torch.equal(model(model.lora, ids, mask), logits)


def test_nf4_after_eval_forward_warns_and_error_is_bounded(base_dir):
    exact_model = fp.from_peft(nf4_peft(base_dir))
    peft_model = nf4_peft(base_dir)
    layers = bnb_layers(peft_model)
    before = {p: packed_bytes(layer) for p, layer in layers.items()}
    ids, mask, targets = inputs(exact_model.vocab_size, seed=3)
    with torch.no_grad():  # the first eval-mode forward: bnb repacks on CPUs with AVX512-BF16
        peft_model.eval()(input_ids=ids, attention_mask=mask.long())
    repacked = [
        p for p, lay in layers.items()
        if getattr(lay.weight.quant_state, "packing_format_for_cpu", False)
    ]  # fmt: skip
    exact = functional_result(exact_model, ids, mask, targets)

    if not repacked:  # no AVX512-BF16 (or a bnb without the CPU repack): still exact
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            model = fp.from_peft(peft_model)
        assert_matches(functional_result(model, ids, mask, targets), exact, mask)
        return

    assert sorted(repacked) == sorted(layers)
    with pytest.warns(UserWarning, match="repacked by bitsandbytes") as record:
        model = fp.from_peft(peft_model)
    # one warning, naming how many layers and which, attributed to the caller's line
    (warning,) = [w for w in record if "repacked" in str(w.message)]
    assert f"{len(layers)} 4-bit base layer(s) (model.layers.0.self_attn.q_proj" in str(warning.message)
    assert "relative error against the repacked weight" in str(warning.message)
    assert warning.filename == __file__

    nf4 = nf4_layers(model)
    exact_nf4 = nf4_layers(exact_model)
    for path in layers:
        # the byte order is restored exactly; only the (bf16, re-quantized) absmax differs
        assert torch.equal(nf4[path].weight_packed.reshape(-1), before[path]), path
        w, w_exact = nf4[path].dequantized_weight(), exact_nf4[path].dequantized_weight()
        assert 0 < rel_err(w, w_exact) <= 1e-2, path  # measured ~1e-3 (DESIGN §2)

    logits, grads = functional_result(model, ids, mask, targets)
    assert_not_trivial(grads)
    assert rel_err(logits[mask], exact[0][mask]) <= 2e-2  # measured ~3e-3
    assert dict_rel_err(grads, exact[1]) <= 5e-2  # measured ~7e-3


# ---------------------------------------------------------------------------- 3. DDP


@pytest.fixture
def gloo_group(tmp_path):
    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_ddp_wrapped_peft_model_is_unwrapped(base_dir, fp32_reference, gloo_group):
    ddp = torch.nn.parallel.DistributedDataParallel(fp32_peft(base_dir).eval())
    assert all(n.startswith("module.") for n, _ in ddp.named_parameters())
    model = fp.from_peft(ddp)
    trainable = {n for n, p in ddp.module.named_parameters() if p.requires_grad}
    assert set(model.lora) == trainable
    assert not any(k.startswith("module.") for k in model.lora)
    ids, mask, targets = inputs(model.vocab_size)
    result = functional_result(model, ids, mask, targets)
    assert_matches(result, fp32_reference, mask)
    direct = functional_result(fp.from_peft(ddp.module), ids, mask, targets)
    assert torch.equal(result[0], direct[0])
    assert all(torch.equal(result[1][k], direct[1][k]) for k in direct[1])


def test_torch_compile_wrapper_is_unwrapped(base_dir, fp32_reference):
    compiled = torch.compile(fp32_peft(base_dir).eval())  # lazy: nothing compiles here
    model = fp.from_peft(compiled)
    ids, mask, targets = inputs(model.vocab_size)
    assert_matches(functional_result(model, ids, mask, targets), fp32_reference, mask)


# ---------------------------------------------------------------------------- 4. refusals


def test_merge_and_unload_result_is_refused(base_dir):
    merged = fp32_peft(base_dir).merge_and_unload()
    with pytest.raises(ValueError, match=r"merge_and_unload\(\), which has no LoRA tensors"):
        fp.from_peft(merged)


def test_merged_adapter_is_refused(base_dir):
    peft_model = fp32_peft(base_dir)
    peft_model.merge_adapter()
    with pytest.raises(ValueError, match="is merged into the base weights"):
        fp.from_peft(peft_model)
    peft_model.unmerge_adapter()  # and once unmerged it converts
    assert set(fp.from_peft(peft_model).lora) == {
        n for n, p in peft_model.named_parameters() if p.requires_grad
    }


def test_plain_transformers_model_is_refused(base_dir):
    hf = AutoModelForCausalLM.from_pretrained(base_dir)
    with pytest.raises(ValueError, match="expected a peft.PeftModel.*got Qwen2ForCausalLM"):
        fp.from_peft(hf)


def test_eight_bit_base_is_refused(base_dir):
    """bnb's Linear8bitLt subclasses nn.Linear; its int8 codes must not be read as weights."""
    hf = AutoModelForCausalLM.from_pretrained(
        base_dir, quantization_config=BitsAndBytesConfig(load_in_8bit=True), device_map="cpu"
    )
    peft_model = get_peft_model(hf, LoraConfig(**NF4_LORA))
    with pytest.raises(ValueError, match=r"Linear8bitLt with torch.int8 weights is not supported"):
        fp.from_peft(peft_model)


def test_quantized_lm_head_is_refused(base_dir):
    config = BitsAndBytesConfig(**BNB_CONFIG, llm_int8_skip_modules=[])  # lm_head 4-bit too
    hf = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=config, device_map="cpu")
    assert isinstance(hf.lm_head, bnb.nn.Linear4bit)
    peft_model = get_peft_model(hf, LoraConfig(**NF4_LORA))
    with pytest.raises(ValueError, match=r"lm_head.weight is stored quantized"):
        fp.from_peft(peft_model)


def test_dora_is_refused(base_dir):
    peft_model = fp32_peft(base_dir, use_dora=True)
    with pytest.raises(ValueError, match="use_dora=True is not supported"):
        fp.from_peft(peft_model)


# ---------------------------------------------------------------------------- 5. contexts


@pytest.fixture(scope="module", params=["fp32", "nf4"])
def converted(request, base_dir):
    build = fp32_peft if request.param == "fp32" else nf4_peft
    return fp.from_peft(build(base_dir))


def test_grad_under_outer_no_grad_equals_grad_outside(converted):
    ids, mask, targets = inputs(converted.vocab_size, seed=4)
    grad = torch.func.grad(functional_loss(converted, ids, mask, targets))
    outside = grad(converted.lora)
    with torch.no_grad():
        inside = grad(converted.lora)
    assert_not_trivial(outside)
    assert dict_rel_err(inside, outside) <= TOL


def test_grad_under_outer_inference_mode_equals_grad_outside(converted):
    """torch.func.grad under torch.inference_mode() (measured, torch 2.13): it neither
    raises nor returns zeros; the gradient equals the one taken outside."""
    ids, mask, targets = inputs(converted.vocab_size, seed=4)
    grad = torch.func.grad(functional_loss(converted, ids, mask, targets))
    outside = grad(converted.lora)
    with torch.inference_mode():
        inside = grad(converted.lora)
        inference_lora = {k: v.clone() for k, v in converted.lora.items()}
    assert_not_trivial(inside)
    assert dict_rel_err(inside, outside) <= TOL
    # LoRA tensors created under inference_mode (inference tensors) differentiate too
    assert dict_rel_err(grad(inference_lora), outside) <= TOL


# ---------------------------------------------------------------------------- 6. dropout


def test_lora_dropout_is_ignored_and_matches_peft_eval(base_dir):
    peft_model = fp32_peft(base_dir, seed=1, lora_dropout=0.1).train()
    ids, mask, targets = inputs(peft_model.config.vocab_size, seed=5)
    # the live model in train mode is random: the test would be vacuous otherwise
    noisy = [peft_reference(peft_model, ids, mask, targets)[0] for _ in range(2)]
    assert not torch.equal(noisy[0], noisy[1])

    model = fp.from_peft(peft_model)
    assert peft_model.training  # conversion does not change the live model's mode
    first = functional_result(model, ids, mask, targets)
    second = functional_result(model, ids, mask, targets)
    assert torch.equal(first[0], second[0])
    assert all(torch.equal(first[1][k], second[1][k]) for k in first[1])
    assert_matches(first, peft_reference(peft_model.eval(), ids, mask, targets), mask)


# ---------------------------------------------------------------------------- dtypes


def bf16_peft(base_dir, autocast_adapter_dtype: bool = True):
    """The saved tiny base in bf16 with a random PEFT LoRA (fp32 factors under PEFT's autocast)."""
    hf = AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation="eager", dtype=torch.bfloat16)
    torch.manual_seed(0)
    config = LoraConfig(**FP32_LORA)
    return get_peft_model(hf, config, autocast_adapter_dtype=autocast_adapter_dtype).eval()


@pytest.mark.parametrize("autocast", [True, False], ids=["fp32-lora", "bf16-lora"])
def test_default_keeps_the_peft_models_dtypes_and_equals_its_bf16_forward(base_dir, autocast):
    peft_model = bf16_peft(base_dir, autocast)
    lora_dtype = torch.float32 if autocast else torch.bfloat16
    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    assert {p.dtype for p in trainable.values()} == {lora_dtype}  # what PEFT did
    model = fp.from_peft(peft_model)
    assert model.dtype == torch.bfloat16
    assert all(v.dtype == lora_dtype for v in model.lora.values())
    assert all(torch.equal(model.lora[k], p.detach()) for k, p in trainable.items())
    ids, mask, _ = inputs(model.vocab_size)
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = peft_model(input_ids=ids, attention_mask=mask.long(), position_ids=pos).logits
    logits = model(model.lora, ids, mask)
    assert logits.dtype == torch.bfloat16
    # the same bf16 ops in the same order as transformers + PEFT (measured: bit-identical)
    assert rel_err(logits[mask], ref[mask]) <= 1e-5


def test_explicit_dtype_casts_frozen_tensors_and_keeps_lora_fp32_for_bf16(base_dir):
    peft_model = fp32_peft(base_dir).eval()
    model = fp.from_peft(peft_model, dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    assert all(v.dtype == torch.float32 for v in model.lora.values())
    up = fp.from_peft(bf16_peft(base_dir), dtype=torch.float64)
    assert up.dtype == torch.float64 and all(v.dtype == torch.float64 for v in up.lora.values())
    with pytest.raises(ValueError, match="dtype=torch.int8; expected a floating dtype"):
        fp.from_peft(peft_model, dtype=torch.int8)


def test_qlora_bf16_keeps_bf16_compute_and_fp32_lora_and_matches_bnb_peft(base_dir):
    """QLoRA as trained: bf16 model, NF4 base with bnb_4bit_compute_dtype=bf16, fp32 LoRA.

    Reference: the PEFT + bitsandbytes model itself in train mode under torch.autograd. bnb 0.50
    computes its forward with a fused gemm_4bit kernel whose bf16 rounding differs from
    F.linear on the same dequantized weight (measured 2.7e-3 relative on one 64x128 layer), so
    the bound is bf16-sized: measured 1.0e-2 on logits and 2.2e-2 on the LoRA gradients over 2
    layers; bounds 2e-2 and 5e-2 (the bf16 gradient bound of tests/test_precision.py).
    """
    hf = AutoModelForCausalLM.from_pretrained(
        base_dir, attn_implementation="eager", device_map="cpu", dtype=torch.bfloat16,
        quantization_config=BitsAndBytesConfig(**(BNB_CONFIG | {"bnb_4bit_compute_dtype": torch.bfloat16})),
    )  # fmt: skip
    torch.manual_seed(0)
    peft_model = get_peft_model(hf, LoraConfig(**NF4_LORA))
    model = fp.from_peft(peft_model)  # before any eval-mode forward: no CPU repack
    assert model.dtype == torch.bfloat16
    assert all(v.dtype == torch.float32 for v in model.lora.values())
    assert {m.compute_dtype for m in nf4_layers(model).values()} == {torch.bfloat16}
    ids, mask, targets = inputs(model.vocab_size)
    ref_logits, ref_grads = peft_reference(peft_model.train(), ids, mask, targets)
    logits, grads = functional_result(model, ids, mask, targets)
    assert_not_trivial(ref_grads)
    assert rel_err(logits[mask], ref_logits[mask]) <= 2e-2
    assert dict_rel_err(grads, ref_grads) <= 5e-2
