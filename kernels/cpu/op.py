"""The CPU tile path as ``torch.library`` custom ops: the one op and autograd path of this backend.

* ``nuwa3dna::torch_fwd(q, k, v, extent, causal, scale, window=None, bias=None) -> (out, lse)``
* ``nuwa3dna::torch_bwd(dout, dlse, q, k, v, out, lse, extent, causal, scale, window=None, bias=None)
  -> (dq, dk, dv, dbias)`` (autograd wiring and argument meanings: ``kernels/autograd.py``)

``causal`` is raster order; ``window`` the v2 window options (dilation, stride,
per-axis causal, shifted borders, asymmetric radii) as ``windows.Options.encode``
writes them, None or empty for plain windows.

Each is opaque to ``torch.compile`` (fullgraph) with a fake implementation for
shape propagation; the backward is registered with ``register_autograd``.
Inputs are validated by ``nuwa3dna.checks`` before they get here; ``extent`` is
resolved (three ints). Two strategies, chosen per problem by ``sdpa.use_sdpa``
(the measured crossover): the tile loops (``forward``/``backward``) and, for
small or widely visible score matrices, PyTorch's fused flash kernel with the
window mask (``sdpa``). Both save the same natural log-sum-exp. The ops run on
any device (pure torch); worker threads are used on CPU only. Differentiating the backward again raises a clear error.

k and v may have fewer heads than q (grouped queries: head h uses kv head
h // (Hq // Hk)); ``bias`` is the relative position bias (Hq, 2Rt+1, 2Rh+1,
2Rw+1) or None (``bias.py``). A call with a bias takes the fused forward where
the strategy choice says so, and always the tile backward: the fused kernel's
backward gives no gradient of its mask. Measured paired on 2 cores at the
model's video layer (B 8, 4x8x8, 4 heads, D 32, extent (1, 2, 2), causal),
forward + backward with a bias: fused forward + tile backward 26.7 ms, tile
loops for both 54.6 ms (plain fused: 12.3 ms); (1, 3, 3): 48 vs 76 ms.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from nuwa3dna.kernels.autograd import contiguous_like, no_bias_grad, wire
from nuwa3dna.kernels.cpu import planner, sdpa
from nuwa3dna.kernels.cpu.backward import backward
from nuwa3dna.kernels.cpu.forward import forward
from nuwa3dna.kernels.windows import Options


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.custom_op("nuwa3dna::torch_fwd", mutates_args=())
def torch_fwd(q: Tensor, k: Tensor, v: Tensor, extent: List[int], causal: bool,
              scale: float, window: Optional[List[int]] = None,
              bias: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    config, opts = planner.DEFAULT, Options.decode(window)
    impl = sdpa.forward if _fused(q, k, extent, causal, config, opts) else forward
    return impl(q, k, v, tuple(extent), causal, scale, config, opts, bias)


def _fused(q, k, extent, causal, config, opts) -> bool:
    if q.device.type != "cpu":      # the fused kernel (aten's flash attention for CPU) runs on CPU only
        return False
    return sdpa.use_sdpa(q.shape[1:4], k.shape[1:4], extent, causal, config, opts)


@torch_fwd.register_fake
def _(q, k, v, extent, causal, scale, window=None, bias=None):
    return contiguous_like(q), q.new_empty(q.shape[:5], dtype=_acc(q.dtype))


@torch.library.custom_op("nuwa3dna::torch_bwd", mutates_args=())
def torch_bwd(dout: Tensor, dlse: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, out: Tensor,
              lse: Tensor, extent: List[int], causal: bool, scale: float,
              window: Optional[List[int]] = None,
              bias: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    config, opts = planner.DEFAULT, Options.decode(window)
    # The fused kernel's backward returns no gradient of its mask: d_bias needs the tile backward.
    fused = bias is None and _fused(q, k, extent, causal, config, opts) and sdpa.takes_dlse(dlse, q)
    if fused:
        return sdpa.backward(dout, dlse, q, k, v, out, lse, tuple(extent), causal, scale, config, opts) \
            + (no_bias_grad(q),)
    grads = backward(dout, dlse, q, k, v, out, lse, tuple(extent), causal, scale, config, opts, bias)
    return grads if bias is not None else grads + (no_bias_grad(q),)


wire(torch_fwd, torch_bwd)


def torch_attention(q: Tensor, k: Tensor, v: Tensor, extent, causal: bool, scale: float,
                    opts: Options = Options(), bias: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """3DNA on the CPU backend (differentiable, compilable): (out, lse (B, T, H, W, heads) float32/64).
    ``extent`` resolved, inputs checked. ``causal``: raster order (a bool); the v2 window options
    (per-axis causal included) in ``opts``; ``bias`` the relative position bias or None."""
    extent = [int(e) for e in extent]
    return torch_fwd(q, k, v, extent, bool(causal), float(scale), None if opts.plain else opts.encode(), bias)
