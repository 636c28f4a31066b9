"""load_model against transformers + PEFT + torch.autograd on the same saved checkpoint."""

import json

import pytest
import torch
from bitsandbytes.functional import dequantize_4bit, quantize_4bit
from helpers import assert_not_trivial, dict_rel_err, peft_reference, rel_err, token_logliks
from helpers import teacher_forcing_inputs as inputs
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

import functional_probe as fp
from functional_probe.model.tiny import tiny_state_dict


def functional_result(model, ids, mask, targets):
    def loss(lora):
        return token_logliks(model(lora, ids, mask), ids, targets).sum()

    return model(model.lora, ids, mask), torch.func.grad(loss)(model.lora)


def test_fp32_logits_and_lora_grads_equal_peft_autograd(saved_tiny):
    base_dir, adapter_dir = saved_tiny
    model = fp.load_model(base_dir, adapter_dir)
    ref_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation="eager"),
        adapter_dir,
        is_trainable=True,
    ).eval()
    ids, mask, targets = inputs(model.vocab_size)
    ref_logits, ref_grads = peft_reference(ref_model, ids, mask, targets)
    logits, grads = functional_result(model, ids, mask, targets)
    assert set(grads) == set(ref_grads)
    assert rel_err(logits[mask], ref_logits[mask]) <= 1e-5
    assert_not_trivial(ref_grads)
    assert dict_rel_err(grads, ref_grads) <= 1e-5


def test_nf4_matches_fp32_twin_of_bitsandbytes_dequantized_weights(saved_tiny):
    base_dir, adapter_dir = saved_tiny
    model = fp.load_model(base_dir, adapter_dir, quantize="nf4")
    hf = AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation="eager")
    with torch.no_grad():
        for name, module in hf.named_modules():
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                w = module.weight.data
                packed, state = quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
                module.weight.copy_(dequantize_4bit(packed, state).to(w.dtype))
    twin = PeftModel.from_pretrained(hf, adapter_dir, is_trainable=True).eval()
    ids, mask, targets = inputs(model.vocab_size, seed=1)
    ref_logits, ref_grads = peft_reference(twin, ids, mask, targets)
    logits, grads = functional_result(model, ids, mask, targets)
    assert rel_err(logits[mask], ref_logits[mask]) <= 1e-5
    assert_not_trivial(ref_grads)
    assert dict_rel_err(grads, ref_grads) <= 1e-5


@pytest.mark.parametrize(
    "config",
    [
        LlamaConfig(
            vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True,
            rope_parameters={"rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0,
                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 16},
        ),
        Qwen3Config(
            vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        ),
    ],
    ids=["llama-tied-llama3rope", "qwen3-qknorm"],
)  # fmt: skip
def test_other_families_match_transformers(tmp_path, config):
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.2)
    lora_cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                          init_lora_weights=False)  # fmt: skip
    hf.save_pretrained(tmp_path / "base")
    peft_model = get_peft_model(hf, lora_cfg).eval()
    peft_model.save_pretrained(tmp_path / "adapter")
    model = fp.load_model(tmp_path / "base", tmp_path / "adapter")
    ids, mask, targets = inputs(config.vocab_size, seed=2)
    ref_logits, ref_grads = peft_reference(peft_model, ids, mask, targets)
    logits, grads = functional_result(model, ids, mask, targets)
    assert rel_err(logits[mask], ref_logits[mask]) <= 1e-5
    assert_not_trivial(ref_grads)
    assert dict_rel_err(grads, ref_grads) <= 1e-5


def test_fresh_lora_has_peft_names_and_zero_B(saved_tiny):
    base_dir, _ = saved_tiny
    model = fp.load_model(base_dir, r=4, lora_alpha=8, target_modules=("q_proj", "up_proj"))
    hf = AutoModelForCausalLM.from_pretrained(base_dir)
    peft_model = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"]))
    expected = {n: p.shape for n, p in peft_model.named_parameters() if p.requires_grad}
    assert {k: v.shape for k, v in model.lora.items()} == expected
    assert list(model.lora) == list(expected)  # the order an optimizer over PEFT's parameters uses
    assert all(v.abs().sum() == 0 for k, v in model.lora.items() if "lora_B" in k)
    assert all(v.abs().sum() > 0 for k, v in model.lora.items() if "lora_A" in k)


def test_float64_model_computes_in_float64(saved_tiny):
    base_dir, adapter_dir = saved_tiny
    model = fp.load_model(base_dir, adapter_dir, dtype=torch.float64)
    ids, mask, _ = inputs(model.vocab_size)
    assert model(model.lora, ids, mask).dtype == torch.float64
    assert all(v.dtype == torch.float64 for v in model.lora.values())


def test_missing_directory_raises(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        fp.load_model(tmp_path / "nowhere")


def test_missing_adapter_raises(saved_tiny, tmp_path):
    with pytest.raises(ValueError, match="no adapter_config.json"):
        fp.load_model(saved_tiny[0], tmp_path)


def test_unsupported_architecture_names_it(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="'gpt2' is not supported; supported: llama"):
        fp.load_model(tmp_path)


def test_dora_adapter_is_refused(saved_tiny, tmp_path):
    base_dir, adapter_dir = saved_tiny
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    cfg["use_dora"] = True
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    (tmp_path / "adapter_model.safetensors").write_bytes(
        (adapter_dir / "adapter_model.safetensors").read_bytes()
    )
    with pytest.raises(ValueError, match="use_dora=True is not supported"):
        fp.load_model(base_dir, tmp_path)


def test_nf4_load_never_holds_all_fp32_linears(saved_tiny):
    base_dir, adapter_dir = saved_tiny
    model = fp.load_model(base_dir, adapter_dir, quantize="nf4")
    dense = [n for n, b in model.named_buffers() if b.dim() == 2 and "layers" in n and b.is_floating_point()]
    assert dense == [], dense


def test_tiny_state_dict_is_what_was_saved(saved_tiny, tiny_fp32):
    hf = AutoModelForCausalLM.from_pretrained(saved_tiny[0])
    expected = tiny_state_dict(tiny_fp32.hf_config)
    got = hf.state_dict()
    assert all(torch.equal(got[k], v) for k, v in expected.items())
