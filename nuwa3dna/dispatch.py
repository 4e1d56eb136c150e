"""``choose_backend``: which backend ``backend="auto"`` runs, and why (logged at debug level).

On CUDA: the fused Triton kernels (float64 goes to the tile path). On CPU: the
tile path, except where dense masked SDPA (one fused kernel, no Python loop per
tile) is faster. Measured with ``python -m benchmarks.crossover`` (2 cores,
float32, dense time / tile time, forward and forward + backward; table in
benchmarks/NOTES.md), what decides is the score matrix of one head, Nq x Nk,
and the share of it that is visible:

* Nq*Nk <= 2**19: dense, e.g. the shipped model's layers (4x8x8 video,
  Nq*Nk = 65,536: dense 3-8x faster at batch 1-16) and nuwa-image (194,481:
  0.77 / 0.75); at 2.6e5-5.9e5 the two are within 0.7-1.6x of each other.
* Nq*Nk > 2**19 with a window: tile (1.05e6 at 9.5% visible: tile 1.7x / 1.5x
  faster; nuwa-video 1.9e7: 3.3x / 2.5x; cpu-mid 6.7e7: 23x / 15x).
* at least a quarter visible (wide windows, extent None) and Nq*Nk <= 2**24:
  dense, which then wastes little (1.05e6 at 62.5% visible: dense 4.8x faster;
  at 100%: 1.4-9x). Above 2**24 the dense mask alone would pass 16 MiB per head.
"""
from __future__ import annotations

import logging
import math
from functools import lru_cache
from typing import Tuple

import torch

from nuwa3dna.checks import TRITON_DTYPES
from nuwa3dna.kernels.geometry import count_visible

log = logging.getLogger("nuwa3dna")

DENSE_MAX_SCORES = 1 << 19        # per head, Nq*Nk: dense whatever the window below this
DENSE_MAX_SCORES_WIDE = 1 << 24   # per head: dense for wide windows up to this
WIDE_FRACTION = 0.25              # visible / (Nq*Nk) that counts as wide


@lru_cache(maxsize=1024)
def _visible_fraction(q_grid, kv_grid, extent, causal) -> float:
    return count_visible(q_grid, kv_grid, extent, causal) / (math.prod(q_grid) * math.prod(kv_grid))


def choose_backend(q: torch.Tensor, k: torch.Tensor, extent, causal: bool) -> Tuple[str, str]:
    """(backend, reason) for ``backend="auto"``; inputs validated, ``extent`` resolved (three ints)."""
    if q.device.type == "cuda":
        if q.dtype in TRITON_DTYPES:
            return "triton", "CUDA tensor in a Triton dtype"
        return "torch", f"{q.dtype} on CUDA: the tile path (the Triton kernels take fp32/fp16/bf16)"
    q_grid, kv_grid = tuple(q.shape[1:4]), tuple(k.shape[1:4])
    scores = math.prod(q_grid) * math.prod(kv_grid)
    if q.device.type == "cpu":
        if scores <= DENSE_MAX_SCORES:
            return "dense", f"Nq*Nk = {scores} <= {DENSE_MAX_SCORES}: dense SDPA is faster at this size"
        frac = _visible_fraction(q_grid, kv_grid, tuple(extent), bool(causal))
        if frac >= WIDE_FRACTION and scores <= DENSE_MAX_SCORES_WIDE:
            return "dense", f"{100 * frac:.0f}% of Nq*Nk = {scores} visible: dense SDPA wastes little"
    return "torch", f"tile path: Nq*Nk = {scores}, a small share visible"


def resolve_auto(q, k, extent, causal) -> str:
    backend, why = choose_backend(q, k, extent, causal)
    if not torch.compiler.is_compiling() and log.isEnabledFor(logging.DEBUG):
        log.debug("nearby_attention: backend=%r: %s", backend, why)
    return backend
