"""Command line: `functional-probe demo`."""

from __future__ import annotations

import argparse
import time

import torch

from .model import tiny_model


def demo(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    model = tiny_model(seed=args.seed, quantize="nf4")
    t_load = time.perf_counter() - t0
    ids = torch.randint(0, model.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    lora = model.lora

    def nll(lora):
        logits = model(lora, ids)
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())

    t0 = time.perf_counter()
    logits = model(lora, ids)
    t_fwd = time.perf_counter() - t0
    t0 = time.perf_counter()
    grads = torch.func.grad(nll)(lora)
    t_grad = time.perf_counter() - t0
    n_params = sum(v.numel() for v in lora.values())
    print(f"tiny NF4 model: {len(lora)} LoRA tensors, {n_params} LoRA parameters ({t_load:.2f} s)")
    print(f"forward  logits {tuple(logits.shape)}  {t_fwd * 1e3:.1f} ms")
    norm = torch.sqrt(sum(g.pow(2).sum() for g in grads.values())).item()
    print(f"grad     {len(grads)} tensors, ‖∇‖ = {norm:.4g}  {t_grad * 1e3:.1f} ms")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="functional-probe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_demo = sub.add_parser("demo", help="run on the embedded tiny NF4 model")
    p_demo.add_argument("--seed", type=int, default=0)
    p_demo.set_defaults(func=demo)
    args = parser.parse_args(argv)
    return args.func(args)
