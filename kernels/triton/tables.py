"""Per-architecture launch tables of the 3DNA kernels, as read-only data.

``LAUNCH_TABLES[arch][dtype class][kernel][padded head dim]`` is an ``Entry``:
rows a program owns ("outer": queries; keys for dK/dV), rows of the tile it
walks ("inner"), num_warps, num_stages and, for dK/dV, whether dK and dV are
computed in two passes. ``configs.pick_configs`` turns an entry into tile
shapes; ``python -m nuwa3dna.kernels.report`` compiles every entry and checks
it for spills and shared memory.
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


# sm_90: the 16-bit entries keep 64 accumulator rows per warpgroup so the dots
# become wgmma. 8 warps on a 64-row tile make Triton 3.9 pick different warp
# layouts for chained dots on sm_90 and shuttle accumulators between them
# (spills), so sm_90 keeps 4 warps and shrinks the walked tile at large head
# dims instead.
_T16_SM90 = {
    "fwd": {16: (64, 64, 4, 3), 32: (64, 64, 4, 3), 64: (64, 64, 4, 3), 128: (64, 32, 4, 3),
            256: (64, 16, 4, 2)},
    "dq": {16: (64, 64, 4, 3), 32: (64, 64, 4, 3), 64: (64, 64, 4, 3), 128: (64, 32, 4, 2),
           256: (64, 16, 4, 2)},
    # Head dim 256: dK and dV accumulators (2 x 64x256 fp32) exceed one warpgroup's
    # registers, so two passes of 32 key rows (mma.sync, no wgmma at M = 32).
    "dkdv": {16: (64, 32, 4, 3), 32: (64, 32, 4, 3), 64: (64, 32, 4, 3), 128: (64, 16, 4, 2),
             256: (32, 16, 4, 2, True)},
}
_T16_SM80 = {
    "fwd": {16: (64, 64, 4, 3), 32: (64, 64, 4, 3), 64: (64, 64, 4, 3), 128: (64, 16, 4, 3),
            256: (64, 32, 8, 1)},
    "dq": {16: (64, 64, 4, 3), 32: (64, 64, 4, 3), 64: (64, 64, 4, 3), 128: (64, 32, 4, 3),
           256: (64, 32, 8, 2)},
    "dkdv": {16: (64, 32, 8, 3), 32: (64, 32, 8, 3), 64: (64, 32, 8, 3), 128: (32, 16, 4, 2),
             256: (64, 16, 8, 1, True)},
}
# float32 runs exact FMA dots (jit.dot): small tiles, no wgmma; not a speed target.
_T32_SM90 = {
    "fwd": {16: (32, 32, 4, 2), 32: (64, 32, 4, 2), 64: (32, 32, 4, 2), 128: (16, 16, 4, 1),
            256: (16, 16, 4, 1)},
    "dq": {16: (64, 32, 4, 2), 32: (64, 32, 4, 2), 64: (32, 32, 4, 2), 128: (32, 32, 4, 2),
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

LAUNCH_TABLES: Mapping[int, Mapping[str, Mapping[str, Mapping[int, Entry]]]] = _freeze({
    90: {"16bit": _T16_SM90, "fp32": _T32_SM90},
    80: {"16bit": _T16_SM80, "fp32": _T32_SM80},
})
del _T16_SM90, _T16_SM80, _T32_SM90, _T32_SM80
