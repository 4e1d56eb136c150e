"""The Triton backend as ``torch.library`` custom ops, and ``triton_attention``.

* ``nuwa3dna::triton_fwd(q, k, v, extent, causal, scale, window=None, bias=None) -> (out, lse)``
* ``nuwa3dna::triton_bwd(dout, dlse, q, k, v, out, lse, extent, causal, scale, window=None, bias=None)
  -> (dq, dk, dv, dbias)`` (autograd wiring and argument meanings: ``kernels/autograd.py``)

``causal`` is raster order; ``window`` the v2 window options (dilation, stride,
per-axis causal, shifted borders, asymmetric radii) as ``windows.Options.encode``
writes them, None or empty for plain windows (the closed-form kernels; any
other takes the kernels' table path, ``relayout``). k and v may have fewer heads
than q (grouped queries: read in place, never repeated); ``bias`` (Hq, 2Rt+1,
2Rh+1, 2Rw+1), any float dtype, is read in the kernels and its gradient summed
there in float32 (``backward.bwd_dq_kernel``), returned in the bias's dtype.

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

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from nuwa3dna.kernels.autograd import contiguous_like, no_bias_grad, wire
from nuwa3dna.kernels.triton.launch import backward, forward, stats_shape
from nuwa3dna.kernels.windows import Options


@torch.library.custom_op("nuwa3dna::triton_fwd", mutates_args=())
def triton_fwd(q: Tensor, k: Tensor, v: Tensor, extent: List[int], causal: bool,
               scale: float, window: Optional[List[int]] = None,
               bias: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    return forward(q, k, v, tuple(extent), causal, scale, options=Options.decode(window), bias=bias)


@triton_fwd.register_fake
def _(q, k, v, extent, causal, scale, window=None, bias=None):
    return contiguous_like(q), q.new_empty(stats_shape(q), dtype=torch.float32)


@torch.library.custom_op("nuwa3dna::triton_bwd", mutates_args=())
def triton_bwd(dout: Tensor, dlse: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, out: Tensor,
               lse: Tensor, extent: List[int], causal: bool, scale: float,
               window: Optional[List[int]] = None,
               bias: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    # dout goes in as autograd hands it over: the kernels read it through its
    # strides, so a broadcast (stride-0) gradient from out.sum() is not copied.
    dbias = None if bias is None else torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
    dq, dk, dv = backward(q, k, v, out, lse, dout, tuple(extent), causal, scale, dlse=dlse,
                          options=Options.decode(window), bias=bias, dbias=dbias)
    return dq, dk, dv, (no_bias_grad(q) if bias is None else dbias.to(bias.dtype))


wire(triton_fwd, triton_bwd)


def triton_attention(q: Tensor, k: Tensor, v: Tensor, extent: Sequence[int], causal: bool,
                     scale: float, window: Optional[List[int]] = None,
                     bias: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """3DNA through the fused kernels (differentiable, compilable): (out, lse (B, heads, T, H, W)
    float32). ``extent`` resolved (three ints), ``causal`` raster order, ``scale`` a float,
    ``window`` the encoded v2 options (``Options.encode``); inputs already validated."""
    return triton_fwd(q, k, v, [int(e) for e in extent], bool(causal), float(scale), window, bias)
