"""Launch configurations: the tile planner, the architecture of a device, and
``pick_configs``, the one function that both the launchers and the AOT report
(kernels/report.py) ask. Pure Python (no Triton import).
"""
from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

from nuwa3dna.kernels.env import interpreter_enabled
from nuwa3dna.kernels.triton.tables import LAUNCH_TABLES

Tile = Tuple[int, int, int]


@dataclass(frozen=True)
class LaunchConfig:
    """Everything compile-time about one kernel launch (shared with kernels/report.py).

    ``q_tile`` / ``k_tile`` are (t, h, w) tile shapes; for the dK/dV kernel
    ``k_tile`` is the program's key tile and ``q_tile`` the query tile walked inside.
    """
    kernel: str
    q_tile: Tile
    k_tile: Tile
    block_d: int
    num_warps: int
    num_stages: int
    split_dkdv: bool = False    # dK/dV kernel only: a dK pass and a dV pass (head dim 256)

    @property
    def block_q(self) -> int:
        return math.prod(self.q_tile)

    @property
    def block_k(self) -> int:
        return math.prod(self.k_tile)


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def block_d_for(D: int) -> int:
    """Head dim padded to a power of two >= 16 (tl.dot needs K >= 16)."""
    return max(16, _next_power_of_2(D))


# ----------------------------------------------------------------------------- tile planning


def _shapes(n: int, grid: Tile, max_t: Optional[int] = None):
    """(t, h, w) power-of-two shapes with t*h*w == n and no factor beyond the grid's
    next power of two, except that w takes the excess when the grid is smaller than n."""
    caps = [_next_power_of_2(g) for g in grid]
    if max_t is not None:
        caps[0] = min(caps[0], max_t)
    out = []
    for i, j in itertools.product(range(n.bit_length()), repeat=2):
        bt, bh = 1 << i, 1 << j
        if n % (bt * bh) or bt > caps[0] or bh > caps[1]:
            continue
        bw = n // (bt * bh)
        if bw <= caps[2] or (bt == caps[0] and bh == caps[1]):
            out.append((bt, bh, bw))
    return out


def _span(block: int, n_from: int, n_to: int, e: int) -> int:
    """Length of the union of windows (radius e in a grid of n_to) of ``block`` consecutive
    indices of a grid of n_from: the centres of b neighbours span <= ceil((b-1)*n_to/n_from)+1."""
    return min(n_to, -(-(block - 1) * n_to // n_from) + 1 + 2 * e)


def _work(outer: Tile, inner: Tile, outer_grid, inner_grid, extent_like) -> int:
    """Rows x columns computed: (number of outer tiles) x (inner rows walked per outer tile)."""
    n_outer = math.prod(-(-g // b) for g, b in zip(outer_grid, outer))
    per_tile = 1
    for b, k, g_out, g_in, e in zip(outer, inner, outer_grid, inner_grid, extent_like):
        box = _span(b, g_out, g_in, e)
        per_tile *= -(-box // k) * k
    return n_outer * math.prod(outer) * per_tile


@functools.lru_cache(maxsize=256)
def plan_tiles(outer_grid, inner_grid, extent_like, block_outer: int, block_inner: int):
    """Tile shapes (outer, inner) minimising the computed (row, column) pairs.

    The walked (inner) tile is one frame deep, so its frame test is per row.
    Keys computed per query, 64 x 64 tiles, from ``_work``: gpu-large (16x48x48,
    extent (1,3,3), 147 visible): 1x8x8 or 2x2x16 queries with 1x4x16 / 1x8x8
    keys 768 (17% visible), 1x4x16 960, 1x1x64 1536 (the planner takes 2x2x16,
    the wider tie). nuwa-video (10x21x21, extent 3, all 10 frames in reach):
    16x2x2 queries 1124 keys per query, 2x4x8 2006, 1x8x8 2341 (before causal
    skipping, which the model ignores). Text grids (1x1xL) get 1x1x64 tiles.
    """
    best = None
    for outer in _shapes(block_outer, outer_grid):
        for inner in _shapes(block_inner, inner_grid, max_t=1):
            w = _work(outer, inner, outer_grid, inner_grid, extent_like)
            key = (w, -outer[2], -inner[2])     # ties: wider rows (contiguous rows of the grid)
            if best is None or key < best[0]:
                best = (key, outer, inner)
    return best[1], best[2]


def _inverse_extent(q_grid, kv_grid, extent):
    """Per axis, a radius in query units covering the queries that reach a key (for planning)."""
    return tuple(-(-(e * q + q) // kv) for e, q, kv in zip(extent, q_grid, kv_grid))


# ----------------------------------------------------------------------------- architectures


def arch_family(arch: int) -> int:
    """Launch-table family (tables.py) of a compute capability written major*10 + minor.

    sm_87 (Orin) has sm_80's 164 KiB of shared memory per block; sm_86 and sm_89
    have 99 KiB; sm_100/103 are datacenter Blackwell (tcgen05); sm_120/121 consumer
    Blackwell (99 KiB, mma.sync). The report checks sm_80, 86, 89, 90, 100 and 120;
    other capabilities take their neighbours' table unchecked (below sm_80, which
    has no bf16, the sm_80 one).
    """
    if arch >= 120:
        return 120
    if arch >= 100:
        return 100
    if arch >= 90:
        return 90
    return 86 if arch in (86, 89) else 80


def device_arch(device) -> int:
    """Launch-table family of a device (``arch_family`` of its capability); 90 off-GPU
    (interpreter, report), where only the tile shapes matter."""
    if getattr(device, "type", None) == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return arch_family(10 * major + minor)
    return 90


def pick_configs(q_grid, kv_grid, extent, D: int, dtype: torch.dtype,
                 arch: int = 90) -> Dict[str, LaunchConfig]:
    """Launch configs of the four kernels on ``arch`` (a capability such as 89, or a family);
    the report compiles exactly these.

    Rows per program, rows walked, warps and stages come from the family's
    LAUNCH_TABLES entry by dtype class and padded head dim (e.g. 64 x 64 at D <= 64
    in 16-bit on sm_90); the (t, h, w) shapes of those tiles from plan_tiles on the
    actual grids.
    """
    q_grid, kv_grid, extent = tuple(q_grid), tuple(kv_grid), tuple(extent)
    block_d = block_d_for(D)
    table = LAUNCH_TABLES[arch_family(arch)]["fp32" if dtype == torch.float32 else "16bit"]
    out = {}
    for kind in ("fwd", "dq"):
        e = table[kind][block_d]
        q_tile, k_tile = plan_tiles(q_grid, kv_grid, extent, e.outer, e.inner)
        out[kind] = LaunchConfig(kind, q_tile, k_tile, block_d, e.num_warps, e.num_stages)
    e = table["dkdv"][block_d]
    k_tile, q_tile = plan_tiles(kv_grid, q_grid, _inverse_extent(q_grid, kv_grid, extent), e.outer, e.inner)
    out["dkdv"] = LaunchConfig("dkdv", q_tile, k_tile, block_d, e.num_warps, e.num_stages, e.split_dkdv)
    # delta is a streaming row sum: 2048 / block_d rows keep 16 values per thread
    # and tensor (64 rows at D=64 float32 spilled on sm_90).
    rows = min(128, max(16, 2048 // block_d))
    out["preprocess"] = LaunchConfig("preprocess", (1, 1, rows), (1, 1, 1), block_d, 4, 1)
    return out


def upcast_dot(dtype: torch.dtype) -> bool:
    """True only in the interpreter for bf16, whose tl.dot there returns garbage."""
    return dtype == torch.bfloat16 and interpreter_enabled()
