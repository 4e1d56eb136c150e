"""Memory the library keeps between calls, and how to free it.

The CPU tile path keeps, per calling thread, the scratch buffers of its last
call (tile and strip layouts and accumulators: about 8-12x the size of q in
float32, at most ``CpuConfig.workspace_limit`` = 1 GiB per thread; a call that
needed more frees them on return), and a cache of window masks (at most
``CpuConfig.mask_cache_limit`` = 64 MiB in all; about 1 MiB for cpu-mid).

The Triton path, once used, keeps its launch plans (``kernels/triton/launch.py``
``PLANS``: at most ``PLAN_CACHE_SIZE`` = 256 entries of 3.4 KB (a forward) to 7.2 KB
(a backward) of host memory with their keys, so at most about 1.8 MB) and the v2
options' int32 window tables on each device (``relayout.packed``: at most 64, each
4 * (3 * (T + T2 + H + H2 + W + W2) + T + H + W) bytes, 1.5 KB for nuwa-video-stride),
which the plans share.
The plans and their tables are counted by ``workspace_bytes``; the tile planner's
and the tables' host caches (``configs.plan_tiles``, ``relayout.window_tables`` and
``relayout.axis_table``: at most 256, 256 and 512 entries of Python tuples, an
axis of n queries about 7 * 36 * n bytes) are freed by ``clear_workspace`` but not
counted (their entries cannot be enumerated).

A CUDA graph captured over the Triton path with v2 window options holds the
window table's address: ``clear_workspace`` frees that table, so call it only
when no such graph will replay.
"""
from __future__ import annotations

import sys

from nuwa3dna.kernels.cpu.planner import MASKS
from nuwa3dna.kernels.cpu.workspace import clear_workspaces
from nuwa3dna.kernels.cpu.workspace import workspace_bytes as _scratch_bytes

# Looked up in sys.modules, never imported here: the launcher imports Triton, and a
# process that never used backend="triton" holds nothing there.
_LAUNCH = "nuwa3dna.kernels.triton.launch"
_RELAYOUT = "nuwa3dna.kernels.triton.relayout"
_CONFIGS = "nuwa3dna.kernels.triton.configs"


def clear_workspace() -> None:
    """Free every thread's scratch buffers, the window-mask cache, and the Triton
    path's launch plans, window tables and tile plans."""
    clear_workspaces()
    MASKS.clear()
    launch, relayout, configs = (sys.modules.get(m) for m in (_LAUNCH, _RELAYOUT, _CONFIGS))
    if launch is not None:
        launch.PLANS.clear()
    if relayout is not None:
        relayout._packed.cache_clear()      # the device copies (no public handle on that cache)
        relayout.window_tables.cache_clear()
        relayout.axis_table.cache_clear()
    if configs is not None:
        configs.plan_tiles.cache_clear()


def workspace_bytes() -> int:
    """Bytes held between calls: scratch buffers of all threads, cached window masks, and
    the Triton launch plans with the window tables they hold."""
    launch = sys.modules.get(_LAUNCH)
    return _scratch_bytes() + MASKS.nbytes() + (0 if launch is None else launch.PLANS.nbytes())
