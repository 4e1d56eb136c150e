"""Per-architecture launch tables of the 3DNA kernels, as read-only data.

``LAUNCH_TABLES[family][dtype class][kernel][padded head dim]`` is an ``Entry``
(``WINDOW_LAUNCH_TABLES``, the same for the kernels' table path of the v2 window options):
rows a program owns ("outer": queries; keys for dK/dV), rows of the tile it
walks ("inner"), num_warps, num_stages and, for dK/dV, whether dK and dV are
computed in two passes. ``configs.pick_configs`` turns an entry into tile
shapes; ``python -m nuwa3dna.kernels.report`` compiles every entry and checks
it for spills and against the family's shared memory per block (``SMEM_PER_BLOCK``).

Families (``configs.arch_family`` maps a compute capability to one): 80
(A100, and sm_87), 86 (sm_86, sm_89: 99 KiB of shared memory per block), 90
(Hopper: wgmma), 100 (datacenter Blackwell, sm_100/103: tcgen05), 120
(consumer Blackwell, sm_120/121: mma.sync, 99 KiB).
"""
from __future__ import annotations

from types import MappingProxyType
from typing import Mapping, NamedTuple


class Entry(NamedTuple):
    outer: int          # rows per program (queries; keys for dK/dV)
    inner: int          # rows of the walked tile (keys; queries for dK/dV)
    num_warps: int
    num_stages: int
    split_dkdv: bool = False    # dK/dV only: a dK pass and a dV pass


def _freeze(table: dict) -> Mapping:
    """Nested dicts -> nested read-only mappings with ``Entry`` leaves."""
    return MappingProxyType({key: _freeze(val) if isinstance(val, dict) else Entry(*val)
                             for key, val in table.items()})


def _but(table: dict, **changes: dict) -> dict:
    """A copy of a {kernel: {head dim: entry}} table with some entries replaced."""
    return {kernel: {**dims, **changes.get(kernel, {})} for kernel, dims in table.items()}


# Largest dynamic shared memory one block may use, per family (bytes).
SMEM_PER_BLOCK: Mapping[int, int] = MappingProxyType(
    {80: 166912, 86: 101376, 90: 232448, 100: 232448, 120: 101376})


# sm_90: the 16-bit entries keep 64 accumulator rows per warpgroup so the dots
# become wgmma. 8 warps on a 64-row tile make Triton 3.9 pick different warp
# layouts for chained dots on sm_90 and shuttle accumulators between them
# (spills), so sm_90 keeps 4 warps and shrinks the walked tile at large head
# dims instead.
_T16_SM90 = {
    "fwd": {16: (64, 64, 4, 3), 32: (64, 64, 4, 3), 64: (64, 64, 4, 3), 128: (64, 32, 4, 3),
            256: (64, 16, 4, 2)},
    # dQ at 256: 32 rows in 1 stage (mma.sync, as the table path): after the forward/dQ loop
    # rewrite (issue 12 item 5) 64 rows spilled 8 B in bf16 at 2 stages, 80-112 B at 1, and 32
    # rows 16 B in fp16 at 2.
    "dq": {16: (64, 64, 4, 3), 32: (64, 64, 4, 3), 64: (64, 64, 4, 3), 128: (64, 32, 4, 2),
           256: (32, 16, 4, 1)},
    # Head dim 256: dK and dV accumulators (2 x 64x256 fp32) exceed one warpgroup's
    # registers, so two passes of 32 key rows (mma.sync, no wgmma at M = 32).
    "dkdv": {16: (64, 32, 4, 3), 32: (64, 32, 4, 3), 64: (64, 32, 4, 3), 128: (64, 16, 4, 2),
             256: (32, 16, 4, 2, True)},
}
# sm_80: the causal bf16 forward at head dim 64 sat at 255 registers with 64 x 64
# tiles and spilled 16 B after an ordering change; 64 x 32 needs ~200.
_T16_SM80 = {
    "fwd": {16: (64, 64, 4, 3), 32: (64, 64, 4, 3), 64: (64, 32, 4, 3), 128: (64, 16, 4, 3),
            256: (64, 32, 8, 1)},
    # dQ at 64: 64 x 64 spilled (255 registers, 16-40 B) with the exact planner's 1x8x8 /
    # 1x8x8 tiles on nuwa-video; 64 x 32 needs 168.
    "dq": {16: (64, 64, 4, 3), 32: (64, 64, 4, 3), 64: (64, 32, 4, 3), 128: (64, 32, 4, 3),
           256: (64, 32, 8, 2)},
    "dkdv": {16: (64, 32, 8, 3), 32: (64, 32, 8, 3), 64: (64, 32, 8, 3), 128: (32, 16, 4, 2),
             256: (64, 16, 8, 1, True)},
}
# float32 runs exact FMA dots (jit.dot): small tiles, no wgmma; not a speed target.
_T32_SM90 = {
    "fwd": {16: (32, 32, 4, 2), 32: (64, 32, 4, 2), 64: (32, 32, 4, 2), 128: (16, 16, 4, 1),
            256: (16, 16, 4, 1)},
    # dQ at 128: 32 x 32 spilled 56 B with the exact planner's 2x2x8 / 1x8x4 tiles (gpu-large).
    "dq": {16: (64, 32, 4, 2), 32: (64, 32, 4, 2), 64: (32, 32, 4, 2), 128: (32, 16, 4, 2),
           256: (16, 16, 4, 1)},
    "dkdv": {16: (32, 16, 4, 2), 32: (32, 16, 4, 2), 64: (32, 16, 4, 2), 128: (32, 16, 4, 2),
             256: (16, 16, 4, 1, True)},
}
_T32_SM80 = {
    "fwd": {16: (64, 32, 4, 2), 32: (64, 32, 4, 2), 64: (64, 16, 4, 2), 128: (32, 16, 4, 1),
            256: (16, 16, 8, 1)},
    "dq": {16: (64, 32, 4, 2), 32: (64, 32, 4, 2), 64: (64, 16, 4, 2), 128: (32, 16, 4, 1),
           256: (16, 16, 8, 1)},
    "dkdv": {16: (32, 16, 4, 2), 32: (64, 16, 4, 2), 64: (32, 16, 4, 2), 128: (16, 16, 8, 1, True),
             256: (16, 16, 8, 1, True)},
}

# sm_86 / sm_89 (99 KiB): the sm_80 table but where it does not fit or spills.
# Head dim 256 16-bit dQ at 64 x 32 needs 102,400 B over 2 stages: 1 stage. Triton
# vectorises differently from sm_80 here (its SLP vectoriser is off only for
# sm_80), so two float32 entries spilled: 8 warps and 16 owned rows for the forward at 128
# (32 rows: 20 B after the forward loop's rewrite), 4 warps for the dK/dV passes at 256.
_T16_SM86 = _but(_T16_SM80, dq={256: (64, 32, 8, 1)})
_T32_SM86 = _but(_T32_SM80, fwd={128: (16, 16, 8, 1)}, dkdv={256: (16, 16, 4, 1, True)})
# sm_100 (tcgen05, 227 KiB): the sm_90 tiles, but the 16-bit forward at 64 in 2 stages (3
# spilled 8 B with the exact planner's 1x8x8 / 1x8x8 tiles on nuwa-video), and below.
_T16_SM100 = _but(_T16_SM90, fwd={64: (64, 64, 4, 2)}, dq={256: (64, 16, 4, 2)})
# dQ at 64, 32 x 32: 16 B spilled on nuwa-video; at 128, 2 stages: 24 B on gpu-large; the
# forward at 64 in 2 stages: 8 B on the 1x1x65536 grid.
_T32_SM100 = _but(_T32_SM90, fwd={64: (32, 32, 4, 1)}, dq={64: (32, 16, 4, 2), 128: (32, 16, 4, 1)})
# sm_120 (mma.sync, 99 KiB): the sm_86 table; its Blackwell pipeline spilled the
# 16-bit dQ at head dim 64 with 64 x 64 tiles (148 B) and the float32 forward at
# 64 with 4 warps (52 B).
_T16_SM120 = _but(_T16_SM86, dq={64: (64, 32, 4, 3)})
_T32_SM120 = _but(_T32_SM86, fwd={16: (64, 16, 4, 2), 64: (64, 16, 8, 2)})   # 16: 8 B spilled at 64 x 32

# The table path (v2 window options, ``relayout``): its forward and dQ loops also load
# each key's query ranges and grid positions, and its dK/dV loop each query's grid
# position, which with the plain entries cost 30-70 more registers than the plain path
# and spilled in 36 of the 150 (family, dtype class, kernel, head dim) entries (the AOT
# report on cpu-mid-dilation and nuwa-video-stride). There the first spill-free of, in
# order: one stage fewer, one stage, half the walked rows, the other warp count, half the
# owned rows replaces the entry (ptxas caps some of these kernels' registers below 255,
# e.g. 168 at 4 warps on sm_86, so the winner is not always the smallest tile). The forward
# and dQ loop rewrite of issue 12 item 5 moved registers again: 11 more entries took the same
# rule (sm_86 fp32 forward at 64: half the owned rows and 4 warps, the first that compiled clean).
_W16_SM80 = _but(_T16_SM80, fwd={16: (64, 64, 4, 1), 64: (64, 32, 4, 1), 256: (64, 16, 8, 1)},
                 dq={32: (64, 64, 4, 2), 64: (64, 32, 4, 1), 128: (64, 32, 4, 1), 256: (64, 32, 8, 1)},
                 dkdv={256: (32, 16, 8, 1, True)})
_W32_SM80 = _but(_T32_SM80, fwd={16: (64, 16, 4, 2), 32: (64, 32, 4, 1), 128: (32, 16, 8, 1)},
                 dq={32: (64, 32, 4, 1), 128: (32, 16, 8, 1)})
_W16_SM86 = _but(_T16_SM86, fwd={16: (64, 64, 4, 1)}, dq={16: (64, 32, 4, 1)})
_W32_SM86 = _but(_T32_SM86, fwd={16: (64, 32, 4, 1), 64: (32, 16, 4, 1)},
                 dq={32: (64, 32, 4, 1), 128: (32, 16, 8, 1), 256: (16, 16, 8, 2)},
                 dkdv={32: (64, 16, 8, 1), 128: (16, 16, 4, 1, True)})
# sm_90 16-bit at head dim 256: 32 owned rows (mma.sync, not wgmma); 64 spilled at any stages and warps.
_W16_SM90 = _but(_T16_SM90, fwd={256: (32, 16, 4, 1)}, dq={256: (32, 16, 8, 1)})
_W32_SM90 = _but(_T32_SM90, fwd={128: (16, 16, 8, 1)}, dq={32: (64, 32, 4, 1), 256: (16, 16, 8, 1)})
_W16_SM100 = _but(_T16_SM100, fwd={256: (64, 16, 4, 1)}, dkdv={64: (64, 32, 4, 2)})
# (The forward at 64 keeps 2 stages here: _T32_SM100's 1 stage was for the plain path's long axis.)
_W32_SM100 = _but(_T32_SM100, fwd={64: (32, 32, 4, 2), 128: (16, 16, 8, 1), 256: (16, 16, 8, 1)},
                  dq={32: (64, 32, 4, 1), 128: (32, 16, 8, 1), 256: (16, 16, 8, 1)})
_W16_SM120 = _but(_T16_SM120, fwd={16: (64, 64, 4, 1), 64: (64, 32, 4, 1)}, dq={64: (64, 32, 4, 1)},
                  dkdv={16: (64, 16, 8, 3), 64: (64, 32, 8, 2)})
_W32_SM120 = _but(_T32_SM120, fwd={128: (16, 16, 8, 1)},
                  dq={32: (64, 32, 4, 1), 128: (32, 16, 8, 1), 256: (16, 16, 8, 2)}, dkdv={32: (64, 16, 4, 1)})

# float32 on TF32 tensor cores (``configs.float32_tf32``): the float32 tiles (mma.sync, 16-32
# rows), but where the TF32 fragments spilled (the AOT report's tf32 rows: 7 of 308, 8-36 B).
_TF32 = {80: _but(_T32_SM80, fwd={128: (32, 16, 8, 1)},
                 dkdv={128: (16, 16, 4, 1, True), 256: (16, 16, 4, 1, True)}),
         86: _but(_T32_SM86, dkdv={256: (16, 16, 8, 1, True)}),
         90: _T32_SM90,
         100: _but(_T32_SM100, fwd={16: (32, 16, 4, 2)}),
         120: _T32_SM120}
_WTF32 = {80: _but(_W32_SM80, fwd={64: (32, 16, 4, 2)}), 86: _W32_SM86, 90: _W32_SM90, 100: _W32_SM100,
          120: _W32_SM120}

# With a relative position bias the entries are halved (``configs._bias_rows``); where the
# halved entry spilled at head dim 64 (the AOT report's kv2-bias rows, both window paths),
# the first spill-free of the rule above, per (family, kernel, dtype class, padded head dim).
BIAS_ENTRIES: Mapping[tuple, Entry] = MappingProxyType({
    (80, "fwd", "fp32", 64): Entry(32, 16, 4, 1),       # 2 stages: 16 B
    (86, "dq", "fp32", 64): Entry(32, 16, 4, 1),        # 2 stages: 44 B
    (120, "fwd", "16bit", 64): Entry(32, 16, 8, 1),     # 4 warps: 24 B
})

LAUNCH_TABLES: Mapping[int, Mapping[str, Mapping[str, Mapping[int, Entry]]]] = _freeze({
    80: {"16bit": _T16_SM80, "fp32": _T32_SM80, "tf32": _TF32[80]},
    86: {"16bit": _T16_SM86, "fp32": _T32_SM86, "tf32": _TF32[86]},
    90: {"16bit": _T16_SM90, "fp32": _T32_SM90, "tf32": _TF32[90]},
    100: {"16bit": _T16_SM100, "fp32": _T32_SM100, "tf32": _TF32[100]},
    120: {"16bit": _T16_SM120, "fp32": _T32_SM120, "tf32": _TF32[120]},
})
# The same families for the table path (``configs.pick_configs`` with v2 window options).
WINDOW_LAUNCH_TABLES: Mapping[int, Mapping[str, Mapping[str, Mapping[int, Entry]]]] = _freeze({
    80: {"16bit": _W16_SM80, "fp32": _W32_SM80, "tf32": _WTF32[80]},
    86: {"16bit": _W16_SM86, "fp32": _W32_SM86, "tf32": _WTF32[86]},
    90: {"16bit": _W16_SM90, "fp32": _W32_SM90, "tf32": _WTF32[90]},
    100: {"16bit": _W16_SM100, "fp32": _W32_SM100, "tf32": _WTF32[100]},
    120: {"16bit": _W16_SM120, "fp32": _W32_SM120, "tf32": _WTF32[120]},
})
