"""NATTEN 0.21's ``natten.functional.na1d/na2d/na3d``, as a thin layer onto 3DNA.

A model moves over by changing one import (docs/design.md section 7)::

    from natten.functional import na3d      ->      from nuwa3dna.natten import na3d

Same arguments, same layout, same result: query, key, value are
(batch, *spatial, heads, head_dim) with 1, 2 or 3 spatial axes; ``kernel_size``,
``stride``, ``dilation`` are ints or per-axis tuples, ``is_causal`` a bool or a
per-axis tuple. A kernel size K is ``nearby_attention(..., border="shift")`` with
extent K // 2, and for even K one key fewer after the leader (K // 2 - 1), as in
NATTEN; ``additional_keys``/``additional_values`` and ``return_lse`` as
NATTEN's (global keys in the same softmax; natural-log lse). Beyond NATTEN: key/value grids of another size than the query's (cross
attention, centres rescaled; non-causal), a CPU backward, and kernel size 1.
"""
from __future__ import annotations

import torch

from nuwa3dna.ops import windowed_attention


def _per_axis(x, na_dim, name, check, want):
    values = tuple(x) if isinstance(x, (tuple, list)) else (x,) * na_dim
    if len(values) != na_dim or not all(check(v) for v in values):
        raise ValueError(f"{name} must be {want} or a tuple of {na_dim} of them, got {name}={x!r}")
    return values


def _is_int(v, low):
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def neighborhood_attention(query, key, value, kernel_size, stride=1, dilation=1, is_causal=False, scale=None,
                           additional_keys=None, additional_values=None, return_lse=False):
    """``na1d``/``na2d``/``na3d`` by the number of spatial axes of ``query`` (its dim - 3).
    ``additional_keys``/``additional_values`` (batch, N, heads, head_dim) join every window
    in one softmax; ``return_lse`` returns (out, lse (batch, *spatial, heads)), as NATTEN."""
    for name, x in (("query", query), ("key", key), ("value", value)):
        if not isinstance(x, torch.Tensor) or x.dim() not in (4, 5, 6):
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name} must be (batch, *spatial, heads, head_dim) with 1-3 spatial axes, "
                             f"got {name}.shape={shape}")
    na_dim = query.dim() - 3
    if key.dim() != query.dim() or value.dim() != query.dim():
        raise ValueError(f"query, key and value need the same number of dims, got {query.shape=}, "
                         f"{key.shape=}, {value.shape=}")
    kernel_size = _per_axis(kernel_size, na_dim, "kernel_size", lambda v: _is_int(v, 1), "an int >= 1")
    stride = _per_axis(1 if stride is None else stride, na_dim, "stride", lambda v: _is_int(v, 1),
                       "an int >= 1")
    dilation = _per_axis(1 if dilation is None else dilation, na_dim, "dilation", lambda v: _is_int(v, 1),
                         "an int >= 1")
    is_causal = _per_axis(False if is_causal is None else is_causal, na_dim, "is_causal",
                          lambda v: isinstance(v, bool), "a bool")
    size = tuple(key.shape[1:1 + na_dim])
    if any(k * d > n for k, d, n in zip(kernel_size, dilation, size)):
        raise ValueError(f"kernel_size * dilation cannot be larger than the input size on any axis, got "
                         f"input size={size}, {kernel_size=}, {dilation=}")
    if any(s > k for s, k in zip(stride, kernel_size)):
        raise ValueError(f"stride cannot be larger than kernel_size on any axis, got {kernel_size=}, {stride=}")
    pad = 3 - na_dim                                 # leading axes of length 1, window of one key
    lift = lambda x: x.reshape(x.shape[0], *(1,) * pad, *x.shape[1:])
    extent = (0,) * pad + tuple(k // 2 for k in kernel_size)
    after = (0,) * pad + tuple(k // 2 - (k % 2 == 0) for k in kernel_size)
    causal = (False,) * pad + is_causal
    res = windowed_attention(
        lift(query), lift(key), lift(value), extent, causal if any(causal) else False, scale, "auto",
        dilation=(1,) * pad + dilation, stride=(1,) * pad + stride, border="shift",
        after=None if after == extent else after, additional_keys=additional_keys,
        additional_values=additional_values, return_lse=bool(return_lse))
    if return_lse:
        return res[0].reshape(query.shape), res[1].reshape(query.shape[:-1])
    return res.reshape(query.shape)


def na1d(query, key, value, kernel_size, stride=1, dilation=1, is_causal=False, scale=None,
         additional_keys=None, additional_values=None, return_lse=False):
    """1D neighbourhood attention: (batch, L, heads, head_dim), NATTEN 0.21's ``na1d``."""
    _expect(query, 1, "na1d")
    return neighborhood_attention(query, key, value, kernel_size, stride, dilation, is_causal, scale,
                                  additional_keys, additional_values, return_lse)


def na2d(query, key, value, kernel_size, stride=1, dilation=1, is_causal=False, scale=None,
         additional_keys=None, additional_values=None, return_lse=False):
    """2D neighbourhood attention: (batch, X, Y, heads, head_dim), NATTEN 0.21's ``na2d``."""
    _expect(query, 2, "na2d")
    return neighborhood_attention(query, key, value, kernel_size, stride, dilation, is_causal, scale,
                                  additional_keys, additional_values, return_lse)


def na3d(query, key, value, kernel_size, stride=1, dilation=1, is_causal=False, scale=None,
         additional_keys=None, additional_values=None, return_lse=False):
    """3D neighbourhood attention: (batch, X, Y, Z, heads, head_dim), NATTEN 0.21's ``na3d``."""
    _expect(query, 3, "na3d")
    return neighborhood_attention(query, key, value, kernel_size, stride, dilation, is_causal, scale,
                                  additional_keys, additional_values, return_lse)


def _expect(query, na_dim, name):
    if isinstance(query, torch.Tensor) and query.dim() != na_dim + 3:
        raise ValueError(f"{name} takes (batch, {na_dim} spatial axes, heads, head_dim) tensors "
                         f"({na_dim + 3} dims), got query.shape={tuple(query.shape)}")
