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

from nuwa3dna.kernels.autograd import contiguous_like, wire
from nuwa3dna.kernels.triton.launch import backward, forward, stats_shape


@torch.library.custom_op("nuwa3dna::triton_fwd", mutates_args=())
def triton_fwd(q: Tensor, k: Tensor, v: Tensor, extent: List[int], causal: bool,
               scale: float) -> Tuple[Tensor, Tensor]:
    return forward(q, k, v, tuple(extent), causal, scale)


@triton_fwd.register_fake
def _(q, k, v, extent, causal, scale):
    return contiguous_like(q), q.new_empty(stats_shape(q), dtype=torch.float32)


@torch.library.custom_op("nuwa3dna::triton_bwd", mutates_args=())
def triton_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
               extent: List[int], causal: bool, scale: float) -> Tuple[Tensor, Tensor, Tensor]:
    # dout goes in as autograd hands it over: the kernels read it through its
    # strides, so a broadcast (stride-0) gradient from out.sum() is not copied.
    return backward(q, k, v, out, lse, dout, tuple(extent), causal, scale)


wire(triton_fwd, triton_bwd)


def triton_attention(q: Tensor, k: Tensor, v: Tensor, extent: Sequence[int], causal: bool,
                     scale: float) -> Tensor:
    """3DNA through the fused kernels (differentiable, compilable); ``extent`` resolved
    (three ints), ``scale`` a float; inputs already validated."""
    return triton_fwd(q, k, v, [int(e) for e in extent], bool(causal), float(scale))[0]
