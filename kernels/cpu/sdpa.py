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

import torch

from nuwa3dna.kernels.cpu.planner import MASKS, CpuConfig
from nuwa3dna.kernels.cpu.workers import in_worker, run, split, worker_count
from nuwa3dna.kernels.geometry import count_visible, grid_coords, visible
from nuwa3dna.kernels.windows import Options

PLAIN = Options()

_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_FLASH_BWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def use_sdpa(q_grid, kv_grid, extent, causal: bool, config: CpuConfig, opts: Options = PLAIN) -> bool:
    """True where the fused kernel is the faster strategy (measured crossover, see module doc).
    ``opts``: the v2 window options (docs/design.md section 7), counted exactly."""
    scores = math.prod(q_grid) * math.prod(kv_grid)
    if scores <= config.fused_max_scores:
        return True
    return scores <= config.fused_max_scores_wide and count_visible(
        tuple(q_grid), tuple(kv_grid), tuple(extent), opts.causal(causal),
        **opts.kwargs()) >= config.fused_wide_fraction * scores


def _mask(q_grid, kv_grid, extent, causal, dtype, limit: int, opts: Options = PLAIN) -> torch.Tensor:
    """(Nq, Nk) additive mask in ``dtype``: 0 visible, -inf hidden (the fused kernel wants q's dtype).
    Any window options (``geometry.visible`` takes them)."""
    def make():
        ok = visible(grid_coords(q_grid), grid_coords(kv_grid), q_grid, kv_grid, extent, opts.causal(causal),
                     **opts.kwargs())
        return torch.zeros(ok.shape, dtype=dtype).masked_fill_(~ok, float("-inf"))
    key = ("sdpa", q_grid, kv_grid, extent, causal, dtype) + (() if opts.plain else (opts,))
    return MASKS.get(key, make, limit)


def _heads_first(x: torch.Tensor) -> torch.Tensor:
    """(B, T, H, W, heads, *rest) -> a (B, heads, N, *rest) view."""
    return x.flatten(1, 3).movedim(2, 1)


def _run_on_workers(body, q, config: CpuConfig):
    workers = worker_count(q.device, config.max_workers)

    def lead():
        with torch.inference_mode(False), torch.no_grad():
            return body(workers)
    return in_worker(lead, workers)


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
        # Split by (batch, head) only: the kernel's blocking depends on the number of
        # query rows, so splitting rows would make results depend on the worker count.
        items = [(b, h) for b in range(B) for h in range(heads)]

        def work(part):
            for b, h in part:
                one = [x[b:b + 1, h:h + 1].contiguous() for x in (qh, kh, vh)]   # the kernel reads dense rows
                o, l = _FLASH(*one, 0.0, False, attn_mask=mask, scale=scale)
                outh[b, h].copy_(o[0, 0])
                lseh[b, h].copy_(l[0, 0])
        run(work, split(items, config.parts_per_worker * workers), workers)
        return out, lse
    return _run_on_workers(body, q, config)


def backward(dout, q, k, v, out, lse, extent, causal: bool, scale: float, config: CpuConfig,
             opts: Options = PLAIN):
    """(dq, dk, dv) like q, k, v: the fused kernel's backward per (batch, head), split over workers."""
    def body(workers):
        q_grid, kv_grid = tuple(q.shape[1:4]), tuple(k.shape[1:4])
        mask = _mask(q_grid, kv_grid, tuple(extent), causal, q.dtype, config.mask_cache_limit, opts)
        grads = [torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in (q, k, v)]
        ins = [_heads_first(x) for x in (dout, q, k, v, out)]
        lseh = _heads_first(lse).to(torch.float32 if q.dtype != torch.float64 else torch.float64)
        outs = [_heads_first(g) for g in grads]
        items = [(b, h) for b in range(q.shape[0]) for h in range(q.shape[4])]

        def work(part):
            for b, h in part:
                one = [x[b:b + 1, h:h + 1].contiguous() for x in ins]
                res = _FLASH_BWD(*one, lseh[b:b + 1, h:h + 1], 0.0, False, attn_mask=mask, scale=scale)
                for dst, src in zip(outs, res):
                    dst[b, h].copy_(src[0, 0])
        run(work, split(items, config.parts_per_worker * workers), workers)
        return tuple(grads)
    return _run_on_workers(body, q, config)
