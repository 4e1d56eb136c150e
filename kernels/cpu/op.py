"""The CPU tile path as ``torch.library`` custom ops: the one op and autograd path of this backend.

* ``nuwa3dna::torch_fwd(q, k, v, extent, causal, scale) -> (out, lse)``
* ``nuwa3dna::torch_bwd(dout, q, k, v, out, lse, extent, causal, scale) -> (dq, dk, dv)``

Each is opaque to ``torch.compile`` (fullgraph) with a fake implementation for
shape propagation; the backward is registered with ``register_autograd``.
Inputs are validated by ``nuwa3dna.checks`` before they get here; ``extent`` is
resolved (three ints). The ops run on any device (pure torch); worker threads
are used on CPU only. Differentiating the backward again raises a clear error.
"""
from __future__ import annotations

from typing import List, Tuple

import torch
from torch import Tensor

from nuwa3dna.kernels.cpu.backward import backward
from nuwa3dna.kernels.cpu.forward import forward
from nuwa3dna.kernels.cpu.planner import DEFAULT


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _contiguous_like(x: Tensor) -> Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("nuwa3dna::torch_fwd", mutates_args=())
def torch_fwd(q: Tensor, k: Tensor, v: Tensor, extent: List[int], causal: bool,
              scale: float) -> Tuple[Tensor, Tensor]:
    return forward(q, k, v, tuple(extent), causal, scale, DEFAULT)


@torch_fwd.register_fake
def _(q, k, v, extent, causal, scale):
    return _contiguous_like(q), q.new_empty(q.shape[:5], dtype=_acc(q.dtype))


@torch.library.custom_op("nuwa3dna::torch_bwd", mutates_args=())
def torch_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
              extent: List[int], causal: bool, scale: float) -> Tuple[Tensor, Tensor, Tensor]:
    return backward(dout, q, k, v, out, lse, tuple(extent), causal, scale, DEFAULT)


@torch_bwd.register_fake
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
    dq, dk, dv = torch_bwd(dout, q, k, v, out, lse, *ctx.args)
    return dq, dk, dv, None, None, None


def _no_double_backward(ctx, *grads):
    raise NotImplementedError(
        "nearby_attention: the gradient of the 3DNA backward (double backward) is not implemented "
        "for backend='torch' or 'triton'; use backend='dense' for higher-order gradients")


def _bwd_setup_context(ctx, inputs, output):
    pass


torch_fwd.register_autograd(_backward, setup_context=_setup_context)
torch_bwd.register_autograd(_no_double_backward, setup_context=_bwd_setup_context)


def torch_attention(q: Tensor, k: Tensor, v: Tensor, extent, causal: bool, scale: float) -> Tensor:
    """3DNA on the tile path (differentiable, compilable); ``extent`` resolved, inputs checked."""
    return torch_fwd(q, k, v, [int(e) for e in extent], bool(causal), float(scale))[0]
