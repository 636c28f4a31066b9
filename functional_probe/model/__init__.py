"""The functional decoder: LoRA dict in, logits or hidden states out."""

from .decoder import PROJECTIONS, SUPPORTED_ARCHITECTURES, DecoderConfig
from .from_peft import from_peft
from .functional import FunctionalModel
from .loading import load_model
from .tiny import tiny_config, tiny_model

__all__ = [
    "PROJECTIONS",
    "SUPPORTED_ARCHITECTURES",
    "DecoderConfig",
    "FunctionalModel",
    "from_peft",
    "load_model",
    "tiny_config",
    "tiny_model",
]
