"""Validation at the public boundary, done once, naming the bad values.

Backends, kernels and autograd Functions below this layer hold no checks.
"""
from __future__ import annotations

import math
import numbers
import operator
from numbers import Real

import torch

from nuwa3dna.kernels.env import interpreter_enabled

BACKENDS = ("auto", "triton", "torch", "dense")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_TRITON_HEAD_DIM = 256


def _radius(e, what):
    """One radius: None, or an integer >= 0 (Python, numpy or a one-element integer tensor)."""
    if e is None:
        return None
    if isinstance(e, bool) or isinstance(e, float) or (
            isinstance(e, torch.Tensor) and (e.numel() != 1 or e.is_floating_point() or e.is_complex())):
        raise TypeError(f"{what} must be an int >= 0 or None, got {e!r} of type {type(e).__name__}")
    try:
        r = operator.index(e.item() if isinstance(e, torch.Tensor) else e)
    except TypeError:
        raise TypeError(f"{what} must be an int >= 0 or None, got {e!r} of type {type(e).__name__}") from None
    if r < 0:
        raise ValueError(f"{what} must be >= 0, got {r}")
    return r


def normalize_extent(extent):
    """Validate an extent and return it as a 3-tuple of ints >= 0 or None.

    Accepted: an int (or numpy integer, or one-element integer tensor) or None for
    every axis, or a tuple/list of three of those. Sets, dicts, strings and
    other iterables are refused: their order is not (t, h, w).
    """
    if not isinstance(extent, (tuple, list)):
        if isinstance(extent, torch.Tensor) and extent.dim() > 0:
            raise TypeError(f"extent must be an int, None or a 3-tuple of those, got a tensor of shape "
                            f"{tuple(extent.shape)}: {extent=}")
        if extent is not None and not isinstance(extent, (numbers.Integral, torch.Tensor)):
            raise TypeError(f"extent must be an int, None or a 3-tuple/list of those, got {extent=} "
                            f"of type {type(extent).__name__}")
        r = _radius(extent, "extent")
        return (r, r, r)
    if len(extent) != 3:
        raise ValueError(f"extent must have 3 entries (t, h, w), got {extent=}")
    return tuple(_radius(e, f"extent[{i}] of {extent=}") for i, e in enumerate(extent))


def check_extent(extent):
    """Validate an extent (see ``normalize_extent``)."""
    normalize_extent(extent)


def check_backend(backend):
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend: {backend=}; choose one of {BACKENDS}")


def check_inputs(q, k, v, extent, causal, scale, backend):
    """Validate the arguments of ``nearby_attention``; returns (extent, scale) normalised:
    extent a 3-tuple of ints >= 0 or None, scale a float (D ** -0.5 by default)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != 6:
            raise ValueError(
                f"{name} must have shape (B, T, H, W, heads, D) (6 dims), got {name}.shape={tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a float32, float16, bfloat16 or float64 tensor, "
                            f"got {name}.dtype={x.dtype}")
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name}.dtype={x.dtype} is not supported; use float32, float16, bfloat16 "
                            "or float64 (float64: backends 'torch' and 'dense')")
        if x.numel() == 0 and 0 in x.shape:
            raise ValueError(f"{name} is empty: {name}.shape={tuple(x.shape)}; every size must be >= 1")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype=}, {k.dtype=}, {v.dtype=}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device=}, {k.device=}, {v.device=}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have one shape, got k.shape={tuple(k.shape)}, v.shape={tuple(v.shape)}")
    for axis, what in ((0, "batch"), (4, "heads"), (5, "head dim")):
        if q.shape[axis] != k.shape[axis]:
            raise ValueError(
                f"q and k differ in {what}: q.shape={tuple(q.shape)}, k.shape={tuple(k.shape)}")
    extent = normalize_extent(extent)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {causal=}")
    if causal and q.shape[1:4] != k.shape[1:4]:
        raise ValueError(
            "causal 3DNA needs the query and key grids to match, got "
            f"q grid={tuple(q.shape[1:4])}, kv grid={tuple(k.shape[1:4])}")
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, Real):
            raise TypeError(f"scale must be a positive number or None, got {scale=}")
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be positive and finite, got {scale=}")
    check_backend(backend)
    if backend == "triton":
        check_triton(q)
    return extent, q.shape[-1] ** -0.5 if scale is None else float(scale)


def check_triton(q):
    """The Triton backend's own limits (device, dtype, head dim)."""
    if q.device.type != "cuda" and not interpreter_enabled():
        raise ValueError(
            f"backend='triton' needs CUDA tensors (got device {q.device}); on CPU it runs only "
            "under the Triton interpreter (set TRITON_INTERPRET=1 before importing nuwa3dna), "
            "or use backend='torch'")
    if q.dtype not in TRITON_DTYPES:
        raise TypeError(f"backend='triton' supports float32, float16, bfloat16, got {q.dtype=}")
    if q.shape[-1] > MAX_TRITON_HEAD_DIM:
        raise ValueError(f"backend='triton' supports head dims up to {MAX_TRITON_HEAD_DIM}, got D={q.shape[-1]}")


def uses_forward_ad(*xs) -> bool:
    """True if any tensor carries a forward-mode tangent (``forward_ad`` dual or ``torch.func.jvp``)."""
    import torch.autograd.forward_ad as fwAD
    from torch._C import _functorch
    if torch.compiler.is_compiling():
        return False        # Dynamo traces the op once; a jvp transform is outside it
    for x in xs:
        if fwAD._is_fwd_grad_enabled() and fwAD.unpack_dual(x).tangent is not None:
            return True
        if _functorch.is_functorch_wrapped_tensor(x):
            layer = _functorch.peek_interpreter_stack()
            if layer is not None and layer.key() == _functorch.TransformType.Jvp:
                return True
    return False
