"""Where does the first-order picture hold? Evaluate the model at θ + η·μY and compare.

For each η the LoRA dict θ + η·μY is passed through `functional_call` (nothing is updated in
place), the mean X surrogate is re-evaluated with its coefficients c frozen at θ, and the
actual change is set against the linear prediction η·<μX, μY> (both in nats per token: the
surrogate's gradient is that of the per-token entropy rate).

Two things bound where the comparison means anything. Large steps leave the linear range
(actual/predicted drifts from 1). Tiny steps hit the fp32 noise floor: S is computed in the
model's fp32, so a change smaller than about 2⁻²³·sqrt(Σ(c·S)²)/(N·G) (independent roundings of
the surrogate's N·G terms, averaged) is rounding, not the model; `FirstOrderCheck.noise_floor`
holds that estimate.
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
from .validation import check_step_size


@dataclass(frozen=True)
class FirstOrderPoint:
    eta: float
    relative_step: float  # ‖η·μY‖ / ‖θ‖
    predicted: float  # η·<μX, μY>
    actual: float  # mean_n Lx_c(θ + η·μY) − mean_n Lx_c(θ), c frozen at θ
    ratio: float  # actual / predicted


TOLERANCE = 0.1  # the first-order picture holds where |actual/predicted − 1| ≤ this
FLOOR_MARGIN = 10.0  # a point counts only when |predicted| ≥ this × the noise floor


@dataclass(frozen=True)
class FirstOrderCheck:
    """Points along θ + η·μY; `probed` is the point at the η the probe reports (if given).

    `noise_floor` (nats per token): changes below it are fp32 rounding of S.
    """

    bars_dot: float
    points: list[FirstOrderPoint]
    noise_floor: float = 0.0
    probed: FirstOrderPoint | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def usable(self, p: FirstOrderPoint) -> bool:
        """The prediction is far enough above the fp32 floor for the ratio to mean something."""
        return abs(p.predicted) >= FLOOR_MARGIN * self.noise_floor

    def holds(self, p: FirstOrderPoint) -> bool:
        return self.usable(p) and abs(p.ratio - 1.0) <= TOLERANCE

    def linear_range(self) -> tuple[float, float] | None:
        """(smallest, largest) η of the usable points where the first-order picture holds."""
        good = [p.eta for p in self.points if self.holds(p)]
        return (min(good), max(good)) if good else None


def frozen_surrogate(model: FunctionalModel, batch: Batch, lora: Mapping[str, Tensor], weighting: str):
    """θ' ↦ mean_n Lx[n](θ') with the leave-one-out coefficients fixed at `lora` (float64)."""
    with torch.no_grad():
        S0 = sequence_logprobs(model, lora, batch, derivatives=False).double()
        c = torch.func.grad(lambda S: x_losses(S, batch, weighting=weighting).sum())(S0) * -S0.shape[1]

    def value(theta: Mapping[str, Tensor]) -> float:
        with torch.no_grad():
            S = sequence_logprobs(model, theta, batch, derivatives=False).double()
        return float(-(c * S).mean(1).mean())

    # independent fp32 roundings of the N·G terms c·S, averaged: eps·sqrt(Σ(c·S)²)/(N·G)
    floor = torch.finfo(torch.float32).eps * float((c * S0).norm()) / S0.numel()
    return value, floor


def first_order_check(
    model: FunctionalModel,
    lora: Mapping[str, Tensor],
    E: Batch,
    U: Batch,
    preconditioner: Preconditioner,
    etas: Sequence[float],
    *,
    weighting: str = "dr_grpo",
    probed_eta: float | None = None,
) -> FirstOrderCheck:
    """Actual against predicted change of the mean X surrogate along the step η·μY, for each η
    of `etas` and at `probed_eta` (the probe's η; `FirstOrderCheck.probed`)."""
    etas = [check_step_size(eta, f"first_order_check: eta {eta!r}") for eta in etas]
    if probed_eta is not None:
        probed_eta = check_step_size(probed_eta, "first_order_check: probed_eta")
    mu_x = mean_grad(model, lora, E, loss="x", weighting=weighting, distributed=False)  # E whole, here
    mu_y = mean_grad(model, lora, U, loss="y", preconditioner=preconditioner, distributed=False)
    bars_dot = dot64(mu_x, mu_y)
    theta_norm = math.sqrt(float(dot(lora, lora)))
    step_norm = math.sqrt(float(dot(mu_y, mu_y)))
    surrogate, floor = frozen_surrogate(model, E, lora, weighting)
    base = surrogate(lora)

    def point(eta: float) -> FirstOrderPoint:
        actual = surrogate({k: lora[k] + eta * mu_y[k].to(lora[k].dtype) for k in lora}) - base
        predicted = eta * bars_dot
        return FirstOrderPoint(
            eta=eta, relative_step=eta * step_norm / theta_norm, predicted=predicted,
            actual=actual, ratio=actual / predicted if predicted else math.nan,
        )  # fmt: skip

    probed = None if probed_eta is None else point(probed_eta)
    return FirstOrderCheck(bars_dot=bars_dot, points=[point(e) for e in etas], noise_floor=floor, probed=probed)


def etas_for_relative_steps(
    model: FunctionalModel, lora: Mapping[str, Tensor], U: Batch, preconditioner: Preconditioner,
    relative_steps: Sequence[float],
) -> list[float]:  # fmt: skip
    """η such that ‖η·μY‖ / ‖θ‖ takes each of `relative_steps`."""
    mu_y = mean_grad(model, lora, U, loss="y", preconditioner=preconditioner, distributed=False)
    scale = math.sqrt(float(dot(lora, lora))) / math.sqrt(float(dot(mu_y, mu_y)))
    return [r * scale for r in relative_steps]
