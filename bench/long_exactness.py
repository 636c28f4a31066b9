"""Long sequences stay exact (issue 12): at T = 2048 response tokens, fp32.

Model: bench/long_sequences.py's random SmolLM2-135M-shaped model (hidden 576, 9 q / 3 kv heads,
MLP 1536, vocab 49152, tied embeddings, LoRA r=8 on all 7 projections, both factors non-zero)
cut to `--layers` decoder layers (default 4: the per-layer kernels are the same in every layer;
the 30-layer mean_grad agreement is the grad rel err column of bench/results/long_sequences.md).
Batch: 1 prompt of 64 tokens × 4 responses of T tokens (rows of 64 + T columns).

(a) `fp.mean_grad` (X loss; SDPA attention, recompute head and per-layer checkpointing, the
    library's first-order reverse kernels at this size) against transformers + PEFT autograd
    (attn_implementation="sdpa", no checkpointing, full logits + log_softmax, the seed's X
    loss): err = max over LoRA keys of ‖g − g_ref‖ / ‖g_ref‖. Bar: ≤ 1e-4.
(b) the block-wise dual (`sequence_logprobs_and_tangent`: query/key blocks, online softmax)
    against `torch.func.jvp` of `sequence_logprobs` over the plain forward (einsum attention
    with the full [T, T] scores, PLAIN kernels), along a random direction: ‖Ṡ − Ṡ_ref‖ / ‖Ṡ_ref‖
    and ‖S − S_ref‖ / ‖S_ref‖ over the 4 rows. Bar: ≤ 1e-5. Also s from
    `alpha_projections(method="jvp")` against method="func_jvp".

Run: `flock /tmp/fp_bench.lock nice -n -10 env OMP_NUM_THREADS=2 PYTHONPATH=$PWD
python bench/long_exactness.py [--T 2048] [--layers 4]`. Writes bench/results/long_exactness.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from harness.baselines import peft_sequence_logprobs, seed_x_losses, trainable
from harness.memory import machine_info
from long_sequences import RESULTS, long_batch, smollm2_model
from torch.func import jvp

import functional_probe as fp
from functional_probe.grads import response_chunks
from functional_probe.logprobs import sequence_logprobs, sequence_logprobs_and_tangent
from functional_probe.testing import peft_twin


def rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    """‖got − ref‖ / ‖ref‖ in float64."""
    return ((got.double() - ref.double()).norm() / ref.double().norm()).item()


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def mean_grad_check(model, batch) -> dict:
    """(a): fp.mean_grad against transformers + PEFT autograd (SDPA, no checkpointing)."""
    got, t_ours = timed(lambda: fp.mean_grad(model, model.lora, batch, loss="x"))
    peft_model = peft_twin(model, attn_implementation="sdpa")
    params = trainable(peft_model)

    def anchor():
        loss = seed_x_losses(peft_sequence_logprobs(peft_model, batch), batch).mean()
        return dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True))

    ref, t_ref = timed(anchor)
    errs = {k: rel(got[k], ref[k]) for k in ref}
    worst = max(errs, key=errs.get)
    return {"max_rel_err": errs[worst], "worst_key": worst, "global_rel_err": rel(
        torch.cat([got[k].flatten() for k in ref]), torch.cat([ref[k].flatten() for k in ref])),
        "ref_norm": torch.cat([ref[k].flatten() for k in ref]).double().norm().item(),
        "seconds": {"mean_grad": t_ours, "peft_autograd": t_ref}}  # fmt: skip


def dual_check(model, batch) -> dict:
    """(b): the block-wise dual against torch.func.jvp over the plain forward."""
    gen = torch.Generator().manual_seed(1)
    lora = model.lora
    direction = {k: torch.randn(v.shape, generator=gen) for k, v in lora.items()}
    (S, S_dot), t_dual = timed(lambda: sequence_logprobs_and_tangent(model, lora, direction, batch))
    (S_ref, S_dot_ref), t_jvp = timed(
        lambda: jvp(lambda p: sequence_logprobs(model, p, batch), (dict(lora),), (direction,))
    )
    s, t_s = timed(lambda: fp.alpha_projections(model, lora, batch, direction, method="jvp"))
    s_ref, t_s_ref = timed(lambda: fp.alpha_projections(model, lora, batch, direction, method="func_jvp"))
    return {"S_rel_err": rel(S, S_ref), "S_dot_rel_err": rel(S_dot, S_dot_ref), "s_rel_err": rel(s, s_ref),
            "S": S.tolist(), "S_ref": S_ref.tolist(), "S_dot": S_dot.tolist(), "S_dot_ref": S_dot_ref.tolist(),
            "s": s.tolist(), "s_ref": s_ref.tolist(), "direction_seed": 1,
            "seconds": {"dual": t_dual, "func_jvp": t_jvp, "alpha_jvp": t_s, "alpha_func_jvp": t_s_ref}}  # fmt: skip


def x_projection(S: torch.Tensor, S_dot: torch.Tensor, batch) -> torch.Tensor:
    """s = d/dε Lx(S + ε·Ṡ) [N] in S's dtype: the X loss's jvp, as alpha_projections(method="jvp")
    takes it (the leave-one-out coefficient c = w − b, w = S/Lmax, under stop-gradient)."""
    return jvp(lambda S: fp.x_losses(S, batch), (S,), (S_dot,))[1]


def kappa_S(S: torch.Tensor, S_dot: torch.Tensor, batch) -> float:
    """Σ_h |∂s/∂S_h|·|S_h| / |s| for one prompt (N = 1). s is linear and homogeneous in S (c = w − b
    with w = S/Lmax; the stop-gradient only hides this from autograd), so ∂s/∂S_h = s(e_h, Ṡ)."""
    grads = torch.stack([x_projection(e[None], S_dot, batch)[0] for e in torch.eye(S.shape[1], dtype=S.dtype)])
    return ((grads.abs() * S[0].abs()).sum() / x_projection(S, S_dot, batch).abs().sum()).item()


def float64_reference(layers: int, batch, dual: dict) -> dict:
    """(c): where the fp32 s error comes from. The same model and direction in float64: the
    block-wise dual (whole batch) and torch.func.jvp over the plain forward (one response per
    call, to bound memory) give S, Ṡ, s; both fp32 results are compared with them, and s is
    recomputed in float64 from each fp32 (S, Ṡ) to separate the forward's error from the loss's.
    kappa = Σ_g |c_g Ṡ_g| / |Σ_g c_g Ṡ_g| is the cancellation factor of s = −mean_g(c_g Ṡ_g);
    kappa_S = Σ_h |∂s/∂S_h|·|S_h| / |s| its condition number in S (through c, whose w = S/Lmax
    are nearly equal): an S relative error e moves s by about kappa_S·e relative."""
    model = smollm2_model(layers=layers, dtype=torch.float64)
    lora = model.lora
    gen = torch.Generator().manual_seed(dual["direction_seed"])
    direction = {k: torch.randn(v.shape, generator=gen).double() for k, v in lora.items()}
    (S_d, S_dot_d), t_dual = timed(lambda: sequence_logprobs_and_tangent(model, lora, direction, batch))
    f = lambda part: jvp(lambda p: sequence_logprobs(model, p, part), (dict(lora),), (direction,))  # noqa: E731
    pairs, t_jvp = timed(lambda: [f(part) for part in response_chunks(batch, 1)])
    S64, S_dot64 = (torch.cat(t, dim=1) for t in zip(*pairs, strict=True))
    s64 = x_projection(S64, S_dot64, batch)
    w = S64 / batch.max_lengths.double()[:, None]
    c = w - (w.sum(1, keepdim=True) - w) / (batch.group_size - 1)
    out = {"dual64_vs_jvp64": {"S": rel(S_d, S64), "S_dot": rel(S_dot_d, S_dot64), "s": rel(x_projection(S_d, S_dot_d, batch), s64)},
           "s64": s64.tolist(), "S64": S64.tolist(), "S_dot64": S_dot64.tolist(), "c64": c.tolist(),
           "kappa": ((c * S_dot64).abs().sum() / (c * S_dot64).sum().abs()).item(),
           "kappa_S": kappa_S(S64, S_dot64, batch),
           "seconds": {"dual64": t_dual, "func_jvp64": t_jvp}}  # fmt: skip
    for name, (S, S_dot, s) in {"dual32": ("S", "S_dot", "s"), "func_jvp32": ("S_ref", "S_dot_ref", "s_ref")}.items():
        S, S_dot, s = (torch.tensor(dual[k], dtype=torch.float64) for k in (S, S_dot, s))
        out[name] = {"S": rel(S, S64), "S_dot": rel(S_dot, S_dot64), "s": rel(s, s64),
                     "s_from_fp32_S_reduced_in_float64": rel(x_projection(S, S_dot, batch), s64),
                     "s_with_S64_and_fp32_S_dot": rel(x_projection(S64, S_dot, batch), s64)}  # fmt: skip
    return out


def write(result: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "long_exactness.json").write_text(json.dumps(result, indent=2))
    a, b = result["mean_grad"], result["dual"]
    lines = [
        f"# Long-sequence exactness: T = {result['T']}, SmolLM2-135M shape cut to {result['layers']} layers, fp32",
        "",
        "1 prompt of 64 tokens x 4 responses of T tokens, LoRA r=8 (both factors non-zero).",
        f"Machine: {result['machine']}.",
        "",
        "| check | error | bar |",
        "|---|---|---|",
        f"| mean_grad vs transformers + PEFT autograd (SDPA): max over keys ‖g − g_ref‖/‖g_ref‖ | "
        f"{a['max_rel_err']:.1e} ({a['worst_key'].removeprefix('base_model.model.model.')}) | ≤ 1e-4 |",
        f"| same, all keys as one vector | {a['global_rel_err']:.1e} | ≤ 1e-4 |",
        f"| block-wise dual vs torch.func.jvp over the plain forward: Ṡ (4 rows) | {b['S_dot_rel_err']:.1e} | ≤ 1e-5 |",
        f"| same: S (4 rows) | {b['S_rel_err']:.1e} | ≤ 1e-5 |",
        f"| alpha_projections jvp vs func_jvp: s | {b['s_rel_err']:.1e} | ≤ 1e-5 |",
        "",
        *float64_lines(result["float64"], b["s_rel_err"]),
        "",
        f"Seconds (contended, for orientation): {a['seconds'] | b['seconds'] | result['float64']['seconds']}.",
    ]
    (RESULTS / "long_exactness.md").write_text("\n".join(lines) + "\n")


def float64_lines(r: dict, dual_s_err: float) -> list[str]:
    """The float64-reference table of (c) and what it shows (`dual_s_err`: s, jvp vs func_jvp)."""
    d, j = r["dual32"], r["func_jvp32"]
    return [
        "## Where the s difference comes from: float64 reference (same model and direction in float64)",
        "",
        "| relative error vs float64 func.jvp | S | Ṡ | s | s from the fp32 (S, Ṡ), loss in float64 | s from float64 S, fp32 Ṡ |",
        "|---|---|---|---|---|---|",
        *(f"| {name} | {x['S']:.1e} | {x['S_dot']:.1e} | {x['s']:.1e} | {x['s_from_fp32_S_reduced_in_float64']:.1e} | "
          f"{x['s_with_S64_and_fp32_S_dot']:.1e} |" for name, x in (("block-wise dual, fp32", d), ("torch.func.jvp, fp32", j))),
        f"| block-wise dual, float64 | {r['dual64_vs_jvp64']['S']:.1e} | {r['dual64_vs_jvp64']['S_dot']:.1e} | "
        f"{r['dual64_vs_jvp64']['s']:.1e} | — | — |",
        "",
        f"s = −mean_g(c_g·Ṡ_g) with c = w − b, w = S/Lmax: the four w are nearly equal (c = {[round(c, 4) for c in r['c64'][0]]},",
        f"S ≈ {r['S64'][0][0]:.0f}), so s is ill-conditioned in S: kappa_S = Σ_h |∂s/∂S_h|·|S_h|/|s| = {r['kappa_S']:.0f}",
        f"(cancellation in the sum over g: kappa = {r['kappa']:.1f}); an S error e moves s by about kappa_S·e, and rounding S",
        f"to fp32 alone (unit roundoff 6e-8) by up to {r['kappa_S'] * 2**-24:.1e}. The float64 dual equals float64 func.jvp to",
        f"{max(r['dual64_vs_jvp64'].values()):.0e}: the block-wise path (attention blocks, packing, chunked head) has no bug.",
        "Before commit 13e522f the dual summed each row's 2048 token log-probs with a serial fp32 index_add_: its S was",
        "6.8e-7 from float64 (func.jvp's blocked masked sum 2.9e-8), and s 1.2e-4 from float64, 1.1e-4 from func_jvp; the",
        "row sums are now blocked (model/packing.py row_sums). What remains is fp32 rounding, the same in both methods:",
        f"their s are {d['s']:.1e} and {j['s']:.1e} from float64 but agree with each other to {dual_s_err:.1e}, since the",
        "loss rounds w = S/Lmax and c = w − b in fp32 (kappa_S·u above) the same way for nearly equal S. Between two fp32",
        "methods s differs by up to kappa_S·(e_S,a + e_S,b) + the Ṡ part (column 'float64 S, fp32 Ṡ'); with each S within",
        f"2 unit roundoffs of float64 that is {r['kappa_S'] * 4 * 2**-24:.1e} + the Ṡ part: the justified tolerance for s at",
        f"this T (measured {dual_s_err:.1e}: {'within' if dual_s_err <= 1e-5 else 'above'} 1e-5 here); S and Ṡ keep the 1e-5 bar.",
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--T", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(2)
    model, batch = smollm2_model(layers=args.layers), long_batch(args.T)
    result = {"T": args.T, "layers": args.layers, "machine": machine_info()}
    result["mean_grad"] = mean_grad_check(model, batch)
    result["dual"] = dual_check(model, batch)
    del model
    result["float64"] = float64_reference(args.layers, batch, result["dual"])
    write(result)
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=1))


if __name__ == "__main__":
    main()
