"""optim_match.py: a state's positions named by the names it carries (any order) or by the
adapter's order (counts and shapes checked), through read_optimizer_state; every reading is
held against the live optimizer read by parameter identity (AdamPreconditioner.from_optimizer)."""

from __future__ import annotations

import pytest
import torch
from test_optimizer_state import assert_same_preconditioner, layers_swapped, stepped_adamw

import functional_probe as fp
from functional_probe.optimizer_state import NAMED_FORMAT, read_optimizer_state, save_optimizer_state


def test_layers_swapped_keep_every_shape(tiny_fp32):
    """The premise of the next tests: a permuted order passes any positional shape check."""
    lora = tiny_fp32.lora
    order = layers_swapped(lora)
    assert order != list(lora) and [lora[n].shape for n in order] == [v.shape for v in lora.values()]


def test_state_saved_with_names_in_another_order_is_matched_by_name(tiny_fp32, tmp_path):
    lora = tiny_fp32.lora
    opt, params = stepped_adamw(lora, layers_swapped(lora))
    save_optimizer_state(opt, params, tmp_path / "named.pt")
    assert torch.load(tmp_path / "named.pt", weights_only=True)["format"] == NAMED_FORMAT
    state = read_optimizer_state(tmp_path / "named.pt", lora)
    assert state.names == layers_swapped(lora) and "another order" in state.order
    assert_same_preconditioner(state.preconditioner(), fp.AdamPreconditioner.from_optimizer(opt, params))
    wrong = fp.AdamPreconditioner.from_state_dict(state.state_dict, list(lora))  # by position: wrong
    name = next(n for n in lora if ".layers.0." in n)
    assert not torch.equal(wrong.denom[name], state.preconditioner().denom[name])


def test_torch_param_names_are_used_as_names(tiny_fp32, tmp_path):
    lora = tiny_fp32.lora
    opt, params = stepped_adamw(lora, layers_swapped(lora), named=True)
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    state = read_optimizer_state(tmp_path / "opt.pt", lora)
    assert state.names == layers_swapped(lora) and "param_names" in state.order
    assert_same_preconditioner(state.preconditioner(), fp.AdamPreconditioner.from_optimizer(opt, params))


def test_named_state_for_another_adapter_is_refused(tiny_fp32, tmp_path):
    lora = tiny_fp32.lora
    opt, params = stepped_adamw(lora, list(lora))
    renamed = {k.replace(".default.", ".other."): p for k, p in params.items()}
    save_optimizer_state(opt, renamed, tmp_path / "named.pt")
    with pytest.raises(ValueError, match=r"named.pt: the state has '.*\.other\.weight', which is not a parameter"):
        read_optimizer_state(tmp_path / "named.pt", lora)


def test_bare_state_in_adapter_order_states_the_assumed_order(tiny_fp32, tmp_path):
    lora = tiny_fp32.lora
    opt, params = stepped_adamw(lora, list(lora))
    torch.save(opt.state_dict(), tmp_path / "bare.pt")
    state = read_optimizer_state(tmp_path / "bare.pt", lora)
    assert state.names == list(lora) and state.lr == 1e-3
    assert "no names in the file; assumed" in state.order and "\n" not in state.order
    assert_same_preconditioner(state.preconditioner(), fp.AdamPreconditioner.from_optimizer(opt, params))


def test_bare_state_in_another_order_with_other_shapes_is_refused(tiny_fp32, tmp_path):
    lora = tiny_fp32.lora
    opt, _ = stepped_adamw(lora, sorted(lora))  # string order: down_proj first
    torch.save(opt.state_dict(), tmp_path / "sorted.pt")
    with pytest.raises(ValueError, match="state position 0 has shape .* the same shapes in another order"):
        read_optimizer_state(tmp_path / "sorted.pt", lora)


def test_bare_state_with_another_count_is_refused(tiny_fp32, tmp_path):
    lora = tiny_fp32.lora
    opt, _ = stepped_adamw(lora, list(lora)[:-2])
    torch.save(opt.state_dict(), tmp_path / "short.pt")
    with pytest.raises(ValueError, match=f"holds {len(lora) - 2} parameters, the adapter {len(lora)}"):
        read_optimizer_state(tmp_path / "short.pt", lora)
