"""Peer implementations of 3DNA that the benchmarks compare against.

* ``dense``: the masked SDPA reference (nuwa3dna.reference), (queries x keys) mask.
* ``flex``: FlexAttention under torch.compile with the same mask as a mask_mod;
  the block mask is built once per (problem, device) and cached.
* ``unfold``: the plain-PyTorch way of the nuwa-pytorch port: pad the key grid,
  unfold it into one (2e+1)^3 window per query, score with einsum, mask padding
  (and the causal half), softmax, einsum with the unfolded values. It looks up
  windows around the query's own position, so it needs q and kv grids to match
  (no rescaled centres). It materialises every window (147 keys x D per query
  for cpu-mid), so it runs one head at a time to fit memory; that loop changes
  no per-element work.
* ``natten``: NATTEN's fused neighbourhood attention, only when importable
  (not installed here). It shifts windows inward at borders, so it is a speed
  peer only, never a correctness one.

Untested here: the peers' own correctness is spot-checked against the dense
reference only for ``unfold`` (tests/ does not import benchmarks/).
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from nuwa3dna.problems import Problem
from nuwa3dna.reference import dense_nearby_attention


def dense(p: Problem) -> Callable:
    return lambda q, k, v: dense_nearby_attention(q, k, v, p.extent, p.causal)


# ------------------------------------------------------------------ FlexAttention

def _mask_mod(p: Problem, device):
    T, H, W = p.q_grid
    T2, H2, W2 = p.kv
    et, eh, ew = p.resolved_extent
    causal = p.causal

    def mask_mod(b, h, q_idx, kv_idx):
        t, r = q_idx // (H * W), q_idx % (H * W)
        y, x = r // W, r % W
        a, r2 = kv_idx // (H2 * W2), kv_idx % (H2 * W2)
        yb, xc = r2 // W2, r2 % W2
        ok = ((a - (t * T2) // T).abs() <= et) & ((yb - (y * H2) // H).abs() <= eh) \
            & ((xc - (x * W2) // W).abs() <= ew)
        if causal:
            ok = ok & (kv_idx <= q_idx)
        return ok
    return mask_mod


@functools.lru_cache(maxsize=None)
def _block_mask(p: Problem, device: str):
    from torch.nn.attention.flex_attention import create_block_mask
    nq, nk = p.q_grid[0] * p.q_grid[1] * p.q_grid[2], p.kv[0] * p.kv[1] * p.kv[2]
    return create_block_mask(_mask_mod(p, device), None, None, nq, nk, device=device)


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention, dynamic=False)


def flex(p: Problem, device: str = "cpu") -> Callable:
    block_mask = _block_mask(p, device)
    fa = _compiled_flex()

    def run(q, k, v):
        B, T, H, W, heads, D = q.shape
        qh, kh, vh = (x.flatten(1, 3).transpose(1, 2) for x in (q, k, v))   # (B, heads, N, D)
        out = fa(qh, kh, vh, block_mask=block_mask, scale=D ** -0.5)
        return out.transpose(1, 2).reshape(B, T, H, W, heads, D)
    return run


# ------------------------------------------------------------------ unfold (nuwa-pytorch style)

def unfold_supported(p: Problem) -> Optional[str]:
    """None if the unfold peer can run ``p``, else why not."""
    if p.kv_grid is not None and p.kv_grid != p.q_grid:
        return "unfold looks windows up at the query's own position: no rescaled centres (cross)"
    return None


def unfold(p: Problem) -> Callable:
    et, eh, ew = p.resolved_extent
    T, H, W = p.q_grid
    kt, kh, kw = 2 * et + 1, 2 * eh + 1, 2 * ew + 1

    # Window validity: keys outside the grid are padding; causal hides the
    # window offsets after the centre in raster order.
    ones = F.pad(torch.ones(1, 1, T, H, W), (ew, ew, eh, eh, et, et))
    valid = ones.unfold(2, kt, 1).unfold(3, kh, 1).unfold(4, kw, 1).reshape(T, H, W, -1) > 0
    if p.causal:
        dt, dh, dw = torch.meshgrid(torch.arange(kt) - et, torch.arange(kh) - eh,
                                    torch.arange(kw) - ew, indexing="ij")
        before = (dt < 0) | ((dt == 0) & ((dh < 0) | ((dh == 0) & (dw <= 0))))
        valid = valid & before.reshape(-1)

    def windows(x):                     # (B, T, H, W, D) -> (B, T, H, W, D, J)
        xp = F.pad(x, (0, 0, ew, ew, eh, eh, et, et))
        return xp.unfold(1, kt, 1).unfold(2, kh, 1).unfold(3, kw, 1).flatten(-3)

    def run(q, k, v):
        B, _, _, _, heads, D = q.shape
        scale = D ** -0.5
        outs = []
        for h in range(heads):           # one head at a time: windows are (2e+1)^3 x the keys
            sim = torch.einsum("btyxd,btyxdj->btyxj", q[..., h, :] * scale, windows(k[..., h, :]))
            sim = sim.masked_fill(~valid, float("-inf"))
            attn = sim.softmax(dim=-1)
            outs.append(torch.einsum("btyxj,btyxdj->btyxd", attn, windows(v[..., h, :])))
        return torch.stack(outs, dim=-2)
    return run


# ------------------------------------------------------------------ NATTEN (optional)

def natten_available() -> bool:
    try:
        import natten  # noqa: F401
        return True
    except Exception:
        return False


def natten(p: Problem) -> Callable:
    """NATTEN's fused 3D neighbourhood attention (window = 2e+1, shifted at borders)."""
    from natten.functional import na3d
    kernel = tuple(2 * e + 1 for e in p.resolved_extent)

    def run(q, k, v):
        # NATTEN needs odd windows no larger than the grid; it shifts them at borders.
        return na3d(q, k, v, kernel_size=kernel, is_causal=(p.causal,) * 3 if p.causal else False)
    return run
