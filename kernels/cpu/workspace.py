"""Scratch memory the CPU tile path keeps between calls, and how to free it.

Why keep any: fresh 50 MB tensors are page-faulted in on first touch, about
0.4 ms per MB on the 2-core development machine, i.e. ~80 ms of cpu-mid's
forward for the strip copies alone, more than the copies themselves. So each
calling thread keeps its largest buffers (the tile and strip layouts of q, k, v,
dO and the accumulators: about 8-12x the size of q in float32) for its next
call, as long as they total at most ``CpuConfig.workspace_limit`` bytes; a call
that needed more frees its buffers when it returns.

Buffers are always created outside inference mode (an inference tensor cannot
be updated in place later, outside it), whatever mode the caller is in.
``clear_workspace()`` frees every thread's buffers and the window-mask cache;
``workspace_bytes()`` says how much is held.
"""
from __future__ import annotations

import math
import threading
import weakref
from typing import Dict

import torch


class Workspace:
    """Named scratch buffers of one calling thread, grown as needed."""

    def __init__(self):
        self.bufs: Dict[str, torch.Tensor] = {}

    def get(self, name: str, shape, dtype, device) -> torch.Tensor:
        """A (shape, dtype) view of buffer ``name``; contents are whatever was there."""
        numel = math.prod(shape)
        buf = self.bufs.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != torch.device(device):
            with torch.inference_mode(False):
                buf = torch.empty(numel, dtype=dtype, device=device)
            self.bufs[name] = buf
        return buf[:numel].view(shape)

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in list(self.bufs.values()))

    def trim(self, limit: int) -> None:
        """Free everything if the buffers total more than ``limit`` bytes."""
        if self.nbytes() > limit:
            self.bufs.clear()


_LOCAL = threading.local()
_ALL: "weakref.WeakSet[Workspace]" = weakref.WeakSet()     # one per live calling thread
_ALL_LOCK = threading.Lock()


def workspace() -> Workspace:
    """This thread's workspace (created on first use; dies with the thread)."""
    ws = getattr(_LOCAL, "ws", None)
    if ws is None:
        ws = _LOCAL.ws = Workspace()
        with _ALL_LOCK:
            _ALL.add(ws)
    return ws


def workspace_bytes() -> int:
    """Bytes of scratch buffers held between calls, over all threads."""
    with _ALL_LOCK:
        spaces = list(_ALL)
    return sum(ws.nbytes() for ws in spaces)


def clear_workspaces() -> None:
    """Drop every thread's scratch buffers (a call running now keeps what it holds until it returns)."""
    with _ALL_LOCK:
        spaces = list(_ALL)
    for ws in spaces:
        ws.bufs.clear()
