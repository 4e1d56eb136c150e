"""3DNA speed: our backends vs peers on every named workload (SPEC.md section 3).

Run: ``pytest benchmarks/ --benchmark-only`` (about 10 minutes on 2 busy cores).

Cases are ordered so that, per workload and direction, the peers run before
ours; our cases divide the peers' median times from the same session
(``ratio_vs_<peer>`` = peer time / our time, > 1 means we are faster).

CPU: float32, the threads torch has (2 here). Workloads too big for 2 cores
are divided per axis with Problem.scaled (CPU_SCALE, recorded as ``scale``).
Peers skip where they cannot run: dense needs a (queries x keys) mask and
scores, so it skips above DENSE_MAX_PAIRS; unfold materialises every window
(limits below); FlexAttention has no CPU backward; NATTEN only if importable.
GPU (bfloat16, CUDA only, skipped otherwise): triton vs compiled Flex (block
mask cached), masked SDPA and unmasked SDPA (FlashAttention, the "dense
FlashAttention" bar), compile excluded by warm-up, timed with synchronize.

Peak memory (``peak_mb``) of our CPU cases comes from benchmarks/memprobe.py:
a fresh process's peak RSS minus its RSS before the call (getrusage).
"""
from __future__ import annotations

import pytest
import torch

from benchmarks import peers
from benchmarks.conftest import median_time
from nuwa3dna import nearby_attention
from nuwa3dna.problems import WORKLOADS

# gpu-large (2 x 16x48x48 tokens x 16 heads) is 36x cpu-mid's work: on CPU its
# grid is divided by (2, 3, 3) to (8, 16, 16), as much work as cpu-mid.
CPU_SCALE = {"gpu-large": (2, 3, 3)}
DENSE_MAX_PAIRS = 1 << 28            # (B*Nq*Nk): cpu-mid is 6.7e7; cpu-mid-4x (1.1e9) skips
UNFOLD_MAX_BYTES = {"fwd": 1.5e9, "fwdbwd": 3e9}   # per head (fwd) / kept for autograd (fwdbwd)
HAS_CUDA = torch.cuda.is_available()


def _problem(name, device):
    p = WORKLOADS[name]
    scale = CPU_SCALE.get(name, (1, 1, 1)) if device == "cpu" else (1, 1, 1)
    return p.scaled(*scale), scale


def _tokens(grid):
    return grid[0] * grid[1] * grid[2]


def _skip_reason(backend, p, direction, device):
    nq, nk = _tokens(p.q_grid), _tokens(p.kv)
    if backend == "dense" and p.B * nq * nk > DENSE_MAX_PAIRS and device == "cpu":
        return f"dense needs a {nq}x{nk} mask and scores per head: too big for this machine"
    if backend == "flex" and direction == "fwdbwd" and device == "cpu":
        return "FlexAttention has no CPU backward"
    if backend == "unfold":
        why = peers.unfold_supported(p)
        if why:
            return why
        J = 1
        for e in p.resolved_extent:
            J *= 2 * e + 1
        per_head = 2 * p.B * nq * J * p.D * 4
        need = per_head if direction == "fwd" else per_head * p.heads
        if need > UNFOLD_MAX_BYTES[direction]:
            return f"unfold windows need {need / 1e9:.1f} GB (> {UNFOLD_MAX_BYTES[direction] / 1e9:.1f})"
    if backend == "natten" and not peers.natten_available():
        return "NATTEN is not importable"
    return None


# Rounds per backend: slow peers get few.
ROUNDS = {"torch": 5, "triton": 20, "dense": 2, "flex": 3, "unfold": 2, "natten": 5, "sdpa-full": 20}

CPU_BACKENDS = ["dense", "unfold", "flex", "natten", "torch"]
GPU_BACKENDS = ["dense", "sdpa-full", "flex", "natten", "triton"]
OURS = ("torch", "triton")

CASES = []
for _name in WORKLOADS:
    for _dir in ("fwd", "fwdbwd"):
        for _b in CPU_BACKENDS:
            CASES.append(pytest.param(_name, _dir, _b, "cpu", id=f"cpu-{_name}-{_dir}-{_b}"))
for _name in ("gpu-large", "nuwa-video", "cpu-mid", "cross-sketch"):
    for _dir in ("fwd", "fwdbwd"):
        for _b in GPU_BACKENDS:
            CASES.append(pytest.param(_name, _dir, _b, "cuda", id=f"gpu-{_name}-{_dir}-{_b}",
                                      marks=pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")))


def _fn(backend, p, device):
    if backend in OURS:
        return lambda q, k, v: nearby_attention(q, k, v, p.extent, causal=p.causal, backend=backend)
    if backend == "dense":
        return peers.dense(p)
    if backend == "flex":
        return peers.flex(p, device)
    if backend == "unfold":
        return peers.unfold(p)
    if backend == "natten":
        return peers.natten(p)
    if backend == "sdpa-full":
        def full(q, k, v):
            qh, kh, vh = (x.flatten(1, 3).transpose(1, 2) for x in (q, k, v))
            o = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, is_causal=p.causal)
            return o.transpose(1, 2).reshape(q.shape)
        return full
    raise ValueError(backend)


def _callable(backend, p, direction, device, dtype):
    q, k, v = p.make(dtype=dtype, device=device, requires_grad=direction == "fwdbwd",
                     generator=torch.Generator().manual_seed(0))
    fn = _fn(backend, p, device)
    if direction == "fwd":
        def run():
            with torch.no_grad():
                return fn(q, k, v)
    else:
        dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)

        def run():
            out = fn(q, k, v)
            return torch.autograd.grad(out, (q, k, v), dout)
    return run


@pytest.mark.parametrize("name,direction,backend,device", CASES)
def test_attention(benchmark, registry, matmul_rate, name, direction, backend, device):
    p, scale = _problem(name, device)
    why = _skip_reason(backend, p, direction, device)
    if why:
        pytest.skip(why)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    sync = torch.cuda.synchronize if device == "cuda" else None
    run = _callable(backend, p, direction, device, dtype)
    run()                                    # compile / warm caches outside the timing
    rounds = ROUNDS[backend]
    warmup = 1 if backend in ("torch", "triton", "sdpa-full") else 0   # slow peers: run() warmed them

    def timed():
        out = run()
        if sync:
            sync()
        return out
    benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=warmup)
    t = benchmark.stats.stats.median
    flops = p.flops(backward=direction == "fwdbwd")
    rec = {"workload": name, "problem": p.id, "scale": list(scale), "direction": direction,
           "backend": backend, "device": device, "dtype": str(dtype).replace("torch.", ""),
           "median_ms": t * 1e3, "gflops": flops / t / 1e9, "rounds": rounds}
    if device == "cpu":
        rec["pct_of_matmul"] = 100 * flops / t / 1e9 / matmul_rate
        rec["matmul_gflops"] = matmul_rate
    if backend in OURS:
        peer_list = CPU_BACKENDS if device == "cpu" else GPU_BACKENDS
        for peer in peer_list:
            if peer in OURS:
                continue
            other = registry.get(name, direction, device, peer)
            if other is not None:
                rec[f"ratio_vs_{peer}"] = other["median_ms"] / rec["median_ms"]
        if device == "cpu":
            from benchmarks.memprobe import probe
            try:
                rec["peak_mb"] = probe(name, scale, direction, backend)
            except Exception as e:            # a probe failure must not hide the timing
                rec["peak_mb_error"] = str(e)[-300:]
    registry.add(name, direction, device, backend, rec)
    benchmark.extra_info.update(rec)
