"""Autograd wiring shared by the backends' custom-op pairs (forward -> (out, lse), backward -> grads).

``wire(fwd, bwd)`` registers, for ops with the schemas
``fwd(q, k, v, extent, causal, scale, window=None, bias=None) -> (out, lse)`` and
``bwd(dout, dlse, q, k, v, out, lse, extent, causal, scale, window=None, bias=None)
-> (dq, dk, dv, dbias)``:
bwd's fake implementation, fwd's backward and a clear error when the backward
itself is differentiated. ``window`` is the encoded v2 window options
(``windows.Options.encode``), ``bias`` the relative position bias (Hq, 2Rt+1,
2Rh+1, 2Rw+1) or None; k and v may have fewer heads than q (grouped queries).

Gradients are not materialised: ``dlse`` reaches ``bwd`` as None unless the
caller used the log-sum-exp (``return_lse``), so the plain backward pays nothing
for it; a used lse enters as ``delta - dlse`` (d lse_i / d s_ij = p_ij).
``dbias`` is an empty tensor when ``bias`` is None (a custom op returns tensors).
"""
from __future__ import annotations

import torch
from torch import Tensor


def contiguous_like(x: Tensor) -> Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def no_bias_grad(q: Tensor) -> Tensor:
    """The ``dbias`` a backward returns when there is no bias."""
    return q.new_empty((0,), dtype=torch.float32)


def _no_double_backward(ctx, *grads):
    raise NotImplementedError(
        "nearby_attention: the gradient of the 3DNA backward (double backward) is not implemented "
        "for backend='torch' or 'triton'; use backend='dense' for higher-order gradients")


def wire(fwd, bwd) -> None:
    """Register ``bwd``'s fake and the autograd formulas of both ops (schemas above)."""
    @bwd.register_fake
    def _(dout, dlse, q, k, v, out, lse, extent, causal, scale, window=None, bias=None):
        dbias = no_bias_grad(q) if bias is None else contiguous_like(bias)
        return contiguous_like(q), contiguous_like(k), contiguous_like(v), dbias

    def setup_context(ctx, inputs, output):
        q, k, v, extent, causal, scale, *rest = inputs
        window, bias = (rest + [None, None])[:2]
        out, lse = output
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(q, k, v, out, lse, bias)
        ctx.args = (extent, causal, scale, window)

    def backward(ctx, dout, dlse):
        q, k, v, out, lse, bias = ctx.saved_tensors
        if dout is None:            # only the lse was used
            dout = torch.zeros_like(out)
        dq, dk, dv, dbias = bwd(dout, dlse, q, k, v, out, lse, *ctx.args, bias)
        return dq, dk, dv, None, None, None, None, (dbias if bias is not None else None)

    fwd.register_autograd(backward, setup_context=setup_context)
    bwd.register_autograd(_no_double_backward, setup_context=lambda ctx, inputs, output: None)
