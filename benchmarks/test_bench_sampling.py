"""Sampling speed: KV-cached incremental decoding vs recomputing the prefix every step.

Two sizes, task t2v (a text condition, so the recompute baseline may run over
the prefix frames 0..t only -- the cheapest correct cache-free decoder):

* ``video-4x16x16``: 1,024 tokens, the shipped model's width (dim 128, 4
  decoder layers, extent (1, 3, 3));
* ``nuwa-10x21x21``: 4,410 tokens, the paper's video grid and decoder extent
  (3, 3, 3), a tiny width (dim 32, 2 heads x 16, 2 decoder layers).

The cached run samples every token end to end (``benchmark`` times it). The
recompute baseline is NOT run to the end: its cost per step grows with the
prefix, so it is timed at ``RECOMPUTE_STEPS`` positions spread evenly over the
sequence (position (i + 0.5) N / S for i < S, one timed full decoder pass each,
after one untimed warm-up pass) and the total is extrapolated as mean step
time x N, which is the midpoint-rule estimate of the sum over all N steps.
This is stated in extra_info['recompute_method'].

Peak memory is the peak increase over the phase's start: on CUDA from
``torch.cuda.max_memory_allocated``, on CPU from the process RSS polled every
millisecond after ``malloc_trim`` (glibc) returns freed heap pages to the OS
(an estimate: it includes allocator slack and misses memory reused from pages
the trim could not release).

Recorded in ``benchmark.extra_info``: tokens/s cached and recomputed
(extrapolated), speedup, peak memory of each, the number of steps timed. The
cache must be >= 10x faster at the paper's size.
"""
from __future__ import annotations

import ctypes
import gc
import os
import threading
import time

import pytest
import torch

from nuwa3dna.model.config import NuwaConfig
from nuwa3dna.model.nuwa import Nuwa
from nuwa3dna.model.sampling import recompute_logits, sample_tokens
from nuwa3dna.model.tasks import random_formation

RECOMPUTE_STEPS = 16

SIZES = {
    # 64 px / 4 = 16 x 16 tokens per frame, 4 frames; default width and depth.
    "video-4x16x16": dict(image_size=64, frames=4, min_speedup=None),
    # 84 px / 4 = 21 x 21 tokens per frame, 10 frames; the paper's decoder extent, tiny width.
    "nuwa-10x21x21": dict(image_size=84, frames=10, dim=32, heads=2, dim_head=16, enc_depth=1, dec_depth=2,
                          text_len=8, video_extent=(3, 3, 3), min_speedup=10.0),
}


class PeakMemory:
    """Peak memory increase (bytes) inside a ``with`` block: CUDA allocator stats or polled CPU RSS."""

    def __init__(self, device):
        self.device = device
        self.peak = 0

    @staticmethod
    def _rss():
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * 4096

    def _poll(self):
        while not self._stop.is_set():
            self._max = max(self._max, self._rss())
            time.sleep(0.001)

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
        else:
            # Hand freed heap back to the OS first, else a phase reuses the previous phase's pages
            # and its RSS does not grow (measured: 0.0 MiB for the 2.2 MiB KV cache without this).
            gc.collect()
            try:
                ctypes.CDLL("libc.so.6").malloc_trim(0)
            except OSError:
                pass
            self._start = self._max = self._rss()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self._start
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self._max, self._rss()) - self._start


def _formation(task, config, device, seed):
    f, _ = random_formation(task, config, 1, torch.Generator().manual_seed(seed))
    return type(f)(f.task, f.text_ids.to(device), f.vis_ids.to(device), f.out_grid, f.given.to(device),
                   f.given_mask.to(device))


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("size", list(SIZES))
def test_bench_sampling_cache_vs_recompute(benchmark, size):
    spec = dict(SIZES[size])
    min_speedup = spec.pop("min_speedup")
    config = NuwaConfig(**spec)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    nuwa = Nuwa(config=config).to(device).eval()
    f = _formation("t2v", config, device, 0)
    T, H, W = f.out_grid
    N = T * H * W

    # ---- cached: the whole sequence, end to end ------------------------------------
    def run_cached():
        _sync(device)
        out = sample_tokens(nuwa, f, generator=torch.Generator(device=device).manual_seed(0))
        _sync(device)
        return out

    # Warm-up (untimed, unmeasured): one image-sized run through the same code, so lazy library
    # initialisation is not billed to the cached run (measured: 162 MiB "peak" without it).
    sample_tokens(nuwa, _formation("t2i", config, device, 1))

    with PeakMemory(device) as mem_cached:
        tokens = benchmark.pedantic(run_cached, rounds=1, iterations=1, warmup_rounds=0)
    cached_s = benchmark.stats.stats.mean

    # ---- recompute: RECOMPUTE_STEPS timed steps, extrapolated -------------------------
    threads = torch.get_num_threads()
    torch.set_num_threads(1)      # the same thread count the cached sampler runs with on CPU
    try:
        with torch.no_grad():
            text_mem, vis_mem = nuwa.encode(f)
            flat = tokens.reshape(1, N)
            recompute_logits(nuwa, f.task, f.out_grid, text_mem, vis_mem, flat, N // 2)   # warm-up
        with torch.no_grad(), PeakMemory(device) as mem_recompute:
            step_times = []
            for i in range(RECOMPUTE_STEPS):
                p = int((i + 0.5) * N / RECOMPUTE_STEPS)
                _sync(device)
                t0 = time.perf_counter()
                recompute_logits(nuwa, f.task, f.out_grid, text_mem, vis_mem, flat, p)
                _sync(device)
                step_times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    recompute_s = sum(step_times) / len(step_times) * N
    speedup = recompute_s / cached_s
    benchmark.extra_info.update({
        "size": size, "grid": [T, H, W], "tokens": N, "dim": config.dim, "dec_depth": config.dec_depth,
        "video_extent": list(config.video_extent), "device": str(device),
        "cached_s": cached_s, "cached_tokens_per_s": N / cached_s,
        "recompute_s_extrapolated": recompute_s, "recompute_tokens_per_s": N / recompute_s,
        "recompute_steps_timed": RECOMPUTE_STEPS,
        "recompute_method": (f"{RECOMPUTE_STEPS} decoder passes over the prefix frames at evenly spread "
                             f"positions, mean x {N} steps"),
        "speedup": speedup,
        "cpu_threads": 1 if device.type == "cpu" else None,
        "load_average_1min": os.getloadavg()[0],      # other jobs on shared cores slow both phases
        "peak_mem_cached_bytes": mem_cached.peak, "peak_mem_recompute_bytes": mem_recompute.peak,
    })
    print(f"\n{size}: cached {N / cached_s:.0f} tok/s, recompute {N / recompute_s:.1f} tok/s "
          f"(extrapolated from {RECOMPUTE_STEPS} steps), speedup {speedup:.1f}x, peak mem cached "
          f"{mem_cached.peak / 2**20:.1f} MiB, recompute {mem_recompute.peak / 2**20:.1f} MiB")
    assert tokens.shape == (1, T, H, W)
    if min_speedup is not None:
        assert speedup >= min_speedup, f"KV cache only {speedup:.1f}x faster than recomputing at {size}"
