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
from nuwa3dna.kernels.windows import BORDERS

BACKENDS = ("auto", "triton", "torch", "dense")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_TRITON_HEAD_DIM = 256
AXES = "thw"


def _integer(x, what, least: int):
    """An integer >= ``least`` (Python, numpy or a one-element integer tensor), named in errors."""
    bad = isinstance(x, (bool, float)) or (
        isinstance(x, torch.Tensor) and (x.numel() != 1 or x.is_floating_point() or x.is_complex()))
    try:
        if bad:
            raise TypeError
        n = operator.index(x.item() if isinstance(x, torch.Tensor) else x)
    except TypeError:
        kind = "an int >= 0 or None" if least == 0 else f"an int >= {least}"
        raise TypeError(f"{what} must be {kind}, got {x!r} of type {type(x).__name__}") from None
    if n < least:
        raise ValueError(f"{what} must be >= {least}, got {n}")
    return n


def _radius(e, what):
    """One radius: None, or an integer >= 0."""
    return None if e is None else _integer(e, what, 0)


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


def check_inputs(q, k, v, extent, causal, scale, backend, *, dilation=1, stride=1, border="clip", after=None):
    """Validate the arguments of ``nearby_attention``; returns (extent, scale, causal, dilation,
    stride) normalised: extent a 3-tuple of ints >= 0 or None, scale a float (D ** -0.5 by
    default), causal a bool or a 3-tuple of bools with at least one True, dilation and stride
    3-tuples of ints >= 1. ``after`` is internal (``nuwa3dna.natten``'s even kernels)."""
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
    for axis, what in ((0, "batch"), (5, "head dim")):
        if q.shape[axis] != k.shape[axis]:
            raise ValueError(
                f"q and k differ in {what}: q.shape={tuple(q.shape)}, k.shape={tuple(k.shape)}")
    if q.shape[4] % k.shape[4]:
        raise ValueError(f"q's heads must be a multiple of k's (grouped kv heads: query head h uses kv head "
                         f"h // (Hq // Hk)), got q.shape={tuple(q.shape)}, k.shape={tuple(k.shape)}")
    extent = normalize_extent(extent)
    causal, dilation, stride = check_windows(extent, causal, dilation, stride, border, after)
    check_window_grids(tuple(q.shape[1:4]), tuple(k.shape[1:4]), extent, causal, dilation, border, after)
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, Real):
            raise TypeError(f"scale must be a positive number or None, got {scale=}")
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be positive and finite, got {scale=}")
    check_backend(backend)
    if backend == "triton":
        check_triton(q)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return extent, scale, causal, dilation, stride


def check_extras(q, k, extent, border="clip", after=None, *, additional_keys=None, additional_values=None,
                 bias=None, return_lse=False, backend="auto"):
    """Validate ``nearby_attention``'s global tokens, relative position bias and ``return_lse``
    (docs/design.md section 8); ``extent`` normalised (a 3-tuple)."""
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {return_lse=}")
    if (additional_keys is None) != (additional_values is None):
        raise ValueError("additional_keys and additional_values go together: got "
                         f"{'additional_keys' if additional_values is None else 'additional_values'} alone")
    if additional_keys is not None:
        B, Hk, D = k.shape[0], k.shape[4], k.shape[5]
        for name, x in (("additional_keys", additional_keys), ("additional_values", additional_values)):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
            if x.dim() != 4 or x.shape[0] != B or x.shape[2] != Hk or x.shape[3] != D or x.shape[1] < 1:
                raise ValueError(f"{name} must have shape (B={B}, N >= 1, kv heads={Hk}, D={D}), "
                                 f"got {name}.shape={tuple(x.shape)}")
            if x.dtype != q.dtype or x.device != q.device:
                raise TypeError(f"{name} must match q's dtype and device, got {name}.dtype={x.dtype}, "
                                f"{name}.device={x.device}, {q.dtype=}, {q.device=}")
        if additional_keys.shape != additional_values.shape:
            raise ValueError(f"additional_keys and additional_values must have one shape, got "
                             f"{tuple(additional_keys.shape)} and {tuple(additional_values.shape)}")
    if bias is None:
        return
    if not isinstance(bias, torch.Tensor) or not bias.is_floating_point():
        raise TypeError(f"bias must be a floating-point torch.Tensor, got {type(bias).__name__}"
                        + (f" of dtype {bias.dtype}" if isinstance(bias, torch.Tensor) else ""))
    if bias.device != q.device:
        raise ValueError(f"bias must be on q's device, got {bias.device=}, {q.device=}")
    if any(e is None for e in extent):
        raise ValueError(f"a relative position bias needs a finite extent on every axis (None is the whole "
                         f"axis), got {extent=}")
    from nuwa3dna.kernels.windows import bias_radius
    after = extent if after is None else after
    want = (q.shape[4],) + tuple(2 * bias_radius(e, a, border == "shift") + 1 for e, a in zip(extent, after))
    if tuple(bias.shape) != want:
        raise ValueError(f"bias must have shape (heads, 2R_t+1, 2R_h+1, 2R_w+1) = {want} for {extent=}, "
                         f"{border=} (R = extent clipped, 2*extent shifted), got bias.shape={tuple(bias.shape)}")


def normalize_causal(causal):
    """``causal``: a bool (raster order) or a 3-tuple/list of bools (per axis t, h, w).
    Per-axis all False is returned as False (the same mask)."""
    if isinstance(causal, bool):
        return causal
    if not isinstance(causal, (tuple, list)):
        raise TypeError(f"causal must be a bool (raster order) or a 3-tuple of bools (per axis), got {causal=}")
    if len(causal) != 3:
        raise ValueError(f"per-axis causal must have 3 entries (t, h, w), got {causal=}")
    if not all(isinstance(c, bool) for c in causal):
        raise TypeError(f"per-axis causal must hold bools, got {causal=}")
    return tuple(causal) if any(causal) else False


def _count(x, what):
    """One dilation or stride: an integer >= 1."""
    return _integer(x, what, 1)


def normalize_per_axis(x, name):
    """``dilation`` or ``stride``: an int >= 1 (every axis) or a 3-tuple/list of them."""
    if isinstance(x, (tuple, list)):
        if len(x) != 3:
            raise ValueError(f"{name} must be an int or have 3 entries (t, h, w), got {name}={x!r}")
        return tuple(_count(e, f"{name}[{i}] of {name}={x!r}") for i, e in enumerate(x))
    if isinstance(x, (set, dict, str)) or (isinstance(x, torch.Tensor) and x.dim() > 0):
        raise TypeError(f"{name} must be an int >= 1 or a 3-tuple of those, got {name}={x!r}")
    return (_count(x, name),) * 3


def check_windows(extent, causal, dilation=1, stride=1, border="clip", after=None):
    """The grid-free checks of the v2 window options (docs/design.md section 7); ``extent``
    normalised. Returns (causal, dilation, stride) normalised."""
    causal = normalize_causal(causal)
    dilation, stride = normalize_per_axis(dilation, "dilation"), normalize_per_axis(stride, "stride")
    if not isinstance(border, str) or border not in BORDERS:
        raise ValueError(f"unknown {border=}; choose one of {BORDERS}")
    per_axis_causal = causal if isinstance(causal, tuple) else (False,) * 3
    for a, (e, d, s) in enumerate(zip(extent, dilation, stride)):
        where = f"(axis {AXES[a]!r})"
        if e is None:
            if d > 1 or s > 1:
                raise ValueError(f"dilation and stride > 1 need an int extent on their axis (None is the "
                                 f"whole axis), got {extent=}, {dilation=}, {stride=} {where}")
            continue
        K = e + (e if after is None else after[a]) + 1
        if s > K:
            raise ValueError(f"stride must be <= the window length 2*extent + 1 on every axis (a stride "
                             f"group of queries shares one window), got {stride=}, {extent=} {where}: {s} > {K}")
        if per_axis_causal[a] and border == "clip" and s > e + 1:
            raise ValueError(
                f"a causal axis with border='clip' keeps the extent + 1 keys up to the stride leader, so "
                f"stride must be <= extent + 1 there (or early queries of a group see no key), got "
                f"{stride=}, {extent=}, {causal=} {where}; border='shift' keeps 2*extent + 1")
    return causal, dilation, stride


def check_window_grids(q_grid, kv_grid, extent, causal, dilation=(1, 1, 1), border="clip", after=None):
    """The checks that need the grids: causality (raster or per axis) needs q's grid = kv's;
    shifted windows must fit in their key axis."""
    if causal is not False and q_grid != kv_grid:
        raise ValueError(
            f"causal 3DNA ({causal=}) needs the query and key grids to match, got "
            f"q grid={q_grid}, kv grid={kv_grid}")
    if border != "shift":
        return
    for a, (e, d, m) in enumerate(zip(extent, dilation, kv_grid)):
        K = None if e is None else e + (e if after is None else after[a]) + 1
        if K is not None and K * d > m:
            raise ValueError(
                f"border='shift' needs (2*extent + 1) * dilation <= the key axis length, got {extent=}, "
                f"{dilation=}, kv grid={kv_grid} (axis {AXES[a]!r}: {K} * {d} > {m})")


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
