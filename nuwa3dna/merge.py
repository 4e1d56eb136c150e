"""Attention over several key sets in one softmax, exactly: ``merge_attentions`` and the global tokens.

Softmax attention over the union of disjoint key sets is a weighted mean of the
attention over each set: with (out_i, lse_i) per set, lse = log sum_i exp(lse_i)
and out = sum_i exp(lse_i - lse) * out_i. 3DNA's global tokens
(``nearby_attention(..., additional_keys=, additional_values=)``) are computed this
way on every backend: the window part by the backend, with its log-sum-exp; the
global part in ``nuwa3dna.kernels.merge`` (N global keys per query: (queries x N) scores, N small); the
two merged. Everything is plain torch, so gradients flow into both lse's
(the backends take d lse, ``kernels/autograd.py``).
"""
from __future__ import annotations

from typing import Sequence, Tuple

from torch import Tensor

from nuwa3dna.kernels.merge import global_attention, merge

__all__ = ["merge_attentions", "global_attention"]


def merge_attentions(parts: Sequence[Tuple[Tensor, Tensor]]) -> Tuple[Tensor, Tensor]:
    """The exact (out, lse) of attention over the union of disjoint key sets, differentiable.

    Args:
        parts: (out_i, lse_i) pairs, out_i (..., heads, D), lse_i (..., heads) (natural log,
            as ``nearby_attention(..., return_lse=True)`` or FlashAttention return them),
            over disjoint key sets of the same queries. A part whose queries saw no key
            has lse -inf there and weight 0.

    Returns:
        (out, lse): out in the first part's dtype, lse in float32 (float64 for float64 outs).
    """
    if isinstance(parts, (Tensor, str)) or len(parts) == 0:
        raise ValueError(f"merge_attentions takes a non-empty list of (out, lse) pairs, got {type(parts).__name__}")
    for i, part in enumerate(parts):
        if not (isinstance(part, (tuple, list)) and len(part) == 2
                and all(isinstance(x, Tensor) for x in part)):
            raise TypeError(f"merge_attentions: parts[{i}] must be an (out, lse) pair of tensors, got {part!r:.80}")
        out, lse = part
        if out.shape[:-1] != lse.shape:
            raise ValueError(f"merge_attentions: parts[{i}] has out.shape={tuple(out.shape)} and "
                             f"lse.shape={tuple(lse.shape)}; lse must be out.shape[:-1]")
        if out.shape != parts[0][0].shape:
            raise ValueError(f"merge_attentions: parts differ in shape: parts[0] out {tuple(parts[0][0].shape)}, "
                             f"parts[{i}] out {tuple(out.shape)}")
    return merge(parts)
