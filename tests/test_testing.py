"""The PEFT twin mirrors the functional model: same names, same weights, same outputs."""

import torch
from helpers import rel_err

import functional_probe.testing
from functional_probe.testing import peft_twin


def test_twin_parameters_are_the_lora_dict(tiny_nf4):
    twin = peft_twin(tiny_nf4)
    params = {n: p for n, p in twin.named_parameters() if p.requires_grad}
    assert list(params) == list(tiny_nf4.lora)
    assert all(torch.equal(params[k], v) for k, v in tiny_nf4.lora.items())


def test_twin_logits_equal_the_functional_model(tiny_nf4):
    ids = torch.randint(0, tiny_nf4.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = peft_twin(tiny_nf4)(input_ids=ids).logits
    assert rel_err(tiny_nf4(tiny_nf4.lora, ids), ref) <= 1e-5


def test_module_docstring_example_runs_and_agrees():
    """The setup check users copy from the module docstring runs as written and reports agreement."""
    doc = functional_probe.testing.__doc__
    block = [line[4:] for line in doc.splitlines() if line.startswith("    ")]
    scope = {}
    exec("\n".join(block), scope)
    assert scope["rel"] <= 1e-5
