"""Memory of NF4 against fp32: per layer, whole model, and the peak of a forward+backward.

Run: ``python bench/nf4_memory.py`` (add ``--skip-peak`` for the layer tables only).
NF4 with double quantization costs about 4.13 bits per weight (4 bits + 8-bit absmax per 64
+ float32 per 256·64), plus a fixed ~1.1 KB of code tables per layer. Embeddings, norms and
the output head stay unquantized, as in QLoRA. The peak is measured in a fresh process on a
random Qwen2.5-0.5B-shaped model (hidden 896, 24 layers, vocab 151936) built tensor by tensor,
as peak RSS minus the RSS after imports. Writes bench/results/nf4_memory.json.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from functional_probe.nf4 import NF4Linear

QWEN05 = dict(
    vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
    num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True,
)  # fmt: skip

SHAPES = [(256, 256), (896, 896), (4864, 896), (896, 4864), (4096, 4096), (11008, 4096)]


def nf4_layer_bytes_table(shapes=SHAPES) -> list[dict]:
    """One row per [out, in] shape: fp32 weight bytes, NF4Linear buffer bytes, their ratio."""
    rows = []
    for out_f, in_f in shapes:
        m = NF4Linear.from_weight(torch.randn(out_f, in_f))
        nf4 = sum(b.numel() * b.element_size() for b in m.buffers())
        fp32 = out_f * in_f * 4
        rows.append(
            {
                "out": out_f,
                "in": in_f,
                "fp32_bytes": fp32,
                "nf4_bytes": nf4,
                "ratio": nf4 / fp32,
                "bits_per_weight": 8 * nf4 / (out_f * in_f),
            }
        )
    return rows


def qwen05_model(quantize: str | None):
    """A random Qwen2.5-0.5B-shaped model, each tensor generated when the loader asks for it,
    so no full-precision copy of all linears exists while an NF4 model is built."""
    from transformers import Qwen2Config

    from functional_probe.model.base_weights import dense_or_nf4
    from functional_probe.model.loading import build_model
    from functional_probe.model.tiny import tiny_lora

    cfg = Qwen2Config(**QWEN05)

    def tensor(name: str) -> torch.Tensor | None:
        gen = torch.Generator().manual_seed(sum(map(ord, name)))
        shapes = {"embed_tokens": (cfg.vocab_size, cfg.hidden_size)}
        if "norm" in name:
            return torch.ones(cfg.hidden_size)
        if name.endswith(".bias"):
            return None if "o_proj" in name or "mlp" in name else torch.zeros(_out(cfg, name))
        if "embed_tokens" in name:
            return torch.randn(*shapes["embed_tokens"], generator=gen)
        out_f, in_f = _out(cfg, name), _in(cfg, name)
        return torch.randn(out_f, in_f, generator=gen) / in_f**0.5

    frozen = dense_or_nf4(tensor, quantize, torch.float32, "cpu")
    return build_model(cfg, tensor, frozen, tiny_lora(cfg, rank=8, alpha=16.0))


def _out(cfg, name: str) -> int:
    kv = cfg.num_key_value_heads * cfg.hidden_size // cfg.num_attention_heads
    table = {"q_proj": cfg.hidden_size, "k_proj": kv, "v_proj": kv, "o_proj": cfg.hidden_size,
             "gate_proj": cfg.intermediate_size, "up_proj": cfg.intermediate_size, "down_proj": cfg.hidden_size}  # fmt: skip
    return next(v for k, v in table.items() if k in name)


def _in(cfg, name: str) -> int:
    return cfg.intermediate_size if "down_proj" in name else cfg.hidden_size


def model_bytes(model) -> dict[str, int]:
    """Buffer bytes of the quantized/base linears and of everything else."""
    linear, other = 0, 0
    for name, b in model.named_buffers():
        nbytes = b.numel() * b.element_size()
        if ".base." in name or any(f"{p}." in name for p in ("_proj",)):
            linear += nbytes
        else:
            other += nbytes
    return {"linear_bytes": linear, "other_bytes": other, "total_bytes": linear + other}


def peak_forward_backward(quantize: str | None) -> dict[str, float]:
    """In this (fresh) process: build, then one forward+backward of 2 × 128 tokens."""
    from harness import current_rss, peak_rss, reset_peak_rss

    import functional_probe as fp

    torch.set_num_threads(2)
    reset_peak_rss()  # the high-water mark a fresh process inherits is its parent's
    after_imports = current_rss()
    model = qwen05_model(quantize)
    batch = fp.make_batch([[1] * 64] * 2, [[[2] * 64]] * 2)
    fp.mean_grad(model, model.lora, batch, loss="x")
    return {"peak_minus_imports_mib": (peak_rss() - after_imports) / 2**20, **model_bytes(model)}


def main() -> None:
    head = ("shape [out x in]", "fp32 bytes", "NF4 bytes", "ratio", "bits/w")
    print(f"{head[0]:>18} {head[1]:>12} {head[2]:>11} {head[3]:>7} {head[4]:>7}")
    table = nf4_layer_bytes_table()
    for r in table:
        shape = f"{r['out']} x {r['in']}"
        print(
            f"{shape:>18} {r['fp32_bytes']:>12,} {r['nf4_bytes']:>11,} "
            f"{r['ratio']:>7.4f} {r['bits_per_weight']:>7.3f}"
        )
    result = {"layers": table}
    if "--skip-peak" not in sys.argv:
        for quantize in ("nf4", None):
            out = subprocess.run(
                [sys.executable, __file__, "--peak", str(quantize)],
                capture_output=True,
                text=True,
                check=True,
            )
            result[str(quantize)] = json.loads(out.stdout.strip().splitlines()[-1])
        nf4, fp32 = result["nf4"], result["None"]
        print("\nQwen2.5-0.5B-shaped random model (tied embeddings; LoRA r=8 on all projections)")
        print(f"{'':>6} {'linears MiB':>12} {'other MiB':>10} {'total MiB':>10} {'peak fwd+bwd MiB':>17}")
        for label, r in (("fp32", fp32), ("nf4", nf4)):
            print(f"{label:>6} {r['linear_bytes'] / 2**20:>12.1f} {r['other_bytes'] / 2**20:>10.1f} "
                  f"{r['total_bytes'] / 2**20:>10.1f} {r['peak_minus_imports_mib']:>17.0f}")  # fmt: skip
        print(f"linear bytes NF4/fp32 = {nf4['linear_bytes'] / fp32['linear_bytes']:.4f}")
    path = Path(__file__).parent / "results" / "nf4_memory.json"
    path.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    if "--peak" in sys.argv:
        q = sys.argv[sys.argv.index("--peak") + 1]
        print(json.dumps(peak_forward_backward(None if q == "None" else q)))
    else:
        main()
