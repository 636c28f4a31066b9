"""Peak memory of `sequence_logprobs` (chunked head) against full logits + log_softmax, vocab 32k.

Each measurement runs in a fresh subprocess: the RSS high-water mark is reset just before the
measured call and read after it (VmHWM), minus the RSS before it, so the model and batch are
not counted. Run: `python bench/logprobs_memory.py`.
Writes bench/results/logprobs_memory.json.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

VOCAB, HIDDEN, PROMPTS, GROUP, PROMPT_LEN, RESPONSE_LEN = 32768, 64, 8, 2, 32, 480
MODES = ("chunked_nograd", "full_nograd", "chunked_jvp", "full_jvp", "chunked_grad", "full_grad")


def full_logprobs(model, lora, batch):
    """The naive way: all logits, a full log_softmax, then gather."""
    from einops import rearrange

    flat = lambda t: rearrange(t, "n g t -> (n g) t")  # noqa: E731
    logits = model(lora, flat(batch.input_ids), flat(batch.attention_mask), flat(batch.position_ids))
    logp = logits[:, :-1].log_softmax(-1).gather(-1, flat(batch.input_ids)[:, 1:, None])[..., 0]
    return (logp * flat(batch.response_mask)[:, 1:]).sum(-1)


def measure(mode: str) -> float:
    """Peak extra MiB of one call in this process."""
    import torch
    from harness import current_rss, peak_rss, reset_peak_rss

    import functional_probe as fp
    from functional_probe.model.base_weights import dense_or_nf4
    from functional_probe.model.loading import build_model
    from functional_probe.model.tiny import tiny_config, tiny_lora, tiny_state_dict

    torch.set_num_threads(2)
    cfg = tiny_config(vocab_size=VOCAB, hidden_size=HIDDEN)
    state = tiny_state_dict(cfg)
    model = build_model(cfg, state.get, dense_or_nf4(state.get, None, torch.float32, "cpu"), tiny_lora(cfg))
    del state
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, VOCAB, (PROMPTS, PROMPT_LEN), generator=gen).tolist()
    responses = torch.randint(0, VOCAB, (PROMPTS, GROUP, RESPONSE_LEN), generator=gen).tolist()
    batch = fp.make_batch(prompts, responses)
    lora = model.lora
    tangent = {k: torch.randn_like(v) for k, v in lora.items()}
    kind, how = mode.split("_")
    f = (lambda p: fp.sequence_logprobs(model, p, batch).sum()) if kind == "chunked" else (
        lambda p: full_logprobs(model, p, batch).sum()
    )
    reset_peak_rss()
    before = current_rss()
    if how == "nograd":
        with torch.no_grad():
            f(lora)
    elif how == "jvp":
        torch.func.jvp(f, (lora,), (tangent,))
    else:
        torch.func.grad(f)(lora)
    return (peak_rss() - before) / 2**20


def main() -> None:
    results = {}
    for mode in MODES:
        out = subprocess.run([sys.executable, __file__, mode], capture_output=True, text=True, check=True)
        results[mode] = float(out.stdout.strip().splitlines()[-1])
    rows, T = PROMPTS * GROUP, PROMPT_LEN + RESPONSE_LEN
    print(f"vocab {VOCAB}, {rows} rows x T={T}; one fp32 [rows x T x V] tensor = {rows * T * VOCAB * 4 / 2**20:.0f} MiB")
    print(f"{'path':<10} {'chunked MiB':>12} {'full MiB':>10} {'full/chunked':>13}")
    for how in ("nograd", "jvp", "grad"):
        c, f = results[f"chunked_{how}"], results[f"full_{how}"]
        print(f"{how:<10} {c:>12.0f} {f:>10.0f} {f / c:>13.1f}")
    path = Path(__file__).parent / "results" / "logprobs_memory.json"
    path.write_text(json.dumps({"config": {"vocab": VOCAB, "rows": rows, "T": T}, "peak_extra_mib": results}, indent=2))


if __name__ == "__main__":
    if len(sys.argv) > 1:
        print(measure(sys.argv[1]))
    else:
        main()
