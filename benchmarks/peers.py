"""Peer implementations of 3DNA that the benchmarks compare against.

* ``dense``: the masked SDPA reference, (queries x keys) mask, called as
  ``nearby_attention(..., backend="dense")``: the same
  ``dense_nearby_attention`` after the public API's input checks. Through the
  API so that ``auto``, ``torch`` and ``dense`` rows pay the same per-call
  overhead and ``auto / best`` compares like with like (the checks cost
  ~0.2 ms a call, i.e. 2x on a 0.2 ms model-text call).
* ``flex``: FlexAttention under torch.compile with the same mask as a mask_mod;
  the block mask is built once per (problem, device) and cached.
* ``unfold``: the plain-PyTorch way of the nuwa-pytorch port: pad the key grid,
  unfold it into one (2e+1)^3 window per query, score with einsum, mask padding
  (and the causal half), softmax, einsum with the unfolded values. It looks up
  windows around the query's own position, so it needs q and kv grids to match
  (no rescaled centres). It materialises every window (147 keys x D per query
  for cpu-mid), so it runs one head at a time to fit memory; that loop changes
  no per-element work.
* ``natten``: NATTEN's neighbourhood attention, only when importable (0.21.7
  was installed here on 2026-12-02; on CPU it runs FlexAttention, forward
  only). It shifts windows inward at borders and its causal is per axis, so
  it is a speed peer only, never a correctness one; it needs one grid for q
  and kv and windows >= 2 on every axis longer than 1 (``natten_supported``).

Untested here: the peers' own correctness is spot-checked against the dense
reference only for ``unfold`` (tests/ does not import benchmarks/).
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from nuwa3dna import nearby_attention
from nuwa3dna.problems import Problem


def dense(p: Problem) -> Callable:
    return lambda q, k, v: nearby_attention(q, k, v, p.extent, causal=p.causal, backend="dense")


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


NATTEN_CPU_MAX_PAIRS = 1 << 25        # B*Nq*Nk: nuwa-video (1.9e7) runs, cpu-mid (6.7e7) skips


def natten_supported(p: Problem, direction: str, device: str) -> Optional[str]:
    """None if the NATTEN peer can run ``p``, else why not."""
    if p.kv_grid is not None and p.kv_grid != p.q_grid:
        return "NATTEN needs q and kv on one grid (no rescaled centres)"
    if any(n > 1 and e == 0 for n, e in zip(p.q_grid, p.resolved_extent)):
        return "NATTEN windows are >= 2 on every axis (extent 0 on an axis longer than 1)"
    if device == "cpu" and direction == "fwdbwd":
        return "NATTEN runs FlexAttention on CPU: no CPU backward"
    pairs = p.B * math.prod(p.q_grid) * math.prod(p.kv)
    if device == "cpu" and pairs > NATTEN_CPU_MAX_PAIRS:
        return (f"NATTEN on CPU is uncompiled FlexAttention (torch_compile=True finds no CPU backend): "
                f"it materialises {pairs:.2g} scores per head; nuwa-video's 1.9e7 already takes 14 s")
    return None


def natten(p: Problem) -> Callable:
    """NATTEN's neighbourhood attention (window 2e+1, shifted inward at borders), NATTEN defaults.

    Axes of length 1 are dropped (na2d / na1d): NATTEN refuses windows of 1.
    Windows longer than their axis are clipped to it (the whole axis, as our
    capped extent). Causal is NATTEN's per-axis causal on every kept axis, a
    smaller key set than our raster-order causal: a speed peer only.
    """
    from natten import functional as NF
    keep = [i for i, n in enumerate(p.q_grid) if n > 1]
    kernel = tuple(min(2 * p.resolved_extent[i] + 1, p.q_grid[i]) for i in keep)
    op = {1: NF.na1d, 2: NF.na2d, 3: NF.na3d}[len(keep)]
    causal = (True,) * len(keep) if p.causal else False

    def run(q, k, v):
        B, T, H, W, heads, D = q.shape
        shape = (B, *(q.shape[1 + i] for i in keep), heads, D)
        out = op(q.reshape(shape), k.reshape(shape), v.reshape(shape), kernel_size=kernel,
                 is_causal=causal)
        return out.reshape(q.shape)
    return run
