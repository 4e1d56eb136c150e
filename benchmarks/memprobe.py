"""Peak memory of one 3DNA call, measured in a fresh process.

``python -m benchmarks.memprobe WORKLOAD T H W DIRECTION BACKEND`` prints JSON
{"peak_mb": ...}: the process's peak resident set (VmHWM, reset just before
the call) after one call minus its resident set just before it, after inputs are built and a tiny
warm-up call has loaded every library. It counts everything the call touches
(outputs, gradients, temporaries, the torch path's scratch buffers), not just
tensors, and needs no allocator hooks: tracemalloc does not see torch.
(T H W divide the workload's grid, as Problem.scaled; WORKLOAD is a shared
named workload or one of the model's layer sizes, benchmarks/workloads.py.)
"""
from __future__ import annotations

import json
import resource
import subprocess
import sys


def _maxrss_mb() -> float:
    # VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss across execve,
    # so a child of a big pytest process would report the parent's size.
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0); harmless where refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2 ** 20


def probe(workload: str, scale, direction: str, backend: str, timeout: float = 300) -> float:
    """Run this module in a subprocess; returns the peak growth in MiB."""
    cmd = [sys.executable, "-m", "benchmarks.memprobe", workload, *map(str, scale), direction, backend]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                         cwd=__file__.rsplit("/benchmarks/", 1)[0])
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-2000:])
    return json.loads(res.stdout.strip().splitlines()[-1])["peak_mb"]


def main(argv):
    workload, t, h, w, direction, backend = argv
    import torch
    from nuwa3dna import nearby_attention
    from benchmarks.workloads import ALL_WORKLOADS
    from nuwa3dna.problems import Problem

    def call(p, backend=backend):
        grad = direction == "fwdbwd"
        q, k, v = p.make(requires_grad=grad)
        _reset_peak()
        base = _rss_mb()
        out = nearby_attention(q, k, v, p.extent, causal=p.causal, backend=backend)
        if grad:
            out.backward(torch.ones_like(out))
        return base

    full = ALL_WORKLOADS[workload]
    tiny = Problem(1, (2, 3, 3), full.heads, full.D, full.extent, full.causal,
                   None if full.kv_grid is None else (2, 2, 2))
    # Load every library the call may use: auto may pick a backend the tiny call does not.
    for b in (["torch", "dense"] if backend == "auto" else [backend]):
        call(tiny, b)
    p = full.scaled(int(t), int(h), int(w))
    base = call(p)
    print(json.dumps({"peak_mb": _maxrss_mb() - base}))


if __name__ == "__main__":
    main(sys.argv[1:])
