"""functional_probe: how will one RL step on a LoRA/QLoRA model change its entropy, and how sure is that?

Everything differentiated is a pure function of one dict, the LoRA tensors; frozen weights
(NF4 included) are buffers. docs/design.md has the math, README.md the usage.

Names are imported on first use (PEP 562), so `import functional_probe` and the command
line's `--help` do not pay for torch. A new public name is one line in `_EXPORTS`.
"""

import importlib
import logging
import sys
import types


class _KernelsNotice(logging.Filter):
    """Drops bitsandbytes' CPU notice that the optional `kernels` package is missing: the NF4
    path here dequantizes with bitsandbytes.functional and never calls that kernel."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward from kernels-community")


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_KernelsNotice())

_EXPORTS = {
    "METHODS": "alpha",
    "AlphaVariance": "alpha",
    "alpha_projections": "alpha",
    "alpha_variance": "alpha",
    "Batch": "batch",
    "Calibration": "calibration",
    "calibrate": "calibration",
    "t_multiplier": "calibration",
    "welch_dof": "calibration",
    "make_batch": "batch",
    "shard_batch": "distributed",
    "shard_range": "distributed",
    "shard_rollouts": "distributed",
    "gram": "grads",
    "mean_grad": "grads",
    "per_sample_grads": "grads",
    "prompt_losses": "grads",
    "sequence_logprobs": "logprobs",
    "sequence_logprobs_and_tangent": "logprobs",
    "x_losses": "losses",
    "y_losses": "losses",
    "FunctionalModel": "model",
    "from_peft": "model",
    "load_model": "model",
    "tiny_model": "model",
    "OptimizerState": "optim_match",
    "read_optimizer_state": "optimizer_state",
    "save_optimizer_state": "optimizer_state",
    "AdamState": "optim_step",
    "NextStep": "optim_update",
    "next_step": "optim_step",
    "TrainerLoss": "trl_config",
    "EntropyCheck": "entropy_check",
    "entropy_check": "entropy_check",
    "loglog_fit": "entropy_check",
    "first_order_check": "first_order",
    "TrainerProbe": "trl_probe",
    "trainer_probe": "trl_probe",
    "trainer_grad": "trl_loss",
    "trainer_group_grads": "trl_loss",
    "trainer_loss": "trl_loss",
    "trainer_prompt_losses": "trl_loss",
    "TrainerRows": "trl_rows",
    "micro_batches_from_inputs": "trl_rows",
    "trl_advantages": "trl_rows",
    "AdamPreconditioner": "precondition",
    "ProbeResult": "probe",
    "probe": "probe",
    "Curvature": "curvature",
    "curvature": "curvature",
    "EntropyEstimateWarning": "realized",
    "RealizedEntropyChange": "realized",
    "realized_entropy_change": "realized",
    "Samples": "sampling",
    "sample": "sampling",
    "Rollouts": "rollouts",
    "read_rollouts": "rollouts",
    "read_trainer_checkpoint": "trainer_checkpoint",
    "TrainerCheckpoint": "trainer_checkpoint",
    "write_rollouts": "rollouts",
}

__all__ = sorted(_EXPORTS)


class _Package(types.ModuleType):
    """Importing the submodule `probe` binds the package's `probe` to the function of that
    name, not to the submodule (what an eager `from .probe import probe` used to leave)."""

    def __setattr__(self, name: str, value) -> None:
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == name:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str):
    if name not in _EXPORTS:  # a submodule (fp.grads, fp.report, ...), as eager imports used to leave
        try:
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module 'functional_probe' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
