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
from nuwa3dna.kernels.triton import plan, relayout
from nuwa3dna.kernels.triton.tables import BIAS_ENTRIES, LAUNCH_TABLES, WINDOW_LAUNCH_TABLES
from nuwa3dna.kernels.windows import Options

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


@functools.lru_cache(maxsize=256)
def plan_tiles(kind: str, q_grid, kv_grid, extent, causal: bool, block_outer: int, block_inner: int,
               options: Options = Options()):
    """Tile shapes (q_tile, k_tile) of kernel ``kind`` minimising the computed score pairs.

    The count is exact (``plan.computed_pairs``: the kernels' own loop bounds,
    padding and causal skips included). The walked tile is one frame deep, so its
    frame test is per row: fwd/dQ walk 1 x KH x KW key tiles from BT x BH x BW
    query tiles (``block_outer`` queries, ``block_inner`` keys); dK/dV walk
    1 x BH x BW query tiles from KT x KH x KW key tiles (``block_outer`` keys).
    Ties go to wider rows (contiguous rows of the grid).

    Score pairs per (batch, head) at 64 x 64 (fwd) / 64 x 32 (dK/dV) rows, useful
    = visible / computed: nuwa-video forward 1x8x8 / 1x8x8, 3.28M pairs, 16.2%
    useful (the box model's 16x2x2: 4.96M, 10.7%: every tile spanned every frame,
    so causal skipping removed almost nothing); nuwa-image forward 1x8x8 / 1x8x8,
    11.4% (1x2x32: 6.9%); gpu-large forward 1x8x8 / 1x4x16, 19.4% (2x2x16 / 1x8x8:
    18.2%). Text grids (1x1xL) get 1x1x64 tiles.

    With v2 window ``options`` the count is the table path's (``relayout``: tiles of
    re-laid queries, key boxes from the window tables).
    """
    q_grid, kv_grid, extent = tuple(q_grid), tuple(kv_grid), tuple(extent)
    tables = None if options.plain else relayout.window_tables(q_grid, kv_grid, extent, options)
    outer_grid, inner_grid = (kv_grid, q_grid) if kind == "dkdv" else (q_grid, kv_grid)
    best = None
    for outer in _shapes(block_outer, outer_grid):
        for inner in _shapes(block_inner, inner_grid, max_t=1):
            q_tile, k_tile = (inner, outer) if kind == "dkdv" else (outer, inner)
            w = plan.computed_pairs(kind, q_grid, kv_grid, extent, causal, q_tile, k_tile, tables)
            key = (w, -outer[2], -inner[2])     # ties: wider rows (contiguous rows of the grid)
            if best is None or key < best[0]:
                best = (key, q_tile, k_tile)
    return best[1], best[2]


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
                 arch: int = 90, causal: bool = False, options: Optional[Options] = None,
                 bias: bool = False, tf32: bool = False) -> Dict[str, LaunchConfig]:
    """Launch configs of the four kernels on ``arch`` (a capability such as 89, or a family);
    the report compiles exactly these.

    Rows per program, rows walked, warps and stages come from the family's
    LAUNCH_TABLES entry by dtype class and padded head dim (e.g. 64 x 64 at D <= 64
    in 16-bit on sm_90); the (t, h, w) shapes of those tiles from plan_tiles on the
    actual grids, causal flag (the causal skips change which shapes are best) and v2
    window ``options`` (``causal`` is raster order; per-axis causality is in ``options``).

    ``bias`` (a relative position bias): smaller tiles (``_bias_rows``), since the gathered
    bias, its int32 index and 64-bit addresses per score, and dQ's atomic adds of dS, cost
    ~100 registers per thread at 64 x 64: the table's tiles spilled (kernels/report.py: e.g.
    dQ bf16 head dim 64 on sm_90, 340 bytes; the forward at head dim 256 on sm_80, 100 bytes).
    ``tf32``: float32 on TF32 tensor cores (``float32_tf32``), its own table entries.
    """
    q_grid, kv_grid, extent = tuple(q_grid), tuple(kv_grid), tuple(extent)
    block_d = block_d_for(D)
    causal, options = bool(causal), options or Options()
    tables = LAUNCH_TABLES if options.plain else WINDOW_LAUNCH_TABLES     # the kernels' table path
    table = tables[arch_family(arch)][("tf32" if tf32 else "fp32") if dtype == torch.float32 else "16bit"]
    out = {}
    for kind in ("fwd", "dq"):
        e = _bias_rows(table[kind][block_d], kind, block_d, dtype, arch) if bias else table[kind][block_d]
        q_tile, k_tile = plan_tiles(kind, q_grid, kv_grid, extent, causal, e.outer, e.inner, options)
        out[kind] = LaunchConfig(kind, q_tile, k_tile, block_d, e.num_warps, e.num_stages)
    e = _bias_rows(table["dkdv"][block_d], "dkdv", block_d, dtype, arch) if bias else table["dkdv"][block_d]
    q_tile, k_tile = plan_tiles("dkdv", q_grid, kv_grid, extent, causal, e.outer, e.inner, options)
    out["dkdv"] = LaunchConfig("dkdv", q_tile, k_tile, block_d, e.num_warps, e.num_stages, e.split_dkdv)
    # delta is a streaming row sum: 2048 / block_d rows keep 16 values per thread
    # and tensor (64 rows at D=64 float32 spilled on sm_90).
    rows = min(128, max(16, 2048 // block_d))
    out["preprocess"] = LaunchConfig("preprocess", (1, 1, rows), (1, 1, 1), block_d, 4, 1)
    return out


_BIAS_KEEP_ROWS = frozenset({(90, "fwd"), (90, "dq"), (90, "dkdv"), (100, "dkdv")})


def _bias_rows(entry, kind: str, block_d: int, dtype: torch.dtype, arch: int):
    """The launch-table entry for a kernel with a relative position bias: the walked tile
    halved (>= 16 rows: tl.dot), and the program's tile halved too, except for the 16-bit
    (family, kernel) pairs of ``_BIAS_KEEP_ROWS`` below head dim 256 (dK/dV: 128). sm_90's
    wgmma wants 64 rows; sm_100's dK/dV at 32 key rows spilled 8 B at head dim 64 (168
    registers) where 64 did not, its dQ at 64 rows 80 B. ``tables.BIAS_ENTRIES`` replaces
    the halved entry where it spilled. Checked by kernels/report.py's bias rows."""
    fixed = BIAS_ENTRIES.get((arch_family(arch), kind, "fp32" if dtype == torch.float32 else "16bit", block_d))
    if fixed is not None:
        return fixed
    outer = entry.outer
    keep = (arch_family(arch), kind) in _BIAS_KEEP_ROWS and dtype != torch.float32 \
        and block_d < (128 if kind == "dkdv" else 256)
    if not keep:
        outer = max(16, outer // 2)
    return entry._replace(outer=outer, inner=max(16, entry.inner // 2))


def float32_tf32() -> bool:
    """Whether PyTorch's own float32 matmuls on CUDA may use TF32 now: the setting the
    kernels follow (``torch.backends.cuda.matmul.fp32_precision``, which also reflects
    ``torch.backends.fp32_precision``, ``allow_tf32`` and ``set_float32_matmul_precision``
    "high"/"medium"). Read at every launch: it is process-wide state a caller may change."""
    precision = getattr(torch.backends.cuda.matmul, "fp32_precision", None)
    return precision == "tf32" if precision is not None else bool(torch.backends.cuda.matmul.allow_tf32)


def dot_mode(dtype: torch.dtype, tf32: bool = False) -> str:
    """The kernels' DOT (``jit.dot``): "upcast" for bf16 in the interpreter (its bf16 tl.dot
    returns garbage); for float32 "tf32" where ``tf32`` (``float32_tf32``: TF32 tensor cores,
    "tf32-interp" under the interpreter, which emulates them), else "ieee" (exact FMAs);
    "ieee" for 16-bit inputs too, where it plays no part."""
    if dtype == torch.bfloat16 and interpreter_enabled():
        return "upcast"
    if dtype == torch.float32 and tf32:
        return "tf32-interp" if interpreter_enabled() else "tf32"
    return "ieee"
