"""Memory of NF4Linear's buffers against the fp32 weight they replace.

Run: ``python bench/nf4_memory.py``. NF4 with double quantization costs about
4.13 bits per weight (4 bits + 8-bit absmax per 64 + float32 per 256·64), plus a
fixed ~1.1 KB of code tables per layer.
"""

from __future__ import annotations

import torch

from functional_probe.nf4 import NF4Linear

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


def main() -> None:
    head = ("shape [out x in]", "fp32 bytes", "NF4 bytes", "ratio", "bits/w")
    print(f"{head[0]:>18} {head[1]:>12} {head[2]:>11} {head[3]:>7} {head[4]:>7}")
    for r in nf4_layer_bytes_table():
        shape = f"{r['out']} x {r['in']}"
        print(
            f"{shape:>18} {r['fp32_bytes']:>12,} {r['nf4_bytes']:>11,} "
            f"{r['ratio']:>7.4f} {r['bits_per_weight']:>7.3f}"
        )


if __name__ == "__main__":
    main()
