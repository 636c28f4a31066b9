"""The demo's rollouts: fp.sample's draws rewarded by their own confidence."""

import torch

import functional_probe as fp
from functional_probe.demos.synthetic import confident_rollouts


def test_confident_rollouts_are_the_samplers_draws_rewarded_by_their_own_mean_logprob(tiny_nf4):
    """Responses = fp.sample's with the same seed (full length, no EOS); advantages = S/L centred
    per prompt, S recomputed independently by teacher forcing (sequence_logprobs)."""
    r = confident_rollouts(tiny_nf4, tiny_nf4.lora, num_prompts=3, group_size=4, prompt_length=5, response_length=6,
                           seed=2)  # fmt: skip
    drawn = fp.sample(tiny_nf4, tiny_nf4.lora, r.prompts, samples_per_prompt=4, max_new_tokens=6, seed=2)
    assert r.responses == drawn.responses() and all(len(x) == 6 for group in r.responses for x in group)
    batch = r.to_batch()
    S = fp.sequence_logprobs(tiny_nf4, tiny_nf4.lora, batch).double()
    want = S / 6 - (S / 6).mean(1, keepdim=True)
    assert torch.allclose(torch.tensor(r.advantages, dtype=torch.float64), want, atol=1e-5)
    assert float(want.abs().max()) > 1e-2
