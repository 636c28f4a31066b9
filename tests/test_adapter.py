"""LoRA factors from a PEFT adapter directory or drawn fresh, against PEFT's own names and
shapes, and the refusals of adapters the decoder cannot model (through load_model)."""

import json

import pytest
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

import functional_probe as fp


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


def other_adapter(tmp_path, name: str, base_name: str | None, **config):
    """A PEFT adapter saved from a random Qwen2 of another shape, claiming `base_name`."""
    from transformers import Qwen2Config

    cfg = dict(vocab_size=512, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2) | config  # fmt: skip
    hf = AutoModelForCausalLM.from_config(Qwen2Config(**cfg))
    peft_model = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    peft_model.save_pretrained(tmp_path / name)
    path = tmp_path / name / "adapter_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"base_model_name_or_path": base_name}))
    return tmp_path / name


def test_adapter_for_another_base_names_module_and_the_model_it_was_made_for(saved_tiny, tmp_path):
    adapter = other_adapter(tmp_path, "other", "someone/Other-48")
    with pytest.raises(ValueError) as err:
        fp.load_model(saved_tiny[0], adapter)
    msg = str(err.value)
    assert "'model.layers.0.self_attn.q_proj'" in msg and "base_model_name_or_path='someone/Other-48'" in msg
    assert "lora_A (4, 48)" in msg and "[out=64, in=64]" in msg and "made for another model" in msg


def test_adapter_with_more_layers_than_the_base_says_made_for_another_model(saved_tiny, tmp_path):
    adapter = other_adapter(tmp_path, "deeper", None, hidden_size=64, intermediate_size=128,
                            num_hidden_layers=3)  # fmt: skip
    with pytest.raises(ValueError, match=r"'model\.layers\.2\..*this base has 2 layers.*another model"):
        fp.load_model(saved_tiny[0], adapter)


def test_typo_in_adapter_path_says_no_such_directory(saved_tiny):
    typo = saved_tiny[1].parent / "adaptr"
    with pytest.raises(ValueError, match=r"adapter directory '.*adaptr': no such directory"):
        fp.load_model(saved_tiny[0], typo)


def test_adapter_path_that_is_a_file_says_so(saved_tiny):
    with pytest.raises(ValueError, match="is a file; expected a directory"):
        fp.load_model(saved_tiny[0], saved_tiny[1] / "adapter_config.json")


def test_missing_adapter_config_raises(saved_tiny, tmp_path):
    with pytest.raises(ValueError, match="no adapter_config.json"):
        fp.load_model(saved_tiny[0], tmp_path)


def test_corrupt_adapter_config_names_the_file(saved_tiny, tmp_path):
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"adapter_config.json is not a valid PEFT adapter config"):
        fp.load_model(saved_tiny[0], tmp_path)


def test_adapter_without_weights_names_the_expected_file(saved_tiny, tmp_path):
    (tmp_path / "adapter_config.json").write_bytes((saved_tiny[1] / "adapter_config.json").read_bytes())
    with pytest.raises(ValueError, match="no adapter_model.safetensors or adapter_model.bin"):
        fp.load_model(saved_tiny[0], tmp_path)


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
