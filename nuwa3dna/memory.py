"""Memory the library keeps between calls, and how to free it.

The CPU tile path keeps, per calling thread, the scratch buffers of its last
call (tile and strip layouts and accumulators: about 8-12x the size of q in
float32, at most ``CpuConfig.workspace_limit`` = 1 GiB per thread; a call that
needed more frees them on return), and a cache of window masks (at most
``CpuConfig.mask_cache_limit`` = 64 MiB in all; about 1 MiB for cpu-mid).
"""
from __future__ import annotations

from nuwa3dna.kernels.cpu.planner import MASKS
from nuwa3dna.kernels.cpu.workspace import clear_workspaces
from nuwa3dna.kernels.cpu.workspace import workspace_bytes as _scratch_bytes


def clear_workspace() -> None:
    """Free every thread's scratch buffers and the window-mask cache."""
    clear_workspaces()
    MASKS.clear()


def workspace_bytes() -> int:
    """Bytes held between calls: scratch buffers of all threads plus cached window masks."""
    return _scratch_bytes() + MASKS.nbytes()
