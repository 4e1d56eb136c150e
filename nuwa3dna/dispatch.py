"""``choose_backend``: which backend ``backend="auto"`` runs, and why (logged at debug level).

On CUDA the fused Triton kernels. On CPU the tile path, except where the whole
masked score matrix is small enough that dense SDPA (one fused kernel, no
Python loop) is faster: the crossover below was measured, see ``_DENSE_MAX``.
"""
from __future__ import annotations

import logging
import math
from typing import Tuple

import torch

from nuwa3dna.checks import TRITON_DTYPES

log = logging.getLogger("nuwa3dna")

# Dense SDPA wins on CPU while B*heads*Nq*Nk (the score elements it computes) stays
# below this; measured in benchmarks/NOTES.md ("auto crossover").
_DENSE_MAX = 0


def choose_backend(q: torch.Tensor, k: torch.Tensor, extent, causal: bool) -> Tuple[str, str]:
    """(backend, reason) for ``backend="auto"``; inputs already validated."""
    if q.device.type == "cuda" and q.dtype in TRITON_DTYPES:
        return "triton", "CUDA tensor in a Triton dtype"
    B, heads = q.shape[0], q.shape[4]
    scores = B * heads * math.prod(q.shape[1:4]) * math.prod(k.shape[1:4])
    if q.device.type == "cpu" and scores <= _DENSE_MAX:
        return "dense", f"{scores} score elements <= {_DENSE_MAX}: dense SDPA is faster at this size"
    return "torch", f"tile path ({scores} score elements in a dense run)"


def resolve_auto(q, k, extent, causal) -> str:
    backend, why = choose_backend(q, k, extent, causal)
    if not torch.compiler.is_compiling() and log.isEnabledFor(logging.DEBUG):
        log.debug("nearby_attention: backend=%r: %s", backend, why)
    return backend
