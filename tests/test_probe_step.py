"""The step a probe follows: the linearised V_Y of the exact optimizer step against leave-one-prompt-out
jackknife pseudo-values, and the options that belong to one kind of step refused with the other."""

from __future__ import annotations

import numpy as np
import pytest
from test_probe import ETA, MEASURED_GAP, STATES, batches64, loop_jackknife, model64, setting, trained  # noqa: F401 (fixtures, used as arguments)

import functional_probe as fp
from functional_probe.grads import dot64
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


def literal_jackknife_se(model, lora, E, U, direction_of, eta: float) -> float:
    """η·sqrt(J_E + J_U + 2·C_J) by deleting each prompt and recomputing from scratch: μX over E
    without prompt n (the step kept), g_U over U without prompt p and the step retaken from it
    (`direction_of(g_U)` = Δθ/η); C_J from the pseudo-values B·θ̂ − (B−1)·θ̂₋ᵢ when E is U."""
    mu_x, g_u = fp.mean_grad(model, lora, E, loss="x"), fp.mean_grad(model, lora, U, loss="y")
    full = dot64(mu_x, direction_of(g_u))

    def without(b, i):
        return b[[j for j in range(len(b)) if j != i]]

    th_e = np.array([dot64(fp.mean_grad(model, lora, without(E, n), loss="x"), direction_of(g_u)) for n in range(len(E))])
    th_u = np.array([dot64(mu_x, direction_of(fp.mean_grad(model, lora, without(U, p), loss="y"))) for p in range(len(U))])
    var = sum((len(th) - 1) / len(th) * np.sum((th - th.mean()) ** 2) for th in (th_e, th_u))
    if E is U:
        B = len(E)
        pseudo_e, pseudo_u = B * full - (B - 1) * th_e, B * full - (B - 1) * th_u
        var += 2 * np.cov(pseudo_e, pseudo_u, ddof=1)[0, 1] / B
    return eta * float(np.sqrt(var))


@pytest.mark.parametrize("shared", [False, True])
def test_se_jackknife_equals_a_literal_delete_one_loop(model64, batches64, shared):  # noqa: F811 (fixtures imported from test_probe)
    """The optimizer's step (AdamW after 3 steps, clipped): se_jackknife against deleting each prompt
    of E and of U in turn (E and U disjoint, or the same batch: the cross term); U's part is not
    the linearised V_Y, and v_y="jackknife" makes se and se_jackknife one."""
    E, U = batches64
    E = U if shared else E
    opt, params = trained(model64, U, lr=1e-5, steps=3)
    lora = {k: p.detach().clone() for k, p in params.items()}
    kw = dict(optimizer=opt, named_params=params, max_grad_norm=0.05)
    r = probe(model64, lora, E, U, **kw)
    state = fp.AdamState.from_optimizer(opt, params)

    def direction_of(g):
        return {k: v / r.eta for k, v in state.step({k: -v for k, v in g.items()}, lora, max_grad_norm=0.05).delta.items()}

    ref = literal_jackknife_se(model64, lora, E, U, direction_of, r.eta)
    print(f"shared {shared}: se {r.se:.6e}, se_jackknife {r.se_jackknife:.6e}, literal {ref:.6e}")
    assert r.se_jackknife == pytest.approx(ref, rel=1e-8)
    assert "jackknife" in r.timings
    jack = probe(model64, lora, E, U, v_y="jackknife", **kw)
    assert jack.se == jack.se_jackknife == pytest.approx(ref, rel=1e-8)
    assert abs(jack.V_Y - r.V_Y) > 0.05 * r.V_Y  # U's side is not the linearised one (MEASURED_GAP)


def test_se_jackknife_of_the_preconditioned_step_is_se(setting):  # noqa: F811 (fixture imported from test_probe)
    """The preconditioned step is linear in g_U: the literal delete-one loop gives the delta-method se."""
    model, lora, E, U, pre = setting
    r = probe(model, lora, E, U, preconditioner=pre, eta=ETA)
    assert r.se_jackknife == pytest.approx(r.se, rel=1e-10) and "jackknife" not in r.timings
    assert r.se_jackknife == pytest.approx(literal_jackknife_se(model, lora, E, U, pre, ETA), rel=1e-4)
