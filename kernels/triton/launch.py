"""Launchers and drivers of the 3DNA kernels.

Each ``*_launch`` returns (kernel, grid, args, meta) and launches nothing, so
kernels/report.py compiles exactly what the drivers run. ``forward`` and
``backward`` allocate what is not passed in and launch, with the inputs'
device current (``device_guard``). Inputs are validated by ``nuwa3dna.checks``
before they get here; ``extent`` is resolved (three ints).

``causal`` is raster order; ``options`` (``windows.Options``) the v2 window
options. Plain options launch the closed-form kernels (TABLES=False, no table
argument), any other the table path with the window tables of ``relayout``
(TABLES=True; built once per geometry and device, cached).

Grouped kv heads (k, v with fewer heads than q) launch GROUPED=True with
``group`` = q heads // kv heads; a relative position ``bias`` HAS_BIAS=True with
its radii from its shape (``bias_radii``). Without them the kernels compile
exactly as before (both flags False, BIAS None).
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional, Tuple

import torch

from nuwa3dna.kernels.triton import configs, relayout
from nuwa3dna.kernels.triton.backward import bwd_dkdv_kernel, bwd_dq_kernel, bwd_preprocess_kernel
from nuwa3dna.kernels.triton.configs import LaunchConfig, dot_mode, float32_tf32
from nuwa3dna.kernels.triton.forward import fwd_kernel
from nuwa3dna.kernels.triton.jit import LOG2E
from nuwa3dna.kernels.windows import Options


def stats_shape(q) -> Tuple[int, ...]:
    """Shape of the float32 log-sum-exp and delta buffers: (B, heads, T, H, W)."""
    B, T, H, W, n_heads, _ = q.shape
    return (B, n_heads, T, H, W)


def _n_tiles(grid, tile) -> int:
    return math.prod(-(-g // b) for g, b in zip(grid, tile))


INT32_MAX = 2 ** 31 - 1
# Raster indices of a (batch, head) grid are int32, and a block of rows may run a
# little past the grid's end before its mask applies: keep a margin below 2**31.
MAX_TOKENS = 2 ** 31 - 2 ** 12


def check_index_range(q, k) -> None:
    """Refuse grids whose raster indices would not fit the kernels' int32, with a clear error."""
    for name, x in (("q", q), ("k", k)):
        n = math.prod(x.shape[1:4])
        if n > MAX_TOKENS:
            raise ValueError(f"backend='triton' indexes a grid's tokens in int32: {name} grid "
                             f"{tuple(x.shape[1:4])} has {n} tokens, more than {MAX_TOKENS} (2**31 - 2**12)")


def needs_wide_index(q_grid, kv_grid, extent) -> bool:
    """True when some axis's window arithmetic passes int32: the centre i * n_kv and
    the query range's (k + e + 1) * n_q + n_kv - 1 reach (n_kv + e) * n_q + n_kv."""
    return any((n_kv + e) * n_q + n_kv > INT32_MAX for n_q, n_kv, e in zip(q_grid, kv_grid, extent))


def bias_radii(bias) -> Tuple[int, int, int]:
    """R per axis of a bias (Hq, 2Rt+1, 2Rh+1, 2Rw+1), from its shape: the kernels get the
    extent capped at the axis lengths, the bias keeps the user's R; (0, 0, 0) without one."""
    return (0, 0, 0) if bias is None else tuple((n - 1) // 2 for n in bias.shape[1:])


def _head_args(q, k, bias) -> list:
    """The kernels' ``group, RT, RH, RW`` arguments."""
    return [q.shape[4] // k.shape[4], *bias_radii(bias)]


def _configs(q, k, extent, arch, causal=False, options=None, bias=None) -> dict:
    check_index_range(q, k)
    return configs.pick_configs(tuple(q.shape[1:4]), tuple(k.shape[1:4]), extent, q.shape[-1], q.dtype,
                                arch or configs.device_arch(q.device), causal, options, bias=bias is not None,
                                tf32=q.dtype == torch.float32 and float32_tf32())


def window_table(q, k, extent, options: Optional[Options]):
    """The kernels' TAB argument: the int32 window tables on q's device for v2 options
    (``relayout.packed``), None for plain windows."""
    if options is None or options.plain:
        return None
    return relayout.packed(q.shape[1:4], k.shape[1:4], extent, options, q.device)


def _even_d(cfg: LaunchConfig, D: int) -> bool:
    """True when the head dim needs no mask (D = 16, 32, ... 256: every NÜWA size),
    so loads vectorise without a predicate per lane."""
    return D == cfg.block_d


def _meta(cfg: LaunchConfig, q, k, extent, causal: bool, tab, bias=None) -> dict:
    # The walked tile is one frame deep (fwd/dq: keys, dkdv: queries); see configs.plan_tiles.
    tiles = (dict(BH=cfg.q_tile[1], BW=cfg.q_tile[2], KT=cfg.k_tile[0], KH=cfg.k_tile[1], KW=cfg.k_tile[2])
             if cfg.kernel == "dkdv" else
             dict(BT=cfg.q_tile[0], BH=cfg.q_tile[1], BW=cfg.q_tile[2], KH=cfg.k_tile[1], KW=cfg.k_tile[2]))
    # The table path does no window arithmetic (its tables hold positions), so never WIDE_IDX.
    return dict(**tiles, BLOCK_D=cfg.block_d, CAUSAL=causal, DOT=dot_mode(q.dtype, float32_tf32()),
                EVEN_D=_even_d(cfg, q.shape[-1]),
                WIDE_IDX=tab is None and needs_wide_index(q.shape[1:4], k.shape[1:4], extent),
                TABLES=tab is not None, GROUPED=k.shape[4] != q.shape[4], HAS_BIAS=bias is not None,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def fwd_launch(q, k, v, out, lse, extent, causal, scale, arch=None, options=None, bias=None):
    """Forward: grid (B * heads * query tiles,); see forward.fwd_kernel. ``bias`` contiguous."""
    B, T, H, W, n_heads, D = q.shape
    T2, H2, W2 = k.shape[1:4]
    cfg = _configs(q, k, extent, arch, causal, options, bias)["fwd"]
    tab = window_table(q, k, extent, options)
    grid = (B * n_heads * _n_tiles((T, H, W), cfg.q_tile),)
    args = [q, k, v, out, lse, tab, bias, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            T, H, W, T2, H2, W2, *extent, n_heads, *_head_args(q, k, bias), D, scale * LOG2E]
    return fwd_kernel, grid, args, _meta(cfg, q, k, extent, causal, tab, bias)


def preprocess_launch(q, out, dout, delta, arch=None):
    """delta = rowsum(dO * O): grid (B * heads * cdiv(T*H*W, rows),)."""
    B, T, H, W, n_heads, D = q.shape
    cfg = _configs(q, q, (0, 0, 0), arch)["preprocess"]
    grid = (B * n_heads * -(-(T * H * W) // cfg.block_q),)
    args = [out, dout, delta, *out.stride(), *dout.stride(), T, H, W, n_heads, D]
    meta = dict(BLOCK_N=cfg.block_q, BLOCK_D=cfg.block_d, EVEN_D=_even_d(cfg, D),
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return bwd_preprocess_kernel, grid, args, meta


def dkdv_launches(q, k, v, dout, lse, delta, dk, dv, extent, causal, scale, arch=None, options=None,
                  bias=None):
    """One launch (dK and dV together) or two (a dK pass, a dV pass; see split_dkdv);
    grid (B * kv heads * key tiles,): a program sums its kv head's query heads."""
    B, T, H, W, n_heads, D = q.shape
    T2, H2, W2, kv_heads = k.shape[1:5]
    cfg = _configs(q, k, extent, arch, causal, options, bias)["dkdv"]
    tab = window_table(q, k, extent, options)
    grid = (B * kv_heads * _n_tiles((T2, H2, W2), cfg.k_tile),)
    args = [q, k, v, dout, lse, delta, dk, dv, tab, bias,
            *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dk.stride(), *dv.stride(),
            T, H, W, T2, H2, W2, *extent, kv_heads, *_head_args(q, k, bias), D, scale, scale * LOG2E]
    meta = _meta(cfg, q, k, extent, causal, tab, bias)
    passes = [(True, False), (False, True)] if cfg.split_dkdv else [(True, True)]
    return [(bwd_dkdv_kernel, grid, args, dict(meta, DO_DK=a, DO_DV=b)) for a, b in passes]


def dq_launch(q, k, v, dout, lse, delta, dq, extent, causal, scale, arch=None, options=None, bias=None,
              dbias=None):
    """dQ: grid (B * heads * query tiles,), as the forward; with ``bias`` it adds d_bias into
    ``dbias`` (float32, the bias's shape, contiguous)."""
    B, T, H, W, n_heads, D = q.shape
    T2, H2, W2 = k.shape[1:4]
    cfg = _configs(q, k, extent, arch, causal, options, bias)["dq"]
    tab = window_table(q, k, extent, options)
    grid = (B * n_heads * _n_tiles((T, H, W), cfg.q_tile),)
    args = [q, k, v, dout, lse, delta, dq, tab, bias, dbias,
            *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dq.stride(),
            T, H, W, T2, H2, W2, *extent, n_heads, *_head_args(q, k, bias), D, scale, scale * LOG2E]
    return bwd_dq_kernel, grid, args, _meta(cfg, q, k, extent, causal, tab, bias)


def device_guard(device):
    """Make ``device`` the current CUDA device while launching: Triton launches on
    the current device and its current stream, so tensors on cuda:1 while cuda:0
    is current would otherwise run (and fail) on the wrong GPU. A no-op off CUDA."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _run(spec) -> None:
    kernel, grid, args, meta = spec
    kernel[grid](*args, **meta)


def forward(q, k, v, extent, causal: bool, scale: float,
            out: Optional[torch.Tensor] = None, lse: Optional[torch.Tensor] = None,
            options: Optional[Options] = None, bias: Optional[torch.Tensor] = None):
    """Launch the forward; returns (out, lse). ``out`` (any strides) and ``lse``
    (contiguous float32, ``stats_shape(q)``) may be preallocated, e.g. NaN-poisoned by tests.
    ``options``: the v2 window options (None: plain); ``bias``: the relative position bias
    (Hq, 2Rt+1, 2Rh+1, 2Rw+1) or None; k, v may have fewer heads than q."""
    check_index_range(q, k)
    with device_guard(q.device):
        if out is None:
            out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        if lse is None:
            lse = torch.empty(stats_shape(q), dtype=torch.float32, device=q.device)
        _run(fwd_launch(q, k, v, out, lse, extent, causal, scale, options=options,
                        bias=None if bias is None else bias.contiguous()))
    return out, lse


def backward(q, k, v, out, lse, dout, extent, causal: bool, scale: float,
             dq=None, dk=None, dv=None, delta=None, dlse=None, options: Optional[Options] = None,
             bias: Optional[torch.Tensor] = None, dbias: Optional[torch.Tensor] = None):
    """Launch preprocess, dK/dV and dQ; returns (dq, dk, dv). Buffers may be
    preallocated; ``dout`` is read through its strides (broadcast stride 0 included).
    ``dlse``: the gradient of the returned lse (``stats_shape(q)``) or None; it enters
    as delta - dlse (d lse_i / d s_ij = p_ij). ``bias`` as ``forward``; its gradient is
    added into ``dbias`` (float32 zeros of the bias's shape, contiguous; a scratch one
    when None)."""
    check_index_range(q, k)
    with device_guard(q.device):
        dq = torch.empty(q.shape, dtype=q.dtype, device=q.device) if dq is None else dq
        dk = torch.empty(k.shape, dtype=k.dtype, device=k.device) if dk is None else dk
        dv = torch.empty(v.shape, dtype=v.dtype, device=v.device) if dv is None else dv
        if delta is None:
            delta = torch.empty(stats_shape(q), dtype=torch.float32, device=q.device)
        _run(preprocess_launch(q, out, dout, delta))
        if dlse is not None:
            delta.sub_(dlse)
        if bias is not None:
            bias = bias.contiguous()
            if dbias is None:
                dbias = torch.zeros(bias.shape, dtype=torch.float32, device=q.device)
        for spec in dkdv_launches(q, k, v, dout, lse, delta, dk, dv, extent, causal, scale, options=options,
                                  bias=bias):
            _run(spec)
        _run(dq_launch(q, k, v, dout, lse, delta, dq, extent, causal, scale, options=options, bias=bias,
                       dbias=dbias))
    return dq, dk, dv
