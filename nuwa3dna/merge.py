"""Attention over several key sets in one softmax, exactly: ``merge_attentions`` and the global tokens.

Softmax attention over the union of disjoint key sets is a weighted mean of the
attention over each set: with (out_i, lse_i) per set, lse = log sum_i exp(lse_i)
and out = sum_i exp(lse_i - lse) * out_i. 3DNA's global tokens
(``nearby_attention(..., additional_keys=, additional_values=)``) are computed this
way on every backend: the window part by the backend, with its log-sum-exp; the
global part here (N global keys per query: (queries x N) scores, N small); the
two merged. Everything is plain torch, so gradients flow into both lse's
(the backends take d lse, ``kernels/autograd.py``).
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch
from torch import Tensor


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


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
    acc = _acc(parts[0][0].dtype)
    lses = torch.stack([lse.to(acc) for _, lse in parts])                  # [P, ..., heads]
    lse = torch.logsumexp(lses, dim=0)
    # exp(lse_i - lse), with 0 where lse is -inf (no part saw a key: 0/0 otherwise)
    weights = torch.exp(lses - lse.masked_fill(torch.isinf(lse), 0.0))     # [P, ..., heads]
    out = sum(w.unsqueeze(-1) * o.to(acc) for w, (o, _) in zip(weights, parts))
    return out.to(parts[0][0].dtype), lse


def global_attention(q: Tensor, keys: Tensor, values: Tensor, scale: float) -> Tuple[Tensor, Tensor]:
    """Every query against the same N global keys: (out like q, lse (B, T, H, W, Hq) float32/64).

    q (B, T, H, W, Hq, D); keys, values (B, N, Hk, D) with Hq % Hk == 0 (query head h uses
    key head h // (Hq // Hk), no copies). Scores in the accumulation dtype; (queries x N) in memory.
    """
    B, T, H, W, Hq, D = q.shape
    Hk = keys.shape[2]
    acc = _acc(q.dtype)
    qg = q.reshape(B, T * H * W, Hk, Hq // Hk, D).to(acc)                  # [B, Nq, Hk, G, D]
    s = torch.einsum("bqhgd,bnhd->bqhgn", qg, keys.to(acc)) * scale         # [B, Nq, Hk, G, N]
    lse = torch.logsumexp(s, dim=-1)
    out = torch.einsum("bqhgn,bnhd->bqhgd", torch.exp(s - lse.unsqueeze(-1)), values.to(acc))
    return out.reshape(q.shape).to(q.dtype), lse.reshape(q.shape[:5])
