"""Transform-safe frozen 4-bit NF4 linear layer (QLoRA base weights).

The weight is stored exactly as bitsandbytes stores it (``quantize_4bit`` with
``blocksize=64``, ``quant_type="nf4"``, ``compress_statistics=True``): packed
uint8 bytes, two 4-bit codes per byte, plus a double-quantized per-block absmax.
All of it lives in buffers; nothing is an ``nn.Parameter``.

``y = x Wᵀ (+ b)`` runs through :func:`nf4_matmul.nf4_linear`, whose autograd Functions
dequantize this one layer inside their forward, save only the packed bytes for backward and
work under ``grad``, ``vjp``, ``jvp``, ``vmap(grad)`` and vjp-of-vjp (see nf4_matmul.py).
"""

from __future__ import annotations

import copy
import warnings
from typing import TYPE_CHECKING

import torch
from bitsandbytes import functional as bnbF
from torch import Tensor

from .nf4_matmul import BLOCKSIZE, NESTED_BLOCKSIZE, dequantize_nf4, nf4_linear

if TYPE_CHECKING:  # pragma: no cover
    import bitsandbytes

__all__ = ["NF4Linear", "nf4_linear"]

_QUANT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class NF4Linear(torch.nn.Module):
    """Frozen y = x Wᵀ + b with W stored as NF4 (packed uint8 bytes + double-quantized absmax).

    Buffers (no parameters), for W [out, in] with n = out·in:
      ``weight_packed`` [ceil(n/2), 1] uint8 (two NF4 codes per byte, bnb's layout),
      ``absmax`` [ceil(n/64)] uint8 (per-64-block scale, 8-bit quantized),
      ``nested_absmax`` [ceil(n/64/256)] float32, ``nested_code`` [256] float32,
      ``offset`` [] float32 (mean absmax), ``code`` [16] float32 (the NF4 values),
      ``bias`` [out] in the compute dtype, or None.
    forward: x [..., in] -> [..., out] in x's dtype, computed in ``compute_dtype``.
    W is dequantized in ``quant_dtype``, the dtype the weight was quantized in (what
    bitsandbytes' quant state records), then cast to the compute dtype.
    """

    in_features: int
    out_features: int

    def __init__(
        self,
        packed: Tensor,
        absmax: Tensor,
        nested_absmax: Tensor,
        nested_code: Tensor,
        offset: Tensor,
        code: Tensor,
        *,
        shape: tuple[int, int],
        quant_dtype: torch.dtype = torch.float32,
        bias: Tensor | None = None,
        compute_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = (int(s) for s in shape)
        self.quant_dtype = quant_dtype
        self.compute_dtype = compute_dtype
        self.register_buffer("weight_packed", packed.detach().reshape(-1, 1))
        self.register_buffer("absmax", absmax.detach())
        self.register_buffer("nested_absmax", nested_absmax.detach())
        self.register_buffer("nested_code", nested_code.detach())
        self.register_buffer("offset", offset.detach().reshape(()))
        self.register_buffer("code", code.detach())
        b = None if bias is None else bias.detach().to(compute_dtype)
        self.register_buffer("bias", b)

    @classmethod
    def from_weight(
        cls, weight: Tensor, bias: Tensor | None = None, *, compute_dtype=torch.float32
    ) -> NF4Linear:
        """Quantize W [out, in] as bnb's ``quantize_4bit(W, 64, nf4, compress_statistics=True)``.

        W in float32/bfloat16/float16 is quantized as is, so the quant state's dtype is W's
        (other dtypes via float32): cast W to the requested dtype first, as transformers does.
        """
        w = weight.detach()
        if w.dim() != 2:
            raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(w.shape)}")
        if w.dtype not in _QUANT_DTYPES:
            w = w.float()
        packed, qs = bnbF.quantize_4bit(
            w.contiguous(), blocksize=BLOCKSIZE, quant_type="nf4", compress_statistics=True
        )
        return cls._from_state(packed, qs, bias, compute_dtype, qs.dtype)

    @classmethod
    def _from_state(cls, packed, qs, bias, compute_dtype, quant_dtype) -> NF4Linear:
        return cls(
            packed,
            qs.absmax,
            qs.state2.absmax,
            qs.state2.code,
            qs.offset,
            qs.code,
            shape=tuple(qs.shape),
            quant_dtype=quant_dtype,
            bias=bias,
            compute_dtype=compute_dtype,
        )

    @classmethod
    def from_bnb(
        cls, layer: bitsandbytes.nn.Linear4bit, *, compute_dtype=torch.float32
    ) -> NF4Linear:
        """Take the bytes and quant state of a quantized bnb ``Linear4bit`` (nf4, 64, double quant).

        The training layout (bytes [out·in/2, 1]) is read exactly, sharing storage. A layer
        that bitsandbytes repacked for its CPU kernel (first eval-mode forward on CPU;
        ``quant_state.packing_format_for_cpu``) no longer holds its original absmax (stored
        as bfloat16): its bytes are put back in order and that absmax is double-quantized
        again, with a warning giving the relative error against the repacked weight.
        Other quant types, block sizes, or single quantization raise ``ValueError``.
        """
        w = layer.weight
        qs = getattr(w, "quant_state", None)
        if qs is None or not getattr(w, "bnb_quantized", True):
            raise ValueError(
                "from_bnb: the Linear4bit is not quantized yet (no quant_state); move it to a "
                "device (e.g. layer.to('cpu')) or load it with BitsAndBytesConfig(load_in_4bit)"
            )
        if qs.quant_type != "nf4":
            raise ValueError(f"from_bnb: quant_type {qs.quant_type!r} is not supported, only 'nf4'")
        if qs.blocksize != BLOCKSIZE:
            raise ValueError(f"from_bnb: blocksize {qs.blocksize} is not supported, only 64")
        bias = None if layer.bias is None else layer.bias.detach()
        if getattr(qs, "packing_format_for_cpu", False):
            return cls._from_repacked(w.data, qs, bias, compute_dtype)
        if not qs.nested or qs.state2.blocksize != NESTED_BLOCKSIZE:
            raise ValueError(
                "from_bnb: only double-quantized weights are supported "
                "(compress_statistics=True / bnb_4bit_use_double_quant=True, nested blocksize 256)"
            )
        packed = w.data if w.data.dtype == torch.uint8 else w.data.view(torch.uint8)
        return cls._from_state(packed, qs, bias, compute_dtype, qs.dtype)

    @classmethod
    def _from_repacked(cls, data: Tensor, qs, bias, compute_dtype) -> NF4Linear:
        try:
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse
        except ImportError as e:  # pragma: no cover - depends on the bnb version
            raise ValueError(
                "from_bnb: the layer was repacked by bitsandbytes for its CPU kernel "
                "(an eval-mode forward ran) and this bitsandbytes cannot undo it; convert the "
                "layer before running it in eval mode"
            ) from e
        if not getattr(qs, "original_nested", False):
            raise ValueError(
                "from_bnb: only double-quantized weights are supported "
                "(compress_statistics=True / bnb_4bit_use_double_quant=True)"
            )
        # The inverse mutates the quant state it is given: work on a copy.
        packed, _ = _convert_weight_packed_for_cpu_inverse(data, copy.deepcopy(qs))
        packed = packed if packed.dtype == torch.uint8 else packed.view(torch.uint8)
        # The absmax that is there: bfloat16 [in/64, out] -> float32 in block order.
        absmax = qs.absmax.T.reshape(-1).float()
        offset = absmax.mean()
        qabsmax, state2 = bnbF.quantize_blockwise(absmax - offset, blocksize=NESTED_BLOCKSIZE)
        qd = qs.original_dtype
        new_qs = bnbF.QuantState(
            absmax=qabsmax,
            shape=qs.shape,
            code=qs.code,
            blocksize=BLOCKSIZE,
            quant_type="nf4",
            dtype=qd,
            offset=offset,
            state2=state2,
        )
        out = cls._from_state(packed, new_qs, bias, compute_dtype, qd)
        there = bnbF.QuantState(
            absmax=absmax,
            shape=qs.shape,
            code=qs.code,
            blocksize=BLOCKSIZE,
            quant_type="nf4",
            dtype=qd,
        )
        w_there = bnbF.dequantize_4bit(packed.reshape(-1, 1), there).float()
        err = (out.dequantized_weight().float() - w_there).norm() / w_there.norm()
        warnings.warn(
            f"from_bnb: this Linear4bit {tuple(qs.shape)} was repacked by bitsandbytes for its "
            "CPU kernel (an eval-mode forward ran), which keeps absmax only in bfloat16: the "
            "original quantized weight is gone. Converted what is there (bytes re-ordered, "
            f"absmax double-quantized again); relative error against the repacked weight "
            f"{err.item():.2e}. Convert before any eval-mode forward for an exact copy.",
            UserWarning,
            stacklevel=3,
        )
        return out

    def _quant(self) -> tuple[Tensor, ...]:
        return (
            self.weight_packed,
            self.absmax,
            self.nested_absmax,
            self.nested_code,
            self.offset,
            self.code,
        )

    def dequantized_weight(self) -> Tensor:
        """W [out, in] in the compute dtype (``bitsandbytes.functional.dequantize_4bit``)."""
        shape = (self.out_features, self.in_features)
        return dequantize_nf4(*self._quant(), shape, self.quant_dtype).to(self.compute_dtype)

    def forward(self, x: Tensor) -> Tensor:
        """y = x Wᵀ + b: x [..., in] -> [..., out] in x's dtype, computed in the compute dtype
        (as bitsandbytes' Linear4bit: input cast to compute_dtype, result cast back)."""
        y = nf4_linear(
            x.to(self.compute_dtype),
            *self._quant(),
            shape=(self.out_features, self.in_features),
            quant_dtype=self.quant_dtype,
        )
        return (y if self.bias is None else y + self.bias).to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, compute_dtype={self.compute_dtype}"
        )
