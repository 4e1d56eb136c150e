"""Autograd wiring shared by the backends' custom-op pairs (forward -> (out, lse), backward -> grads).

``wire(fwd, bwd)`` registers, for ops with the schemas
``fwd(q, k, v, *args) -> (out, lse)`` and
``bwd(dout, q, k, v, out, lse, *args) -> (dq, dk, dv)`` (args: extent, causal,
scale and any backend-specific options):
bwd's fake implementation, fwd's backward (saves q, k, v, out, lse; lse is not
differentiable) and a clear error when the backward itself is differentiated.
"""
from __future__ import annotations

import torch
from torch import Tensor


def contiguous_like(x: Tensor) -> Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _no_double_backward(ctx, *grads):
    raise NotImplementedError(
        "nearby_attention: the gradient of the 3DNA backward (double backward) is not implemented "
        "for backend='torch' or 'triton'; use backend='dense' for higher-order gradients")


def wire(fwd, bwd) -> None:
    """Register ``bwd``'s fake and the autograd formulas of both ops. Arguments after
    q, k, v (extent, causal, scale and any backend-specific ones, e.g. the CPU op's
    window options) go to ``bwd`` as they were given and get no gradient."""
    @bwd.register_fake
    def _(dout, q, k, v, out, lse, *args):
        return contiguous_like(q), contiguous_like(k), contiguous_like(v)

    def setup_context(ctx, inputs, output):
        q, k, v, *args = inputs
        out, lse = output
        ctx.mark_non_differentiable(lse)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = args

    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = bwd(dout, q, k, v, out, lse, *ctx.args)
        return (dq, dk, dv) + (None,) * len(ctx.args)

    fwd.register_autograd(backward, setup_context=setup_context)
    bwd.register_autograd(_no_double_backward, setup_context=lambda ctx, inputs, output: None)
