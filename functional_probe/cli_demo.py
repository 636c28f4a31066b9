"""`functional-probe demo`: the whole probe on the embedded tiny model (`demo`), or on
SmolLM2-135M-Instruct doing arithmetic (`smollm2_demo`, the pipeline in demos/smollm2.py).
Only argparse at import time, so `--help` stays fast."""

from __future__ import annotations

import argparse

DEMO_GROUP = 8  # responses per prompt in the tiny demo's E and U


def adamw_state(model, lora, U, *, lr: float, steps: int):
    """A real AdamW state: `steps` policy-gradient steps (minimising −mean Ly) on U; returns the
    stepped LoRA dict and the optimizer's state (`AdamState`, whose `step` is the next one)."""
    import torch

    from .grads import mean_grad
    from .optim_step import AdamState

    params = {k: torch.nn.Parameter(v.clone()) for k, v in lora.items()}
    opt = torch.optim.AdamW(params.values(), lr=lr)
    for _ in range(steps):
        g = mean_grad(model, {k: p.detach() for k, p in params.items()}, U, loss="y")
        for k, p in params.items():
            p.grad = -g[k]
        opt.step()
    return {k: p.detach() for k, p in params.items()}, AdamState.from_optimizer(opt, params)


def demo(args: argparse.Namespace) -> int:
    """The tiny model, E and U drawn from it (a confidence reward), a few AdamW steps, then the
    probe of the next step (and with --first-order the entropy check along it); --model
    smollm2-135m: the arithmetic demo of demos/smollm2.py (`smollm2_demo`)."""
    if args.lr is None:
        args.lr = 1e-2 if args.model == "tiny" else 1e-3
    if args.model != "tiny":
        return smollm2_demo(args)
    from . import report
    from .cli import device_and_dtype
    from .cli_check import check_options, finish, run_check
    from .demos.synthetic import confident_rollouts
    from .model import tiny_model
    from .probe import probe
    from .validation import check_step_size

    check_step_size(args.lr, "--lr")
    args.check_scales = check_options(args)
    say = report.Progress(quiet=args.quiet)
    device, dtype = device_and_dtype(args)
    say(f"tiny NF4 model ({device}, {args.dtype}), U sampled from it")
    model = tiny_model(seed=args.seed, quantize="nf4", dtype=dtype, device=device)

    def draw(lora, seed: int):
        return confident_rollouts(model, lora, num_prompts=args.prompts, group_size=DEMO_GROUP, seed=seed).to_batch()

    U = draw(model.lora, args.seed)
    say(f"{args.steps} AdamW steps for an optimizer state")
    lora, state = adamw_state(model, model.lora, U, lr=args.lr, steps=args.steps)
    E = draw(lora, args.seed + 1)  # drawn from π at the probed θ: the X loss and the check need E ~ π_θ
    result = probe(model, lora, E, U, optimizer=state, method=args.method, progress=say,
                    x_estimator=args.x_estimator)  # fmt: skip
    check, settings = run_check(model, lora, E, U, state, result, args, say) if args.first_order else (None, None)
    finish(args, result, check, settings, say, None)
    return 0


def smollm2_demo(args: argparse.Namespace) -> int:
    """`functional-probe demo --model smollm2-135m`: fetch (cached) and load the model, run the
    pipeline, print the probe (and the entropy check), write the JSON (and the check's PNG)."""
    import json
    from pathlib import Path

    from transformers import AutoTokenizer

    from . import report
    from .demos.smollm2 import run_demo
    from .fetch import fetch_model
    from .model import load_model

    say = report.Progress(quiet=args.quiet)
    model_dir = fetch_model(args.model)
    say(f"SmolLM2-135M-Instruct from {model_dir} ({args.dtype}), fresh LoRA r=8")
    model = load_model(model_dir, dtype=args.dtype, device=args.device, seed=args.seed)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    out = run_demo(model, tokenizer, prompts=args.prompts, samples=args.samples, max_new_tokens=args.max_new_tokens,
                   steps=args.steps, lr=args.lr, seed=args.seed, check=args.first_order, progress=say)  # fmt: skip
    print(
        f"mean reward: training batches {', '.join(f'{r:.3f}' for r in out.train_rewards)}; "
        f"E {out.eval_reward:.3f}, U {out.update_reward:.3f}"
    )
    print(report.format_probe(out.probe, report.verdict(out.probe)))
    doc = {
        "probe": json.loads(out.probe.to_json()),
        "train_rewards": out.train_rewards,
        "eval_reward": out.eval_reward,
        "update_reward": out.update_reward,
        "sizes": dict(
            prompts=args.prompts, samples=args.samples, max_new_tokens=args.max_new_tokens, steps=args.steps
        ),
    }
    if out.check is not None:
        print(report.format_entropy_check(out.check))
        doc["entropy_check"] = out.check.to_dict()
        png = Path(args.out).with_suffix(".entropy_check.png")
        report.plot_entropy_check(out.check, png)
        say.done(f"wrote {png}")
    Path(args.out).write_text(json.dumps(doc, indent=2))
    say.done(f"wrote {args.out}")
    return 0
