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

Grouped queries: the kernel takes k and v with fewer heads (query head h uses
kv head h // G; its backward returns dK, dV summed over the group), so they
are passed as they are; blocks of heads are whole groups or part of one group.
A relative position bias makes the mask per head (float32/64, gathered per
block of heads from ``bias.flat_index``, at most ``CpuConfig.fused_bias_mask_bytes``
per kernel call); the kernel's backward returns no
mask gradient, so calls with a bias take the tile backward (``op.torch_bwd``).
A used log-sum-exp (``dlse``) enters the kernel's backward through one extra
head-dim column (``backward``).
"""
from __future__ import annotations

import math
import threading
from functools import lru_cache

import torch

from nuwa3dna.kernels.cpu.bias import flat_index, radii, table
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


def _blocks(B: int, heads: int, workers: int, work: int, G: int = 1):
    """(b0, b1, h0, h1) blocks covering (B, heads): batch ranges, or head ranges per batch
    entry when there are fewer batch entries than workers (whole groups of G query heads,
    or parts of one group). Below ``SMALL_WORK`` multiply-adds one block: a second worker's
    hand-off costs more than it saves there."""
    if work < SMALL_WORK:
        return [(0, B, 0, heads)]
    if B >= workers:
        return [(b0, b1, 0, heads) for b0, b1 in _ranges(B, workers)]
    per, Hk = -(-workers // B), heads // G
    if Hk >= per:
        heads_ = [(k0 * G, k1 * G) for k0, k1 in _ranges(Hk, per)]
    else:
        heads_ = [(k * G + a, k * G + b) for k in range(Hk) for a, b in _ranges(G, -(-per // Hk))]
    return [(b, b + 1, h0, h1) for b in range(B) for h0, h1 in heads_]


def _kv(h0: int, h1: int, G: int) -> slice:
    """The kv heads of query heads h0..h1 (whole groups, or within one)."""
    return slice(h0 // G, (h1 - 1) // G + 1)


def _head_steps(h0: int, h1: int, G: int, step: int):
    """Heads h0..h1 of one block in sub-blocks of at most ``step`` heads, each whole groups of G
    or inside one group (what the kernel's grouped heads allow)."""
    if step >= G and h0 % G == 0:
        step -= step % G
    out, h = [], h0
    while h < h1:
        end = min(h1, h + step)
        if step < G:
            end = min(end, (h // G + 1) * G)
        out.append((h, end))
        h = end
    return out


def _bias_mask(rel_bias, idx: torch.Tensor, h0: int, h1: int, acc) -> torch.Tensor:
    """(1, h1 - h0, Nq, Nk): window mask and relative position bias of heads h0..h1."""
    tab = table(rel_bias[h0:h1], acc)
    return torch.stack([t.index_select(0, idx.view(-1)) for t in tab]).view(1, h1 - h0, *idx.shape)


def _ranges(n: int, parts: int):
    cuts = [n * i // parts for i in range(parts + 1)]
    return [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]


def forward(q, k, v, extent, causal: bool, scale: float, config: CpuConfig, opts: Options = PLAIN,
            rel_bias=None):
    """(out like q, lse (B, T, H, W, heads) float32/64): the fused kernel, split over workers.
    k, v may have fewer heads (a divisor of q's); ``rel_bias``: the relative position bias or None."""
    def body(workers):
        B, T, H, W, heads, D = q.shape
        G = heads // k.shape[4]
        q_grid, kv_grid = (T, H, W), tuple(k.shape[1:4])
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        if rel_bias is None:
            mask = _mask(q_grid, kv_grid, tuple(extent), causal, q.dtype, config.mask_cache_limit, opts)
        else:
            idx = flat_index(q_grid, kv_grid, tuple(extent), causal, opts, config.mask_cache_limit, radii(rel_bias))
            mask = lambda h0, h1: _bias_mask(rel_bias, idx, h0, h1, acc)
        qh, kh, vh = _heads_first(q), _heads_first(k), _heads_first(v)     # [B, heads, N, D]
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        lse = torch.empty(q.shape[:5], dtype=acc, device=q.device)
        outh, lseh = _heads_first(out), _heads_first(lse)                  # [B, heads, N, D], [B, heads, N]
        # One kernel call per block of (batch, head): few calls (a call costs ~0.1 ms of
        # set-up at the model's sizes), as many blocks as workers. Rows are never split:
        # the kernel's blocking depends on the number of query rows, so results would
        # then depend on the worker count.

        step = max(1, config.fused_bias_mask_bytes // (math.prod(q_grid) * math.prod(kv_grid) * acc.itemsize))

        def work(part):
            for b0, b1, h0_, h1_ in part:
                for h0, h1 in ([(h0_, h1_)] if rel_bias is None else _head_steps(h0_, h1_, G, step)):
                    kv = _kv(h0, h1, G)
                    o, l = _FLASH(qh[b0:b1, h0:h1], kh[b0:b1, kv], vh[b0:b1, kv], 0.0, False,
                                  attn_mask=mask if rel_bias is None else mask(h0, h1), scale=scale)
                    outh[b0:b1, h0:h1].copy_(o)
                    lseh[b0:b1, h0:h1].copy_(l)
        work_size = B * heads * math.prod(q_grid) * math.prod(kv_grid) * D
        run(work, [[blk] for blk in _blocks(B, heads, workers, work_size, G)], workers)
        return out, lse
    return on_lead(body, q.device, config.max_workers)


def takes_dlse(dlse, q) -> bool:
    """Whether ``backward`` serves this call: always without a used log-sum-exp; with one in
    float32/64 (the extra column holds -dlse in the input dtype, too coarse in 16 bits)."""
    return dlse is None or q.dtype in (torch.float32, torch.float64)


def _with_dlse(dout, q, k, v, out, dlse):
    """Inputs with one more head-dim column so that the kernel's delta = rowsum(dO' * O')
    is rowsum(dO * O) - dlse: dO' = [dO, 1], O' = [O, -dlse], q, k, v padded with 0 (scores,
    dP = dO' V'^T and the D real columns of every gradient unchanged; the scale is explicit)."""
    pad = lambda x: torch.nn.functional.pad(x, (0, 1))
    out_p = pad(out)
    out_p[..., -1] = -dlse
    dout_p = pad(dout)
    dout_p[..., -1] = 1
    return dout_p, pad(q), pad(k), pad(v), out_p


def backward(dout, dlse, q, k, v, out, lse, extent, causal: bool, scale: float, config: CpuConfig,
             opts: Options = PLAIN):
    """(dq, dk, dv) like q, k, v: the fused kernel's backward per block of (batch, head), split
    over workers; k, v may have fewer heads. ``dlse`` (the used log-sum-exp's gradient) only where
    ``takes_dlse``; a bias is never here (``op.torch_bwd`` routes it to the tile backward)."""
    def body(workers):
        B, heads, D = q.shape[0], q.shape[4], q.shape[-1]
        G = heads // k.shape[4]
        q_grid, kv_grid = tuple(q.shape[1:4]), tuple(k.shape[1:4])
        mask = _mask(q_grid, kv_grid, tuple(extent), causal, q.dtype, config.mask_cache_limit, opts)
        grads = [torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in (q, k, v)]
        xs = (dout, q, k, v, out) if dlse is None else _with_dlse(dout, q, k, v, out, dlse)
        ins = [_heads_first(x) for x in xs]
        lseh = _heads_first(lse).to(torch.float32 if q.dtype != torch.float64 else torch.float64)
        outs = [_heads_first(g) for g in grads]
        blocks = _blocks(B, heads, workers, B * heads * mask.numel() * D, G)
        # A block holding part of a group gets part of its kv heads' dK, dV: those add up.
        partial = any((h1 - h0) % G for _, _, h0, h1 in blocks)
        if partial:
            outs[1].zero_()
            outs[2].zero_()
        lock = threading.Lock()

        def work(part):
            for b0, b1, h0, h1 in part:
                kv = _kv(h0, h1, G)
                dq, dk, dv = _FLASH_BWD(ins[0][b0:b1, h0:h1], ins[1][b0:b1, h0:h1], ins[2][b0:b1, kv],
                                        ins[3][b0:b1, kv], ins[4][b0:b1, h0:h1], lseh[b0:b1, h0:h1], 0.0, False,
                                        attn_mask=mask, scale=scale)
                outs[0][b0:b1, h0:h1].copy_(dq[..., :D])
                if not partial:
                    outs[1][b0:b1, kv].copy_(dk[..., :D])
                    outs[2][b0:b1, kv].copy_(dv[..., :D])
                    continue
                with lock:
                    outs[1][b0:b1, kv].add_(dk[..., :D])
                    outs[2][b0:b1, kv].add_(dv[..., :D])
        run(work, [[blk] for blk in blocks], workers)
        return tuple(grads)
    return on_lead(body, q.device, config.max_workers)
