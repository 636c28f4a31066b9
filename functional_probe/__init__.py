"""functional_probe: how will one RL step on a LoRA/QLoRA model change its entropy, and how sure is that?

Everything differentiated is a pure function of one dict, the LoRA tensors; frozen weights
(NF4 included) are buffers. See DESIGN.md for the math and README.md for usage.
"""

from .alpha import METHODS, AlphaVariance, alpha_projections, alpha_variance
from .batch import Batch, make_batch
from .curvature import Curvature, curvature
from .distributed import shard_batch, shard_range, shard_rollouts
from .grads import gram, mean_grad, per_sample_grads, prompt_losses
from .logprobs import sequence_logprobs, sequence_logprobs_and_tangent
from .losses import x_losses, y_losses
from .model import FunctionalModel, from_peft, load_model, tiny_model
from .precondition import AdamPreconditioner
from .probe import ProbeResult, probe
from .realized import EntropyEstimateWarning, RealizedEntropyChange, realized_entropy_change
from .rollouts import Rollouts, read_rollouts, write_rollouts
from .sampling import Samples, sample

__all__ = [
    "METHODS",
    "AdamPreconditioner",
    "AlphaVariance",
    "Batch",
    "Curvature",
    "EntropyEstimateWarning",
    "FunctionalModel",
    "ProbeResult",
    "RealizedEntropyChange",
    "Rollouts",
    "Samples",
    "alpha_projections",
    "alpha_variance",
    "curvature",
    "from_peft",
    "gram",
    "load_model",
    "make_batch",
    "mean_grad",
    "per_sample_grads",
    "probe",
    "prompt_losses",
    "read_rollouts",
    "realized_entropy_change",
    "sample",
    "sequence_logprobs",
    "sequence_logprobs_and_tangent",
    "shard_batch",
    "shard_range",
    "shard_rollouts",
    "tiny_model",
    "write_rollouts",
    "x_losses",
    "y_losses",
]
