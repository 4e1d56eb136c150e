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

Custom ops, not ``torch.library.triton_op`` (issue 12 item 7; tried on CPU with torch
2.13 and Triton 3.9, under the interpreter). A ``triton_op`` registers its own body as its
fake kernel and, under ``torch.compile``, re-runs the body on fake tensors inside
AOTAutograd, where ``wrap_triton`` turns a kernel into a graph node; but under the
interpreter ``@triton.jit`` gives an ``InterpretedFunction``, which ``wrap_triton``
returns unchanged (torch/_library/triton.py: "TRITON_INTERPRET=1 makes @triton.jit
return InterpretedFunction"), so the body calls the kernel on fake tensors. On a
toy add kernel as a ``triton_op``: eager ran; ``opcheck`` failed in test_faketensor
("Attempted to set the storage of a tensor on device "meta" to a storage on
different device "cpu""); ``torch.compile(fullgraph=True)`` failed with both the
aot_eager and inductor backends ("Dynamo failed to run FX node with fake tensors:
... Cannot access data pointer of Tensor (e.g. FakeTensor, FunctionalTensor)"). So on
this machine a ``triton_op`` would break tests/test_compile.py's opcheck of these ops
and could not be tested under compile at all. (Off the interpreter ``wrap_triton`` accepts
only ``triton.jit`` and ``triton.autotune`` kernels, which ours are: the launchers set every
flag, KEYS_INSIDE included, in the launch plan.) What a GPU session should try: benchmarks/NOTES.md,
"Launch-plan cache (issue 12 item 7)".

As custom ops the kernels are opaque to Inductor but can be captured in CUDA graphs
(``torch.compile(mode="reduce-overhead")`` or ``torch.cuda.graph``): the launch path
makes no host sync and, after the first call per shape (which must run before
capture: it builds the launch plan, copies the window tables to the device and
compiles the kernels; ``launch``'s docstring), no host-to-device copy.

Untested here: the ops under torch.compile and CUDA graphs on a GPU (tests run on
CPU, where the kernels only run under the Triton interpreter, eagerly).
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
