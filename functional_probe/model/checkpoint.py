"""Activation checkpointing of one module call that works under torch.func transforms.

torch.utils.checkpoint cannot be used inside `torch.func.grad`: the reentrant variant is an
autograd.Function without `setup_context` (functorch refuses it) and the non-reentrant one
rests on saved-tensor hooks, which torch.func transforms do not support (torch 2.13). So this
is an autograd.Function of our own: forward runs the module without building a graph and saves
only its inputs; backward recomputes the module through `torch.func.vjp` and pulls the
cotangent back. With `generate_vmap_rule` it also runs under `vmap(grad)`. It is first-order
only (no `jvp`, backward not differentiable again): forward mode and double reverse use the
plain forward.
After each layer's forward and backward the heap's free pages go back to the OS (allocator.py):
with glibc's defaults the freed activations would otherwise stay resident between the layers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp

from .allocator import release_freed_memory


class _Checkpoint(torch.autograd.Function):
    """apply(module, names, layout, x, *tensors): `tensors` = the extra tensor arguments, then
    the parameter values named by `names`; `layout` rebuilds the extra arguments (see `_args`)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(module: nn.Module, names: tuple[str, ...], layout: tuple, x: Tensor, *tensors: Tensor) -> Tensor:
        out = _run(module, names, layout, x, tensors)
        release_freed_memory()  # the layer's activations are garbage now; see allocator.py
        return out

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        module, names, layout, x, *tensors = inputs
        ctx.module, ctx.names, ctx.layout = module, names, layout
        ctx.save_for_backward(x, *tensors)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, *tensors = ctx.saved_tensors
        n_extra = len(tensors) - len(ctx.names)
        extra, values = tuple(tensors[:n_extra]), tuple(tensors[n_extra:])

        def run(x: Tensor, values: tuple[Tensor, ...]) -> Tensor:
            return _run(ctx.module, ctx.names, ctx.layout, x, extra + values)

        # torch.func.grad runs backward with create_graph=True, so without no_grad every layer's
        # recomputed activations would be recorded for a double backward and kept to the end;
        # vjp's own level ignores the outer no_grad and still differentiates `run`.
        with torch.no_grad():
            _, pullback = vjp(run, x, values)
            grad_x, grad_values = pullback(grad_out)
        del pullback  # its recomputed activations, before the heap is trimmed
        release_freed_memory()
        return (None, None, None, grad_x, *([None] * n_extra), *grad_values)


def _run(module: nn.Module, names: tuple[str, ...], layout: tuple, x: Tensor, tensors: Sequence[Tensor]) -> Tensor:
    """module(x, *extra) with the parameters `names` set to the last len(names) of `tensors`."""
    n_extra = len(tensors) - len(names)
    params = dict(zip(names, tensors[n_extra:], strict=True))
    return functional_call(module, params, (x, *_args(layout, tensors[:n_extra])))


def _args(layout: tuple, tensors: Sequence[Tensor]) -> list:
    """The extra arguments: layout[i] is a constant, or the marker `_TENSOR` for the next tensor."""
    it = iter(tensors)
    return [next(it) if item is _TENSOR else item for item in layout]


_TENSOR = object()


def checkpointed(module: nn.Module, x: Tensor, extra: Sequence = ()) -> Tensor:
    """module(x, *extra), keeping only x, the extra tensors and the module's parameters for backward.

    The gradient flows to x and to the module's parameters (as they are at call time, e.g. the
    tensors `functional_call` put in place); extra arguments (tensors or constants such as None
    or a Kernels) must not need a gradient.
    """
    names, values = zip(*module.named_parameters(), strict=True)
    layout = tuple(_TENSOR if isinstance(a, Tensor) else a for a in extra)
    tensors = [a for a in extra if isinstance(a, Tensor)]
    return _Checkpoint.apply(module, tuple(names), layout, x, *tensors, *values)
