"""Resident CTAs per SM of a compiled kernel, from its registers, shared memory and warps.

Used by the static performance report (kernels/perf.py, ``report --perf --compile``).
Pure Python: the per-architecture limits are data (``SM_LIMITS``), the rule is
NVIDIA's occupancy calculator's (cuda_occupancy.h, ``cudaOccMaxBlocksPerSMRegsLimit``
and ``cudaOccMaxBlocksPerSMSmemLimit``):

* registers: each warp gets regs/thread x 32 rounded up to 256 (the allocation unit),
  from one of 4 sub-partitions of 16,384 (65,536 per SM); warps per SM = 4 x
  floor(16384 / registers per warp), CTAs = floor(that / warps per CTA). More than 255
  per thread cannot launch;
* shared memory: each CTA takes its bytes plus the 1 KiB the driver reserves per block
  (compute capability >= 8.0), rounded up to 128 B, out of the SM's largest carveout
  (the driver picks the carveout; Triton opts in to the per-block maximum). More than
  the per-block maximum cannot launch (0 CTAs);
* warps: floor(max resident warps per SM / warps per CTA);
* blocks: the per-SM maximum of resident blocks.

Not modelled: the L1/shared carveout a driver may pick below the maximum, and the
Hopper/Blackwell thread block clusters (Triton launches none here).
"""
from __future__ import annotations

from types import MappingProxyType
from typing import Mapping, NamedTuple, Tuple

KIB = 1024
REGS_PER_SM = 65536
SUB_PARTITIONS = 4
REG_UNIT = 256              # registers allocated per warp in units of 256
MAX_REGS_PER_THREAD = 255
SMEM_UNIT = 128             # shared memory allocation granularity (bytes), cc >= 8.0
SMEM_RESERVED = KIB         # shared memory the driver reserves per block, cc >= 8.0


class SMLimits(NamedTuple):
    smem_per_sm: int        # bytes: the largest shared memory carveout of an SM
    smem_per_block: int     # bytes: the most one block may opt in to
    max_warps: int          # resident warps per SM
    max_blocks: int         # resident blocks per SM


# Per compute capability (the report's architectures, kernels/report.py ARCHS). Source:
# NVIDIA, CUDA C++ Programming Guide, "Technical Specifications per Compute Capability"
# (docs.nvidia.com/cuda/cuda-programming-guide/05-appendices/compute-capabilities.html):
# maximum shared memory per SM 164 KB (8.0), 100 KB (8.6, 8.9, 12.0), 228 KB (9.0, 10.0),
# per block 1 KB less (= tables.SMEM_PER_BLOCK); resident warps per SM 64 (8.0, 9.0, 10.0)
# and 48 (8.6, 8.9, 12.0); resident blocks per SM 32 (8.0, 9.0, 10.0), 16 (8.6), 24 (8.9).
# 12.0's 24 blocks is from a transcription of that table, not read in the guide itself;
# no kernel here gets near it (48 warps hold at most 12 blocks of 4 warps).
SM_LIMITS: Mapping[int, SMLimits] = MappingProxyType({
    80: SMLimits(164 * KIB, 163 * KIB, 64, 32),
    86: SMLimits(100 * KIB, 99 * KIB, 48, 16),
    89: SMLimits(100 * KIB, 99 * KIB, 48, 24),
    90: SMLimits(228 * KIB, 227 * KIB, 64, 32),
    100: SMLimits(228 * KIB, 227 * KIB, 64, 32),
    120: SMLimits(100 * KIB, 99 * KIB, 48, 24),
})
LIMITERS = ("regs", "smem", "warps", "blocks")      # the order ties are named in


def _round_up(x: int, unit: int) -> int:
    return -(-x // unit) * unit


def ctas_per_sm(arch: int, regs: int, num_warps: int, shared: int) -> Tuple[int, str]:
    """(resident CTAs per SM, the limit that binds: "regs", "smem", "warps" or "blocks") of a
    kernel with ``regs`` registers per thread, ``num_warps`` warps per CTA and ``shared`` bytes
    of shared memory per CTA on compute capability ``arch`` (a key of ``SM_LIMITS``). 0 CTAs:
    the kernel cannot launch (over 255 registers, or over the per-block shared memory)."""
    lim = SM_LIMITS[arch]
    if regs > MAX_REGS_PER_THREAD:
        return 0, "regs"
    if shared > lim.smem_per_block:
        return 0, "smem"
    per_warp = max(REG_UNIT, _round_up(regs * 32, REG_UNIT))
    warps_by_regs = SUB_PARTITIONS * (REGS_PER_SM // SUB_PARTITIONS // per_warp)
    by = {
        "regs": warps_by_regs // num_warps,
        "smem": lim.smem_per_sm // _round_up(shared + SMEM_RESERVED, SMEM_UNIT),
        "warps": lim.max_warps // num_warps,
        "blocks": lim.max_blocks,
    }
    n = min(by.values())
    return n, next(k for k in LIMITERS if by[k] == n)
