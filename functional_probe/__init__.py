"""functional_probe: how will one RL step on a LoRA/QLoRA model change its entropy, and how sure is that?

Everything differentiated is a pure function of one dict, the LoRA tensors; frozen weights
(NF4 included) are buffers. See DESIGN.md for the math and README.md for usage.
"""

from .alpha import METHODS, AlphaVariance, alpha_projections, alpha_variance
from .batch import Batch, make_batch
from .distributed import shard_batch, shard_range, shard_rollouts
from .grads import gram, mean_grad, per_sample_grads, prompt_losses
from .logprobs import sequence_logprobs, sequence_logprobs_and_tangent
from .losses import x_losses, y_losses
from .model import FunctionalModel, from_peft, load_model, tiny_model
from .optim_step import AdamState, NextStep, next_step
from .precondition import AdamPreconditioner
from .probe import ProbeResult, probe
from .rollouts import Rollouts, read_rollouts, write_rollouts
from .trl_loss import TrainerLoss, trainer_grad, trainer_group_grads, trainer_loss, trainer_prompt_losses
from .trl_rows import TrainerRows, micro_batches_from_inputs, trl_advantages

__all__ = [
    "METHODS",
    "AdamPreconditioner",
    "AdamState",
    "AlphaVariance",
    "Batch",
    "FunctionalModel",
    "NextStep",
    "ProbeResult",
    "Rollouts",
    "TrainerLoss",
    "TrainerRows",
    "alpha_projections",
    "alpha_variance",
    "from_peft",
    "gram",
    "load_model",
    "make_batch",
    "mean_grad",
    "micro_batches_from_inputs",
    "next_step",
    "per_sample_grads",
    "probe",
    "prompt_losses",
    "read_rollouts",
    "sequence_logprobs",
    "sequence_logprobs_and_tangent",
    "shard_batch",
    "shard_range",
    "shard_rollouts",
    "tiny_model",
    "trainer_grad",
    "trainer_group_grads",
    "trainer_loss",
    "trainer_prompt_losses",
    "trl_advantages",
    "write_rollouts",
    "x_losses",
    "y_losses",
]
