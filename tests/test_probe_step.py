"""The step a probe follows: the linearised V_Y of the exact optimizer step against leave-one-prompt-out
jackknife pseudo-values, and the options that belong to one kind of step refused with the other."""

from __future__ import annotations

import pytest
from test_probe import ETA, MEASURED_GAP, STATES, batches64, loop_jackknife, model64, setting, trained  # noqa: F401 (fixtures, used as arguments)

from functional_probe.probe import probe


@pytest.mark.parametrize("state", sorted(STATES))
@pytest.mark.parametrize("max_grad_norm", [None, 0.05])
def test_linearised_V_Y_against_the_jackknife(model64, batches64, state, max_grad_norm):  # noqa: F811 (fixtures imported from test_probe)
    """The linearised V_Y (t_p = <∇Ly[p], −JᵀμX>/η) is the h → 0 limit of the jackknife over U's
    prompts (checked at h = 1e-4 to 1e-3, the O(h) error); v_y="jackknife" equals the jackknife
    computed by a per-prompt loop. The gap between the two is the linearisation's error: after 3
    steps 12% (24% clipped); at the first step, where Adam's step is ≈ −lr·sign(g) and
    linear only for |g| ≲ ε (D = lr·ε/(|g| + ε)²), leaving a prompt out moves such coordinates
    far beyond ε: unclipped the two agree to 6% by luck, clipped (c·g smaller, more coordinates
    near ε) the linearisation overstates V_Y 46-fold. Use v_y="jackknife" there."""
    E, U = batches64
    opt, params = trained(model64, U, lr=1e-5, **STATES[state])
    lora = {k: p.detach().clone() for k, p in params.items()}
    kw = dict(optimizer=opt, named_params=params, max_grad_norm=max_grad_norm)
    linear, jack = probe(model64, lora, E, U, **kw), probe(model64, lora, E, U, v_y="jackknife", **kw)
    ref = loop_jackknife(model64, lora, E, U, opt, params, max_grad_norm)
    assert jack.v_y == "jackknife" and linear.v_y == "linear"
    assert jack.V_Y == pytest.approx(ref, rel=1e-8)
    assert jack.V_X == linear.V_X and jack.delta_h1 == linear.delta_h1
    gap = jack.V_Y / linear.V_Y
    print(f"{state}, clip {max_grad_norm}: V_Y linear {linear.V_Y:.4e}, jackknife {jack.V_Y:.4e}, ratio {gap:.4f}")
    assert gap == pytest.approx(MEASURED_GAP[state, max_grad_norm], rel=0.02)
    if state == "stepped":
        small_h = loop_jackknife(model64, lora, E, U, opt, params, max_grad_norm, h=1e-4)
        assert small_h == pytest.approx(linear.V_Y, rel=1e-3)


def test_optimizer_options_are_refused_with_the_preconditioned_step(setting):  # noqa: F811 (fixture imported from test_probe)
    model, lora, E, U, pre = setting
    for extra in (dict(max_grad_norm=1.0), dict(lr=1e-3)):
        with pytest.raises(ValueError, match="are for step='optimizer'"):
            probe(model, lora, E, U, preconditioner=pre, eta=ETA, **extra)
