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

Launch plans (issue 12 item 7: on a small grid such as nuwa-image the host took
longer than the kernels' ~5 us). Everything of a launch but its tensors, their
strides and the scale (kernel, grid, constexpr meta, integer sizes, window
table) is a ``LaunchPlan``, built on the first call per ``plan_key`` (kind,
shapes, dtype, device, extent, causal, options, bias shape, arch) and kept in
``PLANS``, a thread-safe LRU of ``PLAN_CACHE_SIZE`` = 256 entries that
``nuwa3dna.memory.clear_workspace`` empties and ``workspace_bytes`` counts. Measured
on this project's loaded 2-core CPU (benchmarks/NOTES.md, ranges over four runs), the
nuwa-image forward's launch spec took 21-50 us to build before and 4-9 us with a
cached plan, the backward's three 68-146 us and 15-22 us; the forward driver,
allocations included, 28-57 us and 9-14 us.

CUDA graphs. After the first call per key nothing here waits on the device or copies
to it: no ``.item()`` or ``.cpu()``, and the v2 window tables are already on the
device in the plan; the buffers come from PyTorch's caching allocator, which graph
capture supports. The first call per key must run before capture (the usual
warm-up): it builds the plan, copies the window tables to the device (a
host-to-device copy, ``relayout.packed``, which capture refuses) and compiles the
kernels. A captured graph holds the window table's address, so do not call
``clear_workspace`` while it may replay.
"""
from __future__ import annotations

import contextlib
import math
from types import MappingProxyType
from typing import Any, Mapping, NamedTuple, Optional, Tuple

import torch

from nuwa3dna.kernels.env import interpreter_enabled
from nuwa3dna.kernels.triton import configs, plan, relayout
from nuwa3dna.kernels.triton.backward import bwd_dkdv_kernel, bwd_dq_kernel, bwd_preprocess_kernel
from nuwa3dna.kernels.triton.configs import LaunchConfig, dot_mode, float32_tf32
from nuwa3dna.kernels.triton.forward import fwd_kernel
from nuwa3dna.kernels.triton.jit import LOG2E
from nuwa3dna.kernels.triton.plancache import PlanCache
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


def _tf32(q) -> bool:
    """float32 inputs on TF32 tensor cores: PyTorch's float32 matmul setting (``configs.float32_tf32``)."""
    return q.dtype == torch.float32 and float32_tf32()


def _configs(q, k, extent, arch, causal=False, options=None, bias=None) -> dict:
    check_index_range(q, k)
    return configs.pick_configs(tuple(q.shape[1:4]), tuple(k.shape[1:4]), extent, q.shape[-1], q.dtype,
                                arch or configs.device_arch(q.device), causal, options, bias=bias is not None,
                                tf32=_tf32(q))


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
    if cfg.kernel != "dkdv":    # the forward and dQ walk: are all its key tiles inside the grid?
        tiles["KEYS_INSIDE"] = tab is None and plan.keys_inside(
            tuple(q.shape[1:4]), tuple(k.shape[1:4]), tuple(extent), cfg.q_tile, cfg.k_tile)
    # The table path does no window arithmetic (its tables hold positions), so never WIDE_IDX.
    return dict(**tiles, BLOCK_D=cfg.block_d, CAUSAL=causal, DOT=dot_mode(q.dtype, _tf32(q)),
                EVEN_D=_even_d(cfg, q.shape[-1]),
                WIDE_IDX=tab is None and needs_wide_index(q.shape[1:4], k.shape[1:4], extent),
                TABLES=tab is not None, GROUPED=k.shape[4] != q.shape[4], HAS_BIAS=bias is not None,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)


class LaunchPlan(NamedTuple):
    """Everything of one kernel's launch but its tensors, their strides and the scale.

    ``metas`` holds one read-only constexpr mapping per pass (two for a split dK/dV);
    ``sizes`` are the integer arguments after the strides; ``tab`` the window tables
    (``window_table``) or None. Immutable (the table is never written), so one plan
    is shared by every thread that asks for its key.
    """
    kernel: Any
    grid: Tuple[int]
    metas: Tuple[Mapping[str, Any], ...]
    sizes: Tuple[int, ...]
    tab: Optional[torch.Tensor]


class BackwardPlan(NamedTuple):
    """The three plans of one ``backward`` call, looked up with one key."""
    preprocess: LaunchPlan
    dkdv: LaunchPlan
    dq: LaunchPlan


def _frozen(meta: dict) -> Mapping[str, Any]:
    return MappingProxyType(meta)


def _build_query_tiles(kind: str, kernel, q, k, extent, causal, options, bias, arch, cfgs=None) -> LaunchPlan:
    """The forward's or dQ's plan: one program per query tile (their grids and arguments match)."""
    B, T, H, W, n_heads, D = q.shape
    cfg = (cfgs or _configs(q, k, extent, arch, causal, options, bias))[kind]
    tab = window_table(q, k, extent, options)
    grid = (B * n_heads * _n_tiles((T, H, W), cfg.q_tile),)
    sizes = (T, H, W, *k.shape[1:4], *extent, n_heads, *_head_args(q, k, bias), D)
    return LaunchPlan(kernel, grid, (_frozen(_meta(cfg, q, k, extent, causal, tab, bias)),), sizes, tab)


def _build_fwd(q, k, extent, causal, options, bias, arch, cfgs=None) -> LaunchPlan:
    return _build_query_tiles("fwd", fwd_kernel, q, k, extent, causal, options, bias, arch, cfgs)


def _build_dq(q, k, extent, causal, options, bias, arch, cfgs=None) -> LaunchPlan:
    return _build_query_tiles("dq", bwd_dq_kernel, q, k, extent, causal, options, bias, arch, cfgs)


def _build_preprocess(q, k, extent, causal, options, bias, arch) -> LaunchPlan:
    B, T, H, W, n_heads, D = q.shape
    cfg = _configs(q, q, (0, 0, 0), arch)["preprocess"]
    grid = (B * n_heads * -(-(T * H * W) // cfg.block_q),)
    meta = dict(BLOCK_N=cfg.block_q, BLOCK_D=cfg.block_d, EVEN_D=_even_d(cfg, D),
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return LaunchPlan(bwd_preprocess_kernel, grid, (_frozen(meta),), (T, H, W, n_heads, D), None)


def _build_dkdv(q, k, extent, causal, options, bias, arch, cfgs=None) -> LaunchPlan:
    B, T, H, W, n_heads, D = q.shape
    T2, H2, W2, kv_heads = k.shape[1:5]
    cfg = (cfgs or _configs(q, k, extent, arch, causal, options, bias))["dkdv"]
    tab = window_table(q, k, extent, options)
    grid = (B * kv_heads * _n_tiles((T2, H2, W2), cfg.k_tile),)
    sizes = (T, H, W, T2, H2, W2, *extent, kv_heads, *_head_args(q, k, bias), D)
    meta = _meta(cfg, q, k, extent, causal, tab, bias)
    passes = [(True, False), (False, True)] if cfg.split_dkdv else [(True, True)]
    return LaunchPlan(bwd_dkdv_kernel, grid, tuple(_frozen(dict(meta, DO_DK=a, DO_DV=b)) for a, b in passes),
                      sizes, tab)


def _build_bwd(q, k, extent, causal, options, bias, arch) -> BackwardPlan:
    cfgs = _configs(q, k, extent, arch, causal, options, bias)      # one planner call for dK/dV and dQ
    return BackwardPlan(_build_preprocess(q, k, extent, causal, options, bias, arch),
                        _build_dkdv(q, k, extent, causal, options, bias, arch, cfgs),
                        _build_dq(q, k, extent, causal, options, bias, arch, cfgs))


_BUILDERS = {"fwd": _build_fwd, "preprocess": _build_preprocess, "dkdv": _build_dkdv, "dq": _build_dq,
             "bwd": _build_bwd}


# 256 plans: a model needs two per kind of attention layer (a forward and a backward key per
# grid, extent and flag set), so a NÜWA stack of 3 to 6 kinds of layers needs about a dozen,
# and 256 leaves room for many models and shapes in one process. A forward plan with its key
# counts 3.4 KB of host memory, a backward one (three plans) 7.2 KB (``PlanCache.nbytes``,
# nuwa-image and gpu-large), so the cache holds at most about 1.8 MB plus the window tables.
PLAN_CACHE_SIZE = 256
PLANS = PlanCache(PLAN_CACHE_SIZE)


def plan_key(kind: str, q, k, extent, causal: bool = False, options: Optional[Options] = None,
             bias=None, arch: Optional[int] = None) -> tuple:
    """What a plan depends on: shapes (not strides: they are passed per call), dtype,
    device, extent, flags, bias shape, ``arch`` as given (None: the device's), the
    interpreter flag and PyTorch's TF32 setting (``configs.dot_mode``; read per call, since a
    caller may change it) and, by identity, the functions a plan is built from, so a replaced
    one (tests/conftest.py's ``small_tiles``, an sm_80 ``device_arch``, a corrupted
    ``relayout.packed`` in tests/test_bounds.py) gets its own plans, never a stale one."""
    return (kind, q.shape, k.shape, q.dtype, q.device, tuple(extent), causal, options,
            None if bias is None else bias.shape, arch, interpreter_enabled(), _tf32(q),
            configs.pick_configs, configs.device_arch, relayout.packed)


def launch_plan(kind: str, q, k, extent, causal: bool = False, options: Optional[Options] = None,
                bias=None, arch: Optional[int] = None):
    """The cached ``LaunchPlan`` of kernel ``kind`` ("fwd", "preprocess", "dkdv", "dq"), or the
    ``BackwardPlan`` of "bwd"; built on the first call per ``plan_key`` (which refuses
    grids past the int32 indices, ``check_index_range``)."""
    key = plan_key(kind, q, k, extent, causal, options, bias, arch)
    return PLANS.get(key, _BUILDERS[kind], q, k, tuple(extent), causal, options, bias, arch)


def _fwd_spec(p: LaunchPlan, q, k, v, out, lse, bias, scale):
    args = [q, k, v, out, lse, p.tab, bias, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            *p.sizes, scale * LOG2E]
    return p.kernel, p.grid, args, p.metas[0]


def _preprocess_spec(p: LaunchPlan, out, dout, delta):
    return p.kernel, p.grid, [out, dout, delta, *out.stride(), *dout.stride(), *p.sizes], p.metas[0]


def _dkdv_specs(p: LaunchPlan, q, k, v, dout, lse, delta, dk, dv, bias, scale):
    args = [q, k, v, dout, lse, delta, dk, dv, p.tab, bias,
            *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dk.stride(), *dv.stride(),
            *p.sizes, scale, scale * LOG2E]
    return [(p.kernel, p.grid, args, meta) for meta in p.metas]


def _dq_spec(p: LaunchPlan, q, k, v, dout, lse, delta, dq, bias, dbias, scale):
    args = [q, k, v, dout, lse, delta, dq, p.tab, bias, dbias,
            *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dq.stride(), *p.sizes, scale, scale * LOG2E]
    return p.kernel, p.grid, args, p.metas[0]


def _public(spec):
    """A spec with its meta as a fresh dict (callers may extend it; the plan's stays frozen)."""
    kernel, grid, args, meta = spec
    return kernel, grid, args, dict(meta)


def fwd_launch(q, k, v, out, lse, extent, causal, scale, arch=None, options=None, bias=None):
    """Forward: grid (B * heads * query tiles,); see forward.fwd_kernel. ``bias`` contiguous."""
    p = launch_plan("fwd", q, k, extent, causal, options, bias, arch)
    return _public(_fwd_spec(p, q, k, v, out, lse, bias, scale))


def preprocess_launch(q, out, dout, delta, arch=None):
    """delta = rowsum(dO * O): grid (B * heads * cdiv(T*H*W, rows),)."""
    return _public(_preprocess_spec(launch_plan("preprocess", q, q, (0, 0, 0), arch=arch), out, dout, delta))


def dkdv_launches(q, k, v, dout, lse, delta, dk, dv, extent, causal, scale, arch=None, options=None,
                  bias=None):
    """One launch (dK and dV together) or two (a dK pass, a dV pass; see split_dkdv);
    grid (B * kv heads * key tiles,): a program sums its kv head's query heads."""
    p = launch_plan("dkdv", q, k, extent, causal, options, bias, arch)
    return [_public(s) for s in _dkdv_specs(p, q, k, v, dout, lse, delta, dk, dv, bias, scale)]


def dq_launch(q, k, v, dout, lse, delta, dq, extent, causal, scale, arch=None, options=None, bias=None,
              dbias=None):
    """dQ: grid (B * heads * query tiles,), as the forward; with ``bias`` it adds d_bias into
    ``dbias`` (float32, the bias's shape, contiguous)."""
    p = launch_plan("dq", q, k, extent, causal, options, bias, arch)
    return _public(_dq_spec(p, q, k, v, dout, lse, delta, dq, bias, dbias, scale))


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
    with device_guard(q.device):
        bias = None if bias is None else bias.contiguous()
        p = launch_plan("fwd", q, k, extent, causal, options, bias)    # refuses huge grids before allocating
        if out is None:
            out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        if lse is None:
            lse = torch.empty(stats_shape(q), dtype=torch.float32, device=q.device)
        _run(_fwd_spec(p, q, k, v, out, lse, bias, scale))
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
    with device_guard(q.device):
        bias = None if bias is None else bias.contiguous()
        p = launch_plan("bwd", q, k, extent, causal, options, bias)    # refuses huge grids before allocating
        dq = torch.empty(q.shape, dtype=q.dtype, device=q.device) if dq is None else dq
        dk = torch.empty(k.shape, dtype=k.dtype, device=k.device) if dk is None else dk
        dv = torch.empty(v.shape, dtype=v.dtype, device=v.device) if dv is None else dv
        if delta is None:
            delta = torch.empty(stats_shape(q), dtype=torch.float32, device=q.device)
        _run(_preprocess_spec(p.preprocess, out, dout, delta))
        if dlse is not None:
            delta.sub_(dlse)
        if bias is not None and dbias is None:
            dbias = torch.zeros(bias.shape, dtype=torch.float32, device=q.device)
        for spec in _dkdv_specs(p.dkdv, q, k, v, dout, lse, delta, dk, dv, bias, scale):
            _run(spec)
        _run(_dq_spec(p.dq, q, k, v, dout, lse, delta, dq, bias, dbias, scale))
    return dq, dk, dv
