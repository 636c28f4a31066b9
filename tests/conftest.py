import pytest
import torch
from helpers import sample_rollouts

import functional_probe as fp
from functional_probe.model import tiny_model
from functional_probe.rollouts import Rollouts, write_rollouts
from functional_probe.testing import hf_twin, peft_twin

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_fp32():
    return tiny_model(seed=0, quantize=None)


@pytest.fixture(scope="session")
def tiny_nf4():
    return tiny_model(seed=0, quantize="nf4")


@pytest.fixture(scope="session")
def saved_tiny(tmp_path_factory, tiny_fp32):
    """The tiny fp32 model saved as a transformers checkpoint + a PEFT adapter directory."""
    root = tmp_path_factory.mktemp("tiny")
    hf_twin(tiny_fp32).save_pretrained(root / "base")
    peft_twin(tiny_fp32).save_pretrained(root / "adapter")
    return root / "base", root / "adapter"


@pytest.fixture(scope="session")
def saved_run(saved_tiny, tmp_path_factory):
    """What `functional-probe run` reads: the saved tiny model + adapter, a real AdamW state over
    the adapter's parameters (optimizer.pt), and rollout files E.jsonl and U.jsonl (3 prompts each)."""
    base_dir, adapter_dir = saved_tiny
    root = tmp_path_factory.mktemp("run")
    model = fp.load_model(base_dir, adapter_dir)
    rollouts = sample_rollouts(model, model.lora, num_prompts=6, group_size=3, seed=4)
    for name, part in (("E", slice(0, 3)), ("U", slice(3, 6))):
        write_rollouts(
            root / f"{name}.jsonl",
            Rollouts(rollouts.prompts[part], rollouts.responses[part], rollouts.advantages[part]),
        )
    params = [torch.nn.Parameter(v.clone()) for v in model.lora.values()]
    opt = torch.optim.AdamW(params, lr=1e-3)
    for p in params:
        p.grad = torch.randn_like(p) * 0.01
    opt.step()
    torch.save(opt.state_dict(), root / "optimizer.pt")
    return base_dir, adapter_dir, root, model


@pytest.fixture(scope="session")
def enumerable_setup():
    """(model, lora, step): the float64 model small enough to enumerate every response
    (tests/enumerable.py) and a random step, shared by the realized-ΔH and curvature tests."""
    from enumerable import enumerable_model, random_step

    model = enumerable_model()
    return model, model.lora, random_step(model.lora)


@pytest.fixture
def no_model_load(monkeypatch):
    """Errors must come before the model loads: loading raises here (returns the refusing stand-in)."""

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the input was validated")

    monkeypatch.setattr("functional_probe.model.load_model", refuse)
    return refuse
