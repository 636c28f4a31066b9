"""load_model against transformers + PEFT + torch.autograd on the same saved checkpoint."""

import json

import pytest
import torch
from helpers import assert_not_trivial, dict_rel_err, peft_reference, rel_err, token_logliks
from helpers import teacher_forcing_inputs as inputs
from peft import LoraConfig, PeftModel, get_peft_model
from test_adapter import other_adapter
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


def test_float64_model_computes_in_float64(saved_tiny):
    base_dir, adapter_dir = saved_tiny
    model = fp.load_model(base_dir, adapter_dir, dtype=torch.float64)
    ids, mask, _ = inputs(model.vocab_size)
    assert model(model.lora, ids, mask).dtype == torch.float64
    assert all(v.dtype == torch.float64 for v in model.lora.values())


def test_adapter_mismatch_is_refused_before_any_checkpoint_tensor_is_read(saved_tiny, tmp_path, monkeypatch):
    from functional_probe.model import loading

    def reader(base_dir):
        def read(name):
            raise AssertionError(f"read {name} before the adapter check")

        return read

    monkeypatch.setattr(loading, "checkpoint_reader", reader)
    with pytest.raises(ValueError, match="made for another model"):
        fp.load_model(saved_tiny[0], other_adapter(tmp_path, "other", "x/y"))


def test_typo_in_base_path_says_no_such_directory(tmp_path):
    with pytest.raises(ValueError, match=r"base model directory '.*nowhere': no such directory"):
        fp.load_model(tmp_path / "nowhere")


def test_directory_without_config_json_says_not_a_model_directory(tmp_path):
    with pytest.raises(ValueError, match="no config.json: not a Hugging Face model directory"):
        fp.load_model(tmp_path)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dtype": torch.int64}, r"dtype=torch\.int64; expected a floating dtype"),
        ({"dtype": "bf17"}, r"dtype='bf17'; expected a floating dtype \(float32, bfloat16"),
        ({"device": "cdua"}, r"device='cdua' cannot be used here"),
        ({"quantize": "nf8"}, r"quantize='nf8'; expected one of"),
    ],
)
def test_bad_dtype_device_or_quantize_names_it_and_the_choices(saved_tiny, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fp.load_model(saved_tiny[0], **kwargs)


def test_unsupported_architecture_names_it(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="'gpt2' is not supported; supported: llama"):
        fp.load_model(tmp_path)


def test_tiny_state_dict_is_what_was_saved(saved_tiny, tiny_fp32):
    hf = AutoModelForCausalLM.from_pretrained(saved_tiny[0])
    expected = tiny_state_dict(tiny_fp32.hf_config)
    got = hf.state_dict()
    assert all(torch.equal(got[k], v) for k, v in expected.items())


def test_default_device_is_cuda_when_available_else_cpu(saved_tiny):
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert fp.load_model(saved_tiny[0]).device.type == expected
    assert fp.tiny_model(quantize=None).device.type == expected
    model = fp.load_model(saved_tiny[0], device="cpu")
    assert {t.device.type for t in [*model.buffers(), *model.lora.values()]} == {"cpu"}


@pytest.mark.parametrize("name", ["bfloat16", "torch.bfloat16", "bf16"])
def test_dtype_by_name_gives_bf16_compute_and_fp32_lora(saved_tiny, name):
    model = fp.load_model(saved_tiny[0], saved_tiny[1], dtype=name)
    assert model.dtype == torch.bfloat16
    assert all(v.dtype == torch.float32 for v in model.lora.values())
    frozen = fp.load_model(saved_tiny[0], saved_tiny[1], dtype=name, autocast_adapter_dtype=False)
    assert all(v.dtype == torch.bfloat16 for v in frozen.lora.values())
