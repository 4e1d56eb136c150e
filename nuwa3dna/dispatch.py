"""``choose_backend``: which backend ``backend="auto"`` runs, and why (logged at debug level).

CUDA tensors: the fused Triton kernels (float64 goes to the tile backend).
Everything else: the ``torch`` backend, which itself picks the faster of its two
strategies per problem (``nuwa3dna.kernels.cpu.sdpa.use_sdpa``): the tile loops,
or PyTorch's fused flash kernel with the window mask where one head's score
matrix is small (Nq*Nk <= 2**19) or at least a quarter visible (up to 2**22).
The crossover was measured with ``python -m benchmarks.crossover`` (2 cores,
float32, dense / tile time, forward and forward + backward; table in
benchmarks/NOTES.md): the shipped model's layers (4x8x8 video, Nq*Nk = 65,536)
run 3-8x faster fused, nuwa-image (194,481) 1.3x; at 1.05e6 with 9.5% visible
the tiles win 1.7x, at nuwa-video 3.3x, at cpu-mid 23x; at 1.05e6 with 62.5%
visible the fused kernel wins 4.8x. The fused strategy equals
``backend="dense"`` (the same kernel) but runs on the backend's worker threads,
so it keeps the thread and fork rules of docs/design.md section 4, which a
plain SDPA call in the caller's thread would not.

Windows v2 (dilation, stride, per-axis causal, border="shift", NATTEN's even
kernels; docs/design.md section 7): on CUDA the Triton kernels take them (their
window-table path); elsewhere the torch backend, which picks its strategy with
the exact visible-pair count of those windows.
"""
from __future__ import annotations

import logging
from typing import Tuple

import torch

from nuwa3dna.checks import TRITON_DTYPES
from nuwa3dna.kernels.cpu import planner
from nuwa3dna.kernels.cpu.sdpa import use_sdpa
from nuwa3dna.kernels.geometry import resolve_extent
from nuwa3dna.kernels.windows import Options, is_plain, options_text

log = logging.getLogger("nuwa3dna")


def choose_backend(q: torch.Tensor, k: torch.Tensor, extent, causal, *, dilation=1, stride=1,
                   border: str = "clip", after=None, bias=None) -> Tuple[str, str]:
    """(backend, reason) for ``backend="auto"``; inputs validated, ``extent`` resolved (three ints).
    Global tokens do not change the choice (they are merged in after any backend)."""
    q_grid, kv_grid = tuple(q.shape[1:4]), tuple(k.shape[1:4])
    if not is_plain(causal, dilation, stride, border, after):
        text = options_text(causal, dilation, stride, border, after)
        if q.device.type == "cuda":
            if q.dtype in TRITON_DTYPES:
                return "triton", f"{text}: CUDA tensor in a Triton dtype (the kernels' window-table path)"
            return "torch", f"{text}, {q.dtype} on CUDA: the tile backend (the Triton kernels take fp32/fp16/bf16)"
        opts = Options.of(causal, dilation, stride, border,
                          None if after is None else resolve_extent(after, kv_grid))
        fused = use_sdpa(q_grid, kv_grid, extent, causal is True, planner.DEFAULT, opts)
        return "torch", f"{text}: CPU backend, {'fused-kernel' if fused else 'tile'} strategy"
    if q.device.type == "cuda":
        if q.dtype in TRITON_DTYPES:
            return "triton", "CUDA tensor in a Triton dtype"
        return "torch", f"{q.dtype} on CUDA: the tile backend (the Triton kernels take fp32/fp16/bf16)"
    if use_sdpa(q_grid, kv_grid, extent, causal, planner.DEFAULT):
        return "torch", "CPU backend, fused-kernel strategy (small or widely visible score matrix)"
    return "torch", "CPU backend, tile strategy (large score matrix, a small share visible)"


def resolve_auto(q, k, extent, causal, **options) -> str:
    backend, why = choose_backend(q, k, extent, causal, **options)
    if not torch.compiler.is_compiling() and log.isEnabledFor(logging.DEBUG):
        log.debug("nearby_attention: backend=%r: %s", backend, why)
    return backend
