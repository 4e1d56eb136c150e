"""The Triton backend as ``torch.library`` custom ops, and ``triton_attention``.

* ``nuwa3dna::triton_fwd(q, k, v, extent, causal, scale) -> (out, lse)``
* ``nuwa3dna::triton_bwd(dout, q, k, v, out, lse, extent, causal, scale) -> (dq, dk, dv)``

Each is opaque to ``torch.compile`` (fullgraph) with a fake implementation for
shape propagation; the backward is registered with ``register_autograd``
(differentiating it again raises a clear error).
Inputs are validated by ``nuwa3dna.checks`` before they get here; ``extent``
is resolved (three ints). Importing this module imports Triton and registers
the ops; ``nuwa3dna.ops`` imports it on the first ``backend="triton"`` call.

Untested here: the ops under torch.compile on a GPU (tests run on CPU, where
the kernels only run under the Triton interpreter, eagerly).
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
from torch import Tensor

from nuwa3dna.kernels.triton.launch import backward, forward, stats_shape


def _contiguous_like(x: Tensor) -> Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("nuwa3dna::triton_fwd", mutates_args=())
def triton_fwd(q: Tensor, k: Tensor, v: Tensor, extent: List[int], causal: bool,
               scale: float) -> Tuple[Tensor, Tensor]:
    return forward(q, k, v, tuple(extent), causal, scale)


@triton_fwd.register_fake
def _(q, k, v, extent, causal, scale):
    return _contiguous_like(q), q.new_empty(stats_shape(q), dtype=torch.float32)


@torch.library.custom_op("nuwa3dna::triton_bwd", mutates_args=())
def triton_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
               extent: List[int], causal: bool, scale: float) -> Tuple[Tensor, Tensor, Tensor]:
    # dout goes in as autograd hands it over: the kernels read it through its
    # strides, so a broadcast (stride-0) gradient from out.sum() is not copied.
    return backward(q, k, v, out, lse, dout, tuple(extent), causal, scale)


@triton_bwd.register_fake
def _(dout, q, k, v, out, lse, extent, causal, scale):
    return _contiguous_like(q), _contiguous_like(k), _contiguous_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, extent, causal, scale = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.args = (list(extent), bool(causal), float(scale))


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = triton_bwd(dout, q, k, v, out, lse, *ctx.args)
    return dq, dk, dv, None, None, None


def _no_double_backward(ctx, *grads):
    raise NotImplementedError(
        "nearby_attention: the gradient of the 3DNA backward (double backward) is not implemented "
        "for backend='torch' or 'triton'; use backend='dense' for higher-order gradients")


triton_fwd.register_autograd(_backward, setup_context=_setup_context)
triton_bwd.register_autograd(_no_double_backward, setup_context=lambda ctx, inputs, output: None)


def triton_attention(q: Tensor, k: Tensor, v: Tensor, extent: Sequence[int], causal: bool,
                     scale: float) -> Tensor:
    """3DNA through the fused kernels (differentiable, compilable); ``extent`` resolved
    (three ints), ``scale`` a float; inputs already validated."""
    return triton_fwd(q, k, v, [int(e) for e in extent], bool(causal), float(scale))[0]
