"""Where does the first-order picture hold? Evaluate the model at θ + η·μY and compare.

For each η the LoRA dict θ + η·μY is passed through `functional_call` (nothing is updated in
place), the mean X surrogate is re-evaluated with its coefficients c frozen at θ, and the
actual change is set against the linear prediction η·<μX, μY>.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from .batch import Batch
from .grads import dot, dot64, mean_grad
from .logprobs import sequence_logprobs
from .losses import x_losses
from .model import FunctionalModel
from .probe import Preconditioner


@dataclass(frozen=True)
class FirstOrderPoint:
    eta: float
    relative_step: float  # ‖η·μY‖ / ‖θ‖
    predicted: float  # η·<μX, μY>
    actual: float  # mean_n Lx_c(θ + η·μY) − mean_n Lx_c(θ), c frozen at θ
    ratio: float  # actual / predicted


@dataclass(frozen=True)
class FirstOrderCheck:
    bars_dot: float
    points: list[FirstOrderPoint]

    def to_dict(self) -> dict:
        return asdict(self)


def frozen_surrogate(model: FunctionalModel, batch: Batch, lora: Mapping[str, Tensor], weighting: str):
    """θ' ↦ mean_n Lx[n](θ') with the leave-one-out coefficients fixed at `lora` (float64)."""
    with torch.no_grad():
        S0 = sequence_logprobs(model, lora, batch).double()
        c = torch.func.grad(lambda S: x_losses(S, batch, weighting=weighting).sum())(S0) * -S0.shape[1]

    def value(theta: Mapping[str, Tensor]) -> float:
        with torch.no_grad():
            S = sequence_logprobs(model, theta, batch).double()
        return float(-(c * S).mean(1).mean())

    return value


def first_order_check(
    model: FunctionalModel,
    lora: Mapping[str, Tensor],
    E: Batch,
    U: Batch,
    preconditioner: Preconditioner,
    etas: Sequence[float],
    *,
    weighting: str = "dr_grpo",
) -> FirstOrderCheck:
    """Actual against predicted change of the mean X surrogate along the step η·μY, for each η."""
    mu_x = mean_grad(model, lora, E, loss="x", weighting=weighting)
    mu_y = mean_grad(model, lora, U, loss="y", preconditioner=preconditioner)
    bars_dot = dot64(mu_x, mu_y)
    theta_norm = math.sqrt(float(dot(lora, lora)))
    step_norm = math.sqrt(float(dot(mu_y, mu_y)))
    surrogate = frozen_surrogate(model, E, lora, weighting)
    base = surrogate(lora)
    points = []
    for eta in etas:
        actual = surrogate({k: lora[k] + eta * mu_y[k].to(lora[k].dtype) for k in lora}) - base
        predicted = eta * bars_dot
        points.append(FirstOrderPoint(
            eta=float(eta), relative_step=abs(eta) * step_norm / theta_norm, predicted=predicted,
            actual=actual, ratio=actual / predicted if predicted else math.nan,
        ))  # fmt: skip
    return FirstOrderCheck(bars_dot=bars_dot, points=points)


def etas_for_relative_steps(
    model: FunctionalModel, lora: Mapping[str, Tensor], U: Batch, preconditioner: Preconditioner,
    relative_steps: Sequence[float],
) -> list[float]:  # fmt: skip
    """η such that ‖η·μY‖ / ‖θ‖ takes each of `relative_steps`."""
    mu_y = mean_grad(model, lora, U, loss="y", preconditioner=preconditioner)
    scale = math.sqrt(float(dot(lora, lora))) / math.sqrt(float(dot(mu_y, mu_y)))
    return [r * scale for r in relative_steps]
