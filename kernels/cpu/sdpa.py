"""The CPU backend's strategy for small score matrices: PyTorch's fused flash kernel with the mask.

Where one head's score matrix is small (Nq*Nk <= ``CpuConfig.fused_max_scores``)
or much of it is visible, one fused C++ call per (batch, head) beats the tile loops, whose
Python work per tile dominates there (benchmarks/NOTES.md, "auto crossover":
the shipped model's 4x8x8 video layer, Nq*Nk = 65,536: 1.1 vs 5.6 ms forward).
This runs ``aten._scaled_dot_product_flash_attention_for_cpu`` (and its
backward) with the additive window mask, the same kernel the dense reference
reaches through SDPA, so results equal ``backend="dense"`` bit for bit. Work is
split over (batch, head), on the
backend's worker threads (single-threaded inside torch), so it shares the tile
path's thread, fork and inference-mode rules. Memory: one (Nq, Nk) mask in the
input dtype (cached), no (B x heads x Nq x Nk) tensor. Any v2 window option
(``opts``, docs/design.md section 7) is just another mask.
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch

from nuwa3dna.kernels.cpu.planner import MASKS, CpuConfig
from nuwa3dna.kernels.cpu.workers import on_lead, run
from nuwa3dna.kernels.geometry import count_visible, grid_coords, visible
from nuwa3dna.kernels.windows import Options

PLAIN = Options()

_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_FLASH_BWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def use_sdpa(q_grid, kv_grid, extent, causal: bool, config: CpuConfig, opts: Options = PLAIN) -> bool:
    """True where the fused kernel is the faster strategy (measured crossover, see module doc).
    ``opts``: the v2 window options (docs/design.md section 7), counted exactly. Cached: auto's
    choice, the forward and the backward of one call all ask."""
    return _use_sdpa(tuple(q_grid), tuple(kv_grid), tuple(extent), bool(causal), config, opts)


@lru_cache(maxsize=256)
def _use_sdpa(q_grid, kv_grid, extent, causal: bool, config: CpuConfig, opts: Options) -> bool:
    scores = math.prod(q_grid) * math.prod(kv_grid)
    if scores <= config.fused_max_scores:
        return True
    return scores <= config.fused_max_scores_wide and count_visible(
        q_grid, kv_grid, extent, opts.causal(causal), **opts.kwargs()) >= config.fused_wide_fraction * scores


def _mask(q_grid, kv_grid, extent, causal, dtype, limit: int, opts: Options = PLAIN) -> torch.Tensor:
    """(Nq, Nk) additive mask in ``dtype``: 0 visible, -inf hidden (the fused kernel wants q's dtype).
    Any window options (``geometry.visible`` takes them)."""
    def make():
        ok = visible(grid_coords(q_grid), grid_coords(kv_grid), q_grid, kv_grid, extent, opts.causal(causal),
                     **opts.kwargs())
        return torch.zeros(ok.shape, dtype=dtype).masked_fill_(~ok, float("-inf"))
    key = ("sdpa", q_grid, kv_grid, extent, causal, dtype) + (() if opts.plain else (opts,))
    return MASKS.get(key, make, limit)


SMALL_WORK = 1 << 22     # B*heads*Nq*Nk*D multiply-adds; ~2 ms on one core


def _heads_first(x: torch.Tensor) -> torch.Tensor:
    """(B, T, H, W, heads, *rest) -> (B, heads, N, *rest), a view when it can be; head dims
    (the last axis of 6-dim inputs) made unit-stride, which the kernel assumes."""
    if x.dim() == 6 and x.stride(-1) != 1:
        x = x.contiguous()
    return x.flatten(1, 3).movedim(2, 1)


def _blocks(B: int, heads: int, workers: int, work: int):
    """(b0, b1, h0, h1) blocks covering (B, heads): batch ranges, or head ranges per batch
    entry when there are fewer batch entries than workers. Below ``SMALL_WORK`` multiply-adds
    one block: a second worker's hand-off costs more than it saves there."""
    if work < SMALL_WORK:
        return [(0, B, 0, heads)]
    if B >= workers:
        return [(b0, b1, 0, heads) for b0, b1 in _ranges(B, workers)]
    per = -(-workers // B)
    return [(b, b + 1, h0, h1) for b in range(B) for h0, h1 in _ranges(heads, per)]


def _ranges(n: int, parts: int):
    cuts = [n * i // parts for i in range(parts + 1)]
    return [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]


def forward(q, k, v, extent, causal: bool, scale: float, config: CpuConfig, opts: Options = PLAIN):
    """(out like q, lse (B, T, H, W, heads) float32/64): the fused kernel, split over workers."""
    def body(workers):
        B, T, H, W, heads, D = q.shape
        q_grid, kv_grid = (T, H, W), tuple(k.shape[1:4])
        mask = _mask(q_grid, kv_grid, tuple(extent), causal, q.dtype, config.mask_cache_limit, opts)
        qh, kh, vh = _heads_first(q), _heads_first(k), _heads_first(v)     # [B, heads, N, D]
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        lse = torch.empty(q.shape[:5], dtype=torch.float64 if q.dtype == torch.float64 else torch.float32,
                          device=q.device)
        outh, lseh = _heads_first(out), _heads_first(lse)                  # [B, heads, N, D], [B, heads, N]
        # One kernel call per block of (batch, head): few calls (a call costs ~0.1 ms of
        # set-up at the model's sizes), as many blocks as workers. Rows are never split:
        # the kernel's blocking depends on the number of query rows, so results would
        # then depend on the worker count.

        def work(part):
            for b0, b1, h0, h1 in part:
                o, l = _FLASH(qh[b0:b1, h0:h1], kh[b0:b1, h0:h1], vh[b0:b1, h0:h1], 0.0, False,
                              attn_mask=mask, scale=scale)
                outh[b0:b1, h0:h1].copy_(o)
                lseh[b0:b1, h0:h1].copy_(l)
        run(work, [[blk] for blk in _blocks(B, heads, workers, B * heads * mask.numel() * D)], workers)
        return out, lse
    return on_lead(body, q.device, config.max_workers)


def backward(dout, dlse, q, k, v, out, lse, extent, causal: bool, scale: float, config: CpuConfig,
             opts: Options = PLAIN):
    """(dq, dk, dv) like q, k, v: the fused kernel's backward per (batch, head), split over workers.
    ``dlse`` must be None (the kernel forms delta itself; ``op.torch_bwd`` routes the rest)."""
    def body(workers):
        q_grid, kv_grid = tuple(q.shape[1:4]), tuple(k.shape[1:4])
        mask = _mask(q_grid, kv_grid, tuple(extent), causal, q.dtype, config.mask_cache_limit, opts)
        grads = [torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in (q, k, v)]
        ins = [_heads_first(x) for x in (dout, q, k, v, out)]
        lseh = _heads_first(lse).to(torch.float32 if q.dtype != torch.float64 else torch.float64)
        outs = [_heads_first(g) for g in grads]

        def work(part):
            for b0, b1, h0, h1 in part:
                res = _FLASH_BWD(*[x[b0:b1, h0:h1] for x in ins], lseh[b0:b1, h0:h1], 0.0, False,
                                 attn_mask=mask, scale=scale)
                for dst, src in zip(outs, res):
                    dst[b0:b1, h0:h1].copy_(src)
        B, heads = q.shape[0], q.shape[4]
        run(work, [[blk] for blk in _blocks(B, heads, workers, B * heads * mask.numel() * q.shape[-1])], workers)
        return tuple(grads)
    return on_lead(body, q.device, config.max_workers)
