"""Does δH₁ come true on a real model? SmolLM2-135M-Instruct (GGUF Q4_1 de-quantized, fp32, LoRA r=8 on
all 7 projections) after `--train-steps` real AdamW steps on arithmetic (functional_probe.demos.smollm2).

Parts (each one short run under the bench lock; results merge into bench/results/smollm2_eta_sweep.json,
a part already there is skipped unless --redo; calibration resumes replicate by replicate):

* sweep — E, U: `--prompts` × `--samples` sampled at θ; δH₁ ± SE of the exact next AdamW step
  (`fp.probe(optimizer=...)`, `--x-estimator`); `fp.entropy_check` along θ + s·Δθ for `--scales`
  against fresh coupled sampling ("crn"), its Rao–Blackwellised entropies ("rb") and θ's fresh
  responses reweighted to θ' ("rb_is"), `--check-samples` per prompt, the prediction ± its SE
  given U (se_conditional: the step is fixed): the log-log slope and R² of realized vs predicted
  over the first-order range, and per scale realized/predicted and z = (realized − predicted) /
  hypot(SEs) (the slope is blind to a constant factor: the ratio is the magnitude check); the
  batch that resolves δH₁ at 3 SE from the measured variance, B_needed = B·(3·SE/|δH₁|)² (SE ∝ 1/√B
  with B = B_E = B_U). PNG: bench/results/smollm2_eta_sweep.png.
* estimators — on the sweep's E (same draws) and step: the SE of δH₁ = <μX, Δθ> by
  `fp.alpha_variance` with x_estimator "loo" and "rb" (equal B_E, same E and Δθ).
* calibration — R = `--replicates` independent replicate pairs (E_r, U_r) of `--replicate-prompts`
  × `--samples` at the same θ and optimizer state; δH₁_r ± SE_r each; χ² = Σ_r (δH₁_r − mean)² /
  mean_r(SE_r²) on R − 1 degrees of freedom (≈ R − 1 when the SE is honest), and SD / RMS(SE);
  from R = 4 on, `heavy_tail` (`functional_probe.calibration.calibrate`): the excess kurtosis of
  δH₁_r, the Satterthwaite p-value, a bootstrap 90% interval of SD/RMS SE, the z-scores' coverage
  and the rank correlation of SE_r with |δH₁_r − mean|; `coverage_t2`: the share inside the verdict's t
  threshold on each replicate's dof. `--replicates` ≤ R stored re-summarises.

The trained state (θ, AdamW moments) is deterministic given the sizes and seed; it is cached in
the user cache (functional_probe/bench/) so that each part does not retrain.
Run: `flock /tmp/fp_bench.lock nice -n -10 env OMP_NUM_THREADS=2 PYTHONPATH=$PWD python
bench/smollm2_eta_sweep.py --part sweep|estimators|calibration [sizes]`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch

import functional_probe as fp
from functional_probe.calibration import calibrate, t_multiplier, welch_dof
from functional_probe.demos.smollm2 import adamw_steps, batches, exact_step
from functional_probe.entropy_check import EntropyCheck, EntropyCheckPoint
from functional_probe.fetch import cache_dir, fetch_model

RESULTS = Path(__file__).parent / "results"
OUT = RESULTS / "smollm2_eta_sweep.json"
SCALES = (0.03, 0.06, 0.125, 0.25, 0.5, 1.0, 2.0)  # the step is ~4% of ‖θ‖ after 3 AdamW steps at lr 1e-3; s* ≈ 0.4


def trained(args, model, tokenizer):
    """(draw, θ, optimizer, named params) after args.train_steps AdamW steps, cached on disk."""
    key = (
        f"p{args.prompts}g{args.samples}L{args.max_new_tokens}s{args.train_steps}lr{args.lr:g}seed{args.seed}"
    )
    path = cache_dir() / "bench" / f"smollm2_trained_{key}.pt"
    draw = batches(model, tokenizer, prompts=args.prompts, samples=args.samples, max_new_tokens=args.max_new_tokens,
                   seed=args.seed)  # fmt: skip
    if path.exists():
        saved = torch.load(path)
        params = {k: torch.nn.Parameter(v) for k, v in saved["params"].items()}
        opt = torch.optim.AdamW(params.values(), lr=args.lr)
        opt.load_state_dict(saved["opt"])
        rewards = saved["rewards"]
    else:
        opt, params, rewards = adamw_steps(model, model.lora, draw, steps=args.train_steps, lr=args.lr)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"params": {k: p.detach() for k, p in params.items()}, "opt": opt.state_dict(),
                    "rewards": rewards}, path)  # fmt: skip
    return draw, {k: p.detach() for k, p in params.items()}, opt, params, rewards


def sizes(args) -> dict:
    return dict(prompts=args.prompts, samples=args.samples, max_new_tokens=args.max_new_tokens,
                train_steps=args.train_steps, lr=args.lr, seed=args.seed,
                threads=int(os.environ.get("OMP_NUM_THREADS", "0")) or torch.get_num_threads())  # fmt: skip


def probe_of(model, theta, E, U, opt, params, x_estimator: str = "loo") -> dict:
    r = fp.probe(model, theta, E.batch, U.batch, optimizer=opt, named_params=params, x_estimator=x_estimator)
    return dict(delta_h1=r.delta_h1, se=r.se, se_conditional=r.se_conditional, se_jackknife=r.se_jackknife,
                V_X=r.V_X, V_Y=r.V_Y, B_E=r.B_E, B_U=r.B_U, eta=r.eta, x_estimator=x_estimator,
                seconds=r.timings["total"], E_reward=float(E.rewards.mean()), U_reward=float(U.rewards.mean()))  # fmt: skip


def agreement(check: EntropyCheck) -> dict:
    """Per estimator and scale: realized / predicted and z = (realized − predicted) / hypot(SEs)."""
    out = {}
    for e in check.estimators:
        out[e] = [dict(scale=p.scale, ratio=p.realized[e] / p.predicted,
                       z=(p.realized[e] - p.predicted) / math.hypot(p.realized_se[e], p.predicted_se))
                  for p in check.points]  # fmt: skip
    return out


def sweep(args, model, tokenizer, draw, theta, opt, params) -> dict:
    E, U = draw(theta, args.train_steps), draw(theta, args.train_steps + 1)
    p = probe_of(model, theta, E, U, opt, params, args.x_estimator)
    step = exact_step(model, theta, U.batch, opt, params)
    start = time.perf_counter()
    check = fp.entropy_check(model, theta, step, E.batch, args.scales, delta_h1=p["delta_h1"],
                             delta_h1_se=p["se_conditional"], samples_per_prompt=args.check_samples,
                             max_new_tokens=args.max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                             seed=args.seed + 7)  # fmt: skip
    b_needed = {k: p["B_E"] * (3 * p[k] / abs(p["delta_h1"])) ** 2 for k in ("se", "se_conditional", "se_jackknife")}
    return dict(probe=p, check=check.to_dict(), agreement=agreement(check), check_seconds=time.perf_counter() - start,
                check_samples=args.check_samples, b_needed_3se=b_needed)  # fmt: skip


def estimators(args, model, tokenizer, draw, theta, opt, params) -> dict:
    E, U = draw(theta, args.train_steps), draw(theta, args.train_steps + 1)  # the sweep's draws
    step = exact_step(model, theta, U.batch, opt, params)
    out = {}
    for x in ("loo", "rb"):
        start = time.perf_counter()
        a = fp.alpha_variance(theta, E.batch, model=model, direction=step, x_estimator=x)
        out[x] = dict(delta_h1=a.mean, se=a.se, seconds=time.perf_counter() - start, B_E=a.n,
                      b_needed_3se=a.n * (3 * a.se / abs(a.mean)) ** 2)  # fmt: skip
    out["se_ratio_rb_over_loo"] = out["rb"]["se"] / out["loo"]["se"]
    return out


def calibration(args, model, tokenizer, draw, theta, opt, params, done: dict | None, deadline: float,
                part: str) -> dict:  # fmt: skip
    """Replicates r = len(done's) .. R−1 until the deadline; the χ² over all replicates so far."""
    reps = list(done["replicates"]) if done else []
    pdraw = batches(model, tokenizer, prompts=args.replicate_prompts, samples=args.samples,
                    max_new_tokens=args.max_new_tokens, seed=args.seed + 1)  # fmt: skip
    while len(reps) < args.replicates and time.time() < deadline:
        r = len(reps)
        reps.append(probe_of(model, theta, pdraw(theta, 2 * r), pdraw(theta, 2 * r + 1), opt, params, args.x_estimator))
        save_part(part, summary(reps, args))
    return summary(reps, args)


def summary(reps: list[dict], args) -> dict:
    d = torch.tensor([r["delta_h1"] for r in reps], dtype=torch.float64)
    out = dict(replicates=reps, R=len(reps), replicate_prompts=args.replicate_prompts, samples=args.samples)
    if len(reps) >= 2:
        spread = float(((d - d.mean()) ** 2).sum())
        out |= dict(dof=len(reps) - 1, mean=float(d.mean()), sd=math.sqrt(spread / (len(reps) - 1)))
        for name in ("se", "se_jackknife"):
            if all(r.get(name) is not None for r in reps):
                ms = sum(r[name] ** 2 for r in reps) / len(reps)
                tag = "" if name == "se" else "_jackknife"
                out |= {f"chi2{tag}": spread / ms, f"rms_se{tag}": math.sqrt(ms),
                        f"sd_over_rms_se{tag}": out["sd"] / math.sqrt(ms)}  # fmt: skip
                if len(reps) >= 4:
                    out[f"heavy_tail{tag}"] = asdict(calibrate(d, [r[name] for r in reps]))
        out["coverage_t2"] = t_coverage(reps, d)
    return out


def t_coverage(reps: list[dict], d: torch.Tensor) -> float:
    """Share of replicates with |z_r| ≤ the probe's verdict threshold (the t multiplier of 2 SE on
    replicate r's Welch dof of V_X, V_Y on B_E − 1, B_U − 1); z_r as in `calibrate` (95 % if honest)."""
    z = (d - d.mean()) / torch.tensor([r["se"] for r in reps], dtype=torch.float64) * math.sqrt(len(reps) / (len(reps) - 1))
    at = [t_multiplier(2.0, welch_dof([r["V_X"], r["V_Y"]], [r["B_E"] - 1, r["B_U"] - 1])) for r in reps]
    return float((z.abs() <= torch.tensor(at, dtype=torch.float64)).double().mean())


def load() -> dict:
    return json.loads(OUT.read_text()) if OUT.exists() else {}


def save_part(name: str, value: dict) -> None:
    doc = load()
    doc[name] = value
    RESULTS.mkdir(exist_ok=True)
    OUT.write_text(json.dumps(doc, indent=2))


def plot(doc: dict) -> None:
    c = dict(doc["sweep"]["check"])
    c["points"] = [EntropyCheckPoint(**p) for p in c["points"]]
    fp.report.plot_entropy_check(EntropyCheck(**c), OUT.with_suffix(".png"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=["sweep", "estimators", "calibration", "plot"], required=True)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--train-steps", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scales", type=float, nargs="+", default=list(SCALES))
    p.add_argument(
        "--check-samples", type=int, default=4, help="fresh responses per prompt of the realized ΔH"
    )
    p.add_argument("--x-estimator", choices=["loo", "rb"], default="rb", help="sweep/calibration: the probe's X loss")
    p.add_argument("--replicates", type=int, default=10)
    p.add_argument("--replicate-prompts", type=int, default=8)
    p.add_argument("--minutes", type=float, default=12.0, help="calibration: start no replicate after this")
    p.add_argument("--redo", action="store_true")
    args = p.parse_args()
    deadline, doc = time.time() + 60 * args.minutes, load()
    if args.part == "plot":
        return plot(doc)
    part = args.part if args.part != "calibration" or args.x_estimator == "loo" else f"calibration_{args.x_estimator}"
    old = doc.get(part)
    if old is not None and not args.redo and (args.part != "calibration" or old["R"] >= args.replicates):
        if args.part == "calibration":  # re-summarise the stored replicates (no model needed)
            save_part(part, old | summary(old["replicates"], args))
        return print(f"{args.part}: already in {OUT} (--redo to remeasure)")
    start = time.perf_counter()
    model = fp.load_model(fetch_model("smollm2-135m"), seed=args.seed)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(fetch_model("smollm2-135m")))
    state = trained(args, model, tokenizer)
    draw, theta, opt, params, rewards = state
    run = dict(sweep=sweep, estimators=estimators)
    if args.part == "calibration":
        value = calibration(
            args, model, tokenizer, draw, theta, opt, params, None if args.redo else old, deadline, part
        )
    else:
        value = run[args.part](args, model, tokenizer, draw, theta, opt, params)
    value |= dict(sizes=sizes(args), train_rewards=rewards, seconds=time.perf_counter() - start,
                  load_average=os.getloadavg()[0])  # fmt: skip
    save_part(part, value)
    if args.part == "sweep":
        plot(load())
    print(json.dumps({k: v for k, v in value.items() if k not in ("check", "replicates")}, indent=2))


if __name__ == "__main__":
    main()
