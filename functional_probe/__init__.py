"""functional_probe: how will one RL step on a LoRA/QLoRA model change its entropy, and how sure is that?

Everything differentiated is a pure function of one dict, the LoRA tensors; frozen weights
(NF4 included) are buffers. See DESIGN.md for the math and README.md for usage.
"""

from .model import FunctionalModel, from_peft, load_model, tiny_model

__all__ = [
    "FunctionalModel",
    "from_peft",
    "load_model",
    "tiny_model",
]
