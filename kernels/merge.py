"""The maths of attention over several disjoint key sets in one softmax (unchecked; the public,
validated entry point is ``nuwa3dna.merge_attentions``, docs/design.md section 8).

With (out_i, lse_i) per key set: lse = log sum_i exp(lse_i), out = sum_i exp(lse_i - lse) * out_i.
``global_attention`` is the global tokens' part that ``nearby_attention`` merges with a
backend's window part. Plain torch: differentiable, and countable on meta tensors (kernels/perf.py).
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch
from torch import Tensor


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def merge(parts: Sequence[Tuple[Tensor, Tensor]]) -> Tuple[Tensor, Tensor]:
    """(out, lse) over the union of the parts' key sets; out in the first part's dtype, lse float32/64.
    A part with lse -inf (its queries saw no key) gets weight 0."""
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
