"""Sampled demo rollouts."""

import torch

from functional_probe.demos.synthetic import sample_rollouts


def test_rollouts_have_the_requested_shape_and_centred_advantages(tiny_nf4):
    r = sample_rollouts(
        tiny_nf4, tiny_nf4.lora, num_prompts=3, group_size=4, prompt_length=5, response_length=6
    )
    assert len(r.prompts) == 3 and all(len(p) == 5 for p in r.prompts)
    assert all(len(group) == 4 and all(3 <= len(x) <= 6 for x in group) for group in r.responses)
    adv = torch.tensor(r.advantages, dtype=torch.float64)
    assert adv.shape == (3, 4)
    assert adv.sum(1).abs().max() < 1e-6
    assert all(0 <= t < tiny_nf4.vocab_size for group in r.responses for x in group for t in x)


def test_same_seed_same_rollouts(tiny_nf4):
    a = sample_rollouts(tiny_nf4, tiny_nf4.lora, num_prompts=2, group_size=2, seed=3)
    b = sample_rollouts(tiny_nf4, tiny_nf4.lora, num_prompts=2, group_size=2, seed=3)
    assert a == b
