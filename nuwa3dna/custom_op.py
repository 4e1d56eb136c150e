"""The torch path as ``torch.library`` custom ops, so that ``torch.compile``
(fullgraph=True) traces ``nearby_attention`` and ``NearbyAttention3D`` without
graph breaks: each op is opaque to Dynamo, has a fake (meta) implementation for
shape propagation and an autograd formula registered with ``register_autograd``.

Ops (all take a resolved ``extent`` of three ints and a float ``scale``; no
validation here, ``nearby_attention`` validates before calling them):

* ``nuwa3dna::torch_fwd(q, k, v, extent, causal, scale) -> (out, lse)``
* ``nuwa3dna::torch_bwd(dout, q, k, v, out, lse, extent, causal, scale) -> (dq, dk, dv)``

The Triton backend's ops (``nuwa3dna::triton_fwd`` / ``triton_bwd``) live in
``nuwa3dna.kernels.triton.op``.
"""
from __future__ import annotations

from typing import List, Tuple

import torch
from torch import Tensor

from nuwa3dna.torch_path import nearby_backward, nearby_forward


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------- torch path

@torch.library.custom_op("nuwa3dna::torch_fwd", mutates_args=(), device_types="cpu")
def torch_fwd(q: Tensor, k: Tensor, v: Tensor, extent: List[int], causal: bool,
              scale: float) -> Tuple[Tensor, Tensor]:
    return nearby_forward(q, k, v, tuple(extent), causal, scale)


@torch_fwd.register_fake
def _(q, k, v, extent, causal, scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format), \
        q.new_empty(q.shape[:5], dtype=_acc(q.dtype))


@torch.library.custom_op("nuwa3dna::torch_bwd", mutates_args=(), device_types="cpu")
def torch_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
              extent: List[int], causal: bool, scale: float) -> Tuple[Tensor, Tensor, Tensor]:
    return nearby_backward(dout, q, k, v, out, lse, tuple(extent), causal, scale)


def _fake_grads(dout, q, k, v, out, lse, extent, causal, scale):
    """Shapes of (dq, dk, dv): contiguous, like q, k, v."""
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format))


torch_bwd.register_fake(_fake_grads)


def _setup_context(ctx, inputs, output):
    q, k, v, extent, causal, scale = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.args = (list(extent), bool(causal), float(scale))


def _torch_backward(ctx, dout, _dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = torch_bwd(dout, q, k, v, out, lse, *ctx.args)
    return dq, dk, dv, None, None, None


torch_fwd.register_autograd(_torch_backward, setup_context=_setup_context)


def torch_op(q, k, v, extent, causal: bool, scale: float) -> Tensor:
    """The torch path through its custom op (differentiable, compilable)."""
    return torch_fwd(q, k, v, [int(e) for e in extent], bool(causal), float(scale))[0]

