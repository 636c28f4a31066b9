"""bitsandbytes Adam-family states (Adam/AdamW, 8-bit, paged) as `ParamState`s for `optim_step`.

bitsandbytes keeps ``state1`` (m) and ``state2`` (v) and an int ``step``. In the 8-bit variants
(tensors of at least ``min_8bit_size`` elements) they are uint8 codes, blockwise quantized in
blocks of 256 with ``qmap1``/``qmap2`` (signed / unsigned dynamic maps) and ``absmax1``/``absmax2``;
smaller tensors keep float32 states. Its step (CPU kernel of 0.50, and the Triton kernel that
mirrors CUDA's) dequantizes m and v, updates them in float32 with this gradient, decays θ by
(1 − lr·λ) (decoupled, for Adam and AdamW alike), adds −lr/(1 − β1^t)·m'/(sqrt(v')/sqrt(1 − β2^t) + ε)
and only then re-quantizes the state. So the step itself has the torch AdamW formula on the
dequantized state: the 8-bit rounding enters the NEXT steps, not this one. Dequantization uses
``bitsandbytes.functional.dequantize_blockwise``. Paged optimizers on CPU fall back to ordinary
buffers (bitsandbytes warns); their state reads the same.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from .optim_read import ParamState, group_fields, step_count

BLOCKSIZE = 256  # bitsandbytes' blockwise 8-bit optimizer block
WRAPPED = "__bnb_optimizer_quant_state__"  # Optimizer8bit.state_dict() nests the quantization tensors here


def bnb_reader(opt: Any, kind: str) -> Callable[..., ParamState] | None:
    """A reader for a live bitsandbytes two-state "adam" optimizer; None for any other class."""
    from bitsandbytes.optim.optimizer import Optimizer2State

    if not isinstance(opt, Optimizer2State) or getattr(opt, "optimizer_name", None) != "adam":
        return None

    def read(name, st, group, gi, pi, shape) -> ParamState:
        config = opt.get_config(gi, pi, group)  # group values with per-module overrides
        for key, default in (("max_unorm", 0.0), ("skip_zeros", False)):
            if config.get(key, default) != default:
                raise ValueError(f"{kind}: parameter {name!r} has {key}={config[key]!r}; only "
                                 f"{key}={default!r} is reproduced")  # fmt: skip
        return read_bnb_entry(name, st, config, gi, pi, shape)

    return read


def is_bnb_entry(st: Mapping[str, Any], group: Mapping[str, Any]) -> bool:
    """A saved per-parameter state (or, if empty, its group) is bitsandbytes' rather than torch's."""
    if st:
        return "state1" in st or WRAPPED in st
    return "amsgrad" not in group and "t_beta3" in group


def read_bnb_entry(name: str, st: Mapping[str, Any], group: Mapping[str, Any], gi: int, pi: int,
                   shape: tuple[int, ...] | None) -> ParamState:  # fmt: skip
    """ParamState from one bitsandbytes parameter state (live or saved) and its group/config."""
    f = group_fields(group, gi, name)
    st = {**st, **st.get(WRAPPED, {})}
    common = dict(group=gi, decoupled=True, amsgrad=False, maximize=False, **f)
    if not st or int(st.get("step", 0)) == 0:
        return ParamState(shape=shape, m=None, v=None, v_max=None, step=0, **common)
    if "unorm_vec" in st:
        raise ValueError(f"parameter {name!r} state has 'unorm_vec' (max_unorm > 0): not reproduced")
    lost = [k for k in ("state1", "state2", "step") if k not in st]
    if lost:
        raise ValueError(f"parameter {name!r} state has no {lost[0]!r} (keys: {sorted(st)}): not a "
                         "bitsandbytes Adam-family state")  # fmt: skip
    m, v = (dequantized(name, st, i) for i in (1, 2))
    shapes = {tuple(m.shape), tuple(v.shape)} | ({shape} if shape is not None else set())
    if len(shapes) != 1:
        raise ValueError(f"parameter {name!r}: state1/state2 have shapes {sorted(shapes)}, expected "
                         "the parameter's shape (a two-moment Adam state)")  # fmt: skip
    return ParamState(shape=shapes.pop(), m=m, v=v, v_max=None, step=step_count(name, st["step"]), **common)


def dequantized(name: str, st: Mapping[str, Any], i: int) -> Tensor:
    """state{i} as float32: as is, or dequantized with qmap{i}/absmax{i} (blocks of 256)."""
    s = st[f"state{i}"].detach()
    if s.dtype == torch.float32:
        return s.clone()  # a snapshot: step() updates it in place
    if s.dtype != torch.uint8:
        raise ValueError(f"parameter {name!r}: state{i} has dtype {s.dtype}; expected float32 or uint8")
    lost = [k for k in (f"qmap{i}", f"absmax{i}") if k not in st]
    if lost:
        raise ValueError(f"parameter {name!r}: 8-bit state{i} without {lost[0]!r} (non-blockwise "
                         "8-bit states are not supported)")  # fmt: skip
    absmax, code = st[f"absmax{i}"], st[f"qmap{i}"]
    blocks = math.ceil(s.numel() / BLOCKSIZE)
    if absmax.numel() != blocks or code.numel() != 256:
        raise ValueError(f"parameter {name!r}: absmax{i} has {absmax.numel()} blocks and qmap{i} "
                         f"{code.numel()} codes; expected {blocks} (blocks of {BLOCKSIZE}) and 256")  # fmt: skip
    from bitsandbytes.functional import dequantize_blockwise

    return dequantize_blockwise(s, absmax=absmax.float(), code=code.float(), blocksize=BLOCKSIZE).float()
