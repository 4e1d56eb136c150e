"""Run one timed benchmark case in a fresh Python process.

Why a process per case
----------------------
The suite used to time every case inside the pytest process, one after the
other. Peers leave state behind that slows whatever runs next: compiled
FlexAttention (torch.compile / inductor) leaves its compile worker pool and
an OpenMP thread team, plus its compile caches (as reported before this
change); the CPU tile path keeps its worker threads and scratch buffers
(docs/design.md section 4); every big case leaves its freed heap to the
allocator. On 2 shared cores those extra threads compete with the case being timed. The
symptom was the cost growth cpu-mid-4x / cpu-mid: 5.41x inside the suite,
4.47x for the same two calls in a fresh process. So every case -- the peers
and ours alike, for fairness -- now runs in its own ``python -m
benchmarks.isolated`` process that imports only what the case needs, builds
its inputs, warms up (compiles), times, prints the per-round times as JSON and
exits; no case inherits another's threads, caches, heap or compiled code. The
on-disk inductor cache still makes FlexAttention's warm-up compile faster
after the first process, but the warm-up is never timed.

OpenMP spin policy. Every case runs with ``OMP_WAIT_POLICY=PASSIVE`` (unless
the caller's environment sets it). Isolation exposed why (benchmarks/NOTES.md,
"Isolated cases"): in a fresh process dense SDPA at model-text (fwd) took
8-16 ms; the same call after one call of our tile path in that process
0.5-0.8 ms, and with PASSIVE from the start 0.6-1.7 ms (nuwa-image: 116-248
ms vs 13-30 ms). Likely cause: libgomp lets a thread waiting at a barrier
spin first, and on 2 cores shared with other jobs the spinning thread holds
the core its partner needs; starting our worker pool gives the process more
OpenMP threads than cores, so libgomp throttles its spinning for everything
after it. So in the old single-process suite whichever case ran first
decided the spin policy of the rest, and with
isolation alone every dense/Flex row would pay the spin penalty that our path
(single-threaded ops on its own workers) avoids, inflating our ratios. PASSIVE
gives every process the same policy; our path's own time did not move with it
(cpu-mid fwd 303-381 ms either way, within noise).

Protocol: ``python -m benchmarks.isolated '<json spec>'`` prints one line
``BENCH_RESULT {json}`` (last line of stdout); anything else on stdout/stderr
is ignored unless the process fails. Spec keys:

* ``kind``: ``"case"`` (default) or ``"matmul"`` (the fp32 matmul yardstick);
* ``problem``: ``benchmarks.workloads.problem_to_json`` of the (scaled) problem;
* ``backend``: ``torch``/``triton``/``auto`` (the public API
  ``nuwa3dna.nearby_attention``, ``dense`` too), or a peer of benchmarks/peers.py;
* ``direction``: ``fwd`` (under no_grad) or ``fwdbwd`` (forward + autograd.grad
  of q, k, v with a fixed upstream gradient);
* ``device``, ``dtype``; ``min_rounds``, ``warmup``, ``budget_s``, ``max_rounds``:
  after one untimed warm-up call, ``warmup`` more untimed calls (at least 3
  when a call takes < 0.5 s; with ``warmup`` 0 the second call is the first
  timed round), then ``clamp(budget_s / t_call, min_rounds, max_rounds)``
  timed rounds, so millisecond cases get enough rounds for a stable median
  and multi-second peers stay at ``min_rounds``;
* ``paired`` (optional): other backends timed in the same process, interleaved
  round by round with the case's own backend (order rotated each round), so
  they see the same load; used for ``auto`` against the single backends it
  chooses between (``auto / best, paired``). Consecutive processes on this
  shared machine differed by up to 2.6x for the same code (other jobs, and
  the tile path sizes its worker pool by the load average), far more than
  the 5% that question needs; interleaving in one process cancels that. Those are all our own API paths
  (no compiler threads), so the pairing does not undo the isolation from peers.

The parent (benchmarks/test_bench_attention.py) calls :func:`run_case` and
feeds the times to pytest-benchmark (:func:`record_times`).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

MARK = "BENCH_RESULT "
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------ parent side

def omp_wait_policy() -> str:
    """The OMP_WAIT_POLICY every case runs with: the caller's if set, else PASSIVE."""
    return os.environ.get("OMP_WAIT_POLICY", "PASSIVE")


def run_case(spec: dict, timeout: float = 1200) -> dict:
    """Run ``spec`` in a fresh interpreter; returns its JSON result."""
    cmd = [sys.executable, "-m", "benchmarks.isolated", json.dumps(spec)]
    env = dict(os.environ, OMP_WAIT_POLICY=omp_wait_policy())
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    lines = [l for l in res.stdout.splitlines() if l.startswith(MARK)]
    if res.returncode != 0 or not lines:
        raise RuntimeError(f"isolated case failed (rc {res.returncode}): {spec.get('backend')} "
                           f"{spec.get('direction')}\n{res.stderr[-3000:]}")
    return json.loads(lines[-1][len(MARK):])


def record_times(benchmark, times) -> None:
    """Hand round times measured elsewhere to pytest-benchmark, as if it had timed them.

    pytest-benchmark 5 has no public way to add external timings; this uses the
    same two internals ``benchmark.pedantic`` uses (``_make_stats``,
    ``_mode``), so its table, ``--benchmark-json`` and comparisons work.
    """
    if not benchmark.enabled:
        return
    benchmark._mode = "benchmark.pedantic(...)"     # marks the fixture as used
    stats = benchmark._make_stats(1)
    for t in times:
        stats.update(t)


# ------------------------------------------------------------------ child side

def _make_fn(backend, p, device):
    import torch
    from benchmarks import peers
    from nuwa3dna import nearby_attention
    if backend in ("torch", "triton", "auto"):
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


def _os_threads() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    return -1


def _matmul(spec) -> dict:
    import torch
    n = spec.get("n", 2048)
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(2):
        torch.mm(a, b)
    ts = []
    for _ in range(spec.get("rounds", 7)):
        t0 = time.perf_counter()
        torch.mm(a, b)
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return {"gflops": 2 * n ** 3 / ts[len(ts) // 2] / 1e9, "times": ts,
            "threads": torch.get_num_threads()}


def _case(spec) -> dict:
    import torch
    from benchmarks.workloads import problem_from_json

    p = problem_from_json(spec["problem"])
    backend, direction, device = spec["backend"], spec["direction"], spec["device"]
    dtype = getattr(torch, spec.get("dtype", "float32"))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    q, k, v = p.make(dtype=dtype, device=device, requires_grad=direction == "fwdbwd",
                     generator=torch.Generator().manual_seed(0))
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)

    def make_run(b):
        fn = _make_fn(b, p, device)
        if direction == "fwd":
            def run():
                with torch.no_grad():
                    fn(q, k, v)
        else:
            def run():
                out = fn(q, k, v)
                torch.autograd.grad(out, (q, k, v), dout)

        def timed():
            sync()
            t0 = time.perf_counter()
            run()
            sync()
            return time.perf_counter() - t0
        return timed

    names = [backend] + [b for b in spec.get("paired", []) if b != backend]
    runs = {b: make_run(b) for b in names}
    load_start = os.getloadavg()[0]
    first, est, times = {}, {}, {b: [] for b in names}
    for b in names:
        first[b] = runs[b]()                     # compile / lazy init / caches: never timed
        warmup = spec.get("warmup", 1)
        if first[b] < 0.5:
            warmup = max(warmup, 3)
        est[b] = first[b]
        for _ in range(warmup):
            est[b] = runs[b]()
        if warmup == 0:                          # slow peers: the call after the first is round 1
            times[b].append(runs[b]())
            est[b] = times[b][0]
    per_round = sum(est.values())
    rounds = int(min(spec.get("max_rounds", 200),
                     max(spec.get("min_rounds", 3), spec.get("budget_s", 2.0) // max(per_round, 1e-6))))
    for i in range(max(rounds - min(len(t) for t in times.values()), 0)):
        # Interleaved, order rotated each round: paired backends see the same load.
        for j in range(len(names)):
            b = names[(i + j) % len(names)]
            if len(times[b]) < rounds:
                times[b].append(runs[b]())
    out = {"times": times[backend], "first_call_s": first[backend], "rounds": rounds,
           "threads": torch.get_num_threads(), "os_threads_after": _os_threads(),
           "loadavg_start": load_start, "loadavg_end": os.getloadavg()[0], "pid": os.getpid()}
    if len(names) > 1:
        out["paired"] = {b: times[b] for b in names}
    if backend == "auto":
        from nuwa3dna.dispatch import choose_backend
        from nuwa3dna.kernels.geometry import resolve_extent
        choice, why = choose_backend(q, k, resolve_extent(p.extent, p.kv), p.causal)
        out.update(auto_choice=choice, auto_reason=why)
    return out


def main(argv) -> int:
    spec = json.loads(argv[0])
    result = _matmul(spec) if spec.get("kind") == "matmul" else _case(spec)
    sys.stdout.write(MARK + json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
