import pytest
import torch

from functional_probe.model import tiny_model
from functional_probe.reference import hf_twin, peft_twin

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
