"""Command line: `functional-probe demo | run | bench`.

Bad input (missing paths, malformed JSONL, an optimizer state that does not match the
adapter, token ids outside the vocabulary) exits with code 2 and a one-line message.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from . import report
from .batch import Batch
from .distributed import local_device, process_group_from_env, shard_rollouts
from .first_order import etas_for_relative_steps, first_order_check
from .grads import mean_grad
from .model import load_model, tiny_model
from .precondition import AdamPreconditioner
from .probe import probe
from .rollouts import read_rollouts
from .synthetic import sample_rollouts


def adamw_state(model, lora, U, *, lr: float, steps: int):
    """A real AdamW state: `steps` policy-gradient steps (minimising −mean Ly) on U."""
    params = {k: torch.nn.Parameter(v.clone()) for k, v in lora.items()}
    opt = torch.optim.AdamW(params.values(), lr=lr)
    for _ in range(steps):
        g = mean_grad(model, {k: p.detach() for k, p in params.items()}, U, loss="y")
        for k, p in params.items():
            p.grad = -g[k]
        opt.step()
    return {k: p.detach() for k, p in params.items()}, AdamPreconditioner.from_optimizer(opt, params)


def demo(args: argparse.Namespace) -> int:
    say = report.Progress(quiet=args.quiet)
    say("tiny NF4 model, sampled rollouts")
    model = tiny_model(seed=args.seed, quantize="nf4")
    rollouts = sample_rollouts(model, model.lora, num_prompts=2 * args.prompts, group_size=4, seed=args.seed)
    batch = rollouts.to_batch()
    E, U = batch[: args.prompts], batch[args.prompts :]
    say(f"{args.steps} AdamW steps for an optimizer state")
    lora, pre = adamw_state(model, model.lora, U, lr=args.lr, steps=args.steps)
    result = probe(model, lora, E, U, preconditioner=pre, eta=args.lr, method=args.method, progress=say)
    print(report.format_probe(result))
    Path(args.out).write_text(result.to_json())
    say.done(f"wrote {args.out}")
    if args.first_order:
        etas = etas_for_relative_steps(model, lora, U, pre, [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1])
        check = first_order_check(model, lora, E, U, pre, etas)
        png = Path(args.out).with_suffix(".first_order.png")
        print(report.format_first_order(check))
        report.plot_first_order(check, png)
        say.done(f"wrote {png}")
    return 0


def load_optimizer_state(path: Path, names: list[str]) -> AdamPreconditioner:
    if not path.is_file():
        raise ValueError(f"{path}: optimizer state file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors come in many types; all mean "not a state dict"
        raise ValueError(f"{path}: not a torch.save'd optimizer state_dict ({type(err).__name__})") from err
    try:
        return AdamPreconditioner.from_state_dict(state, names)
    except ValueError as err:
        raise ValueError(f"{path}: optimizer state does not match the adapter: {err}") from err


def tokenizer_of(model_dir: Path):
    """The model directory's tokenizer, if it has one (needed only for text rollouts)."""
    if not any((model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def run(args: argparse.Namespace) -> int:
    """`functional-probe run`; under torchrun (RANK, WORLD_SIZE set) one process per rank."""
    with process_group_from_env() as (rank, world):
        return run_ranked(args, rank, world)


def run_ranked(args: argparse.Namespace, rank: int, world: int) -> int:
    """Every rank loads the model and reads both files whole (so every rank validates the same
    input and raises the same error), keeps its contiguous shard of E and U and runs the
    probe; the collectives make the result global and identical, and rank 0 alone prints it
    and writes the JSON."""
    say = report.Progress(quiet=args.quiet or rank != 0)
    for flag, path in (("--model", args.model), ("--eval", args.eval), ("--update", args.update)):
        if not Path(path).exists():
            raise ValueError(f"{flag} {path}: no such file or directory")
    say("loading model" if world == 1 else f"loading model on each of {world} ranks")
    model = load_model(args.model, args.adapter, quantize=args.quantize, device=local_device())
    state_path = args.optimizer_state or (Path(args.adapter) / "optimizer.pt" if args.adapter else None)
    if state_path is None:
        raise ValueError("--optimizer-state is required (or an --adapter directory holding optimizer.pt)")
    pre = load_optimizer_state(Path(state_path), list(model.lora))
    tokenizer = tokenizer_of(Path(args.model))
    E, U = (read_shard(path, tokenizer, model.vocab_size, rank, world) for path in (args.eval, args.update))
    result = probe(
        model, model.lora, E, U, preconditioner=pre, eta=args.lr, method=args.method,
        microbatch=args.microbatch, progress=say,
    )  # fmt: skip
    if rank == 0:
        print(report.format_probe(result))
        Path(args.out).write_text(result.to_json())
        say.done(f"wrote {args.out}")
    return 0


def read_shard(path: str, tokenizer, vocab_size: int, rank: int, world: int) -> Batch | None:
    """Read and validate the whole rollout file (token ids against the vocabulary too, with
    the file's prompt numbering), then keep this rank's shard; None if it is empty."""
    rollouts = read_rollouts(path, tokenizer=tokenizer)
    for n, (prompt, group) in enumerate(zip(rollouts.prompts, rollouts.responses, strict=True)):
        for what, ids in [("prompt", prompt)] + [(f"response {g}", r) for g, r in enumerate(group)]:
            bad = [t for t in ids if t >= vocab_size]
            if bad:
                raise ValueError(f"{path}: prompt {n}: {what} has id {bad[0]}, outside the "
                                 f"vocabulary [0, {vocab_size})")  # fmt: skip
    shard = shard_rollouts(rollouts, rank, world)
    return shard.to_batch() if len(shard) else None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="functional-probe", description="First-order entropy probe of one RL step."
    )
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="the whole probe on the embedded tiny NF4 model")
    d.add_argument("--prompts", type=int, default=8, help="prompts in each of E and U")
    d.add_argument("--steps", type=int, default=3, help="AdamW steps before probing")
    d.add_argument("--lr", type=float, default=1e-3)
    d.add_argument("--first-order", action="store_true", help="also check the first-order picture")
    r = sub.add_parser("run", help="the probe on local checkpoints")
    r.add_argument("--model", required=True, help="Hugging Face model directory")
    r.add_argument("--adapter", help="PEFT LoRA adapter directory")
    r.add_argument("--quantize", choices=["nf4"], default=None)
    r.add_argument("--optimizer-state", help="torch.save'd AdamW state_dict (default: ADAPTER/optimizer.pt)")
    r.add_argument("--lr", type=float, required=True, help="the step size η (AdamW learning rate)")
    r.add_argument("--eval", required=True, help="evaluation rollouts E (JSONL)")
    r.add_argument("--update", required=True, help="update rollouts U (JSONL)")
    r.add_argument("--microbatch", type=int, default=None)
    for q in (d, r):
        q.add_argument("--method", default="jvp", choices=["jvp", "vjp", "func_jvp", "vmap", "loop"])
        q.add_argument("--seed", type=int, default=0)
        q.add_argument("--out", default="probe_result.json", help="where to write the JSON result")
        q.add_argument("--quiet", action="store_true", help="no progress, only the result table")
    d.set_defaults(func=demo)
    r.set_defaults(func=run)
    b = sub.add_parser("bench", help="a quick subset of bench/ (< 2 minutes)")
    b.set_defaults(func=bench)
    return p


def bench(args: argparse.Namespace) -> int:
    from .quick_bench import quick_report

    print(quick_report())
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as err:  # under torchrun every rank raises the same error; rank 0 says it
        if os.environ.get("RANK", "0") == "0":
            print(f"functional-probe: error: {err}", file=sys.stderr)
        return 2
