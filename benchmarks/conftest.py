"""Benchmark session plumbing (run: ``pytest benchmarks/ --benchmark-only``).

Unlike tests/conftest.py this does NOT set TRITON_INTERPRET: benchmarks time
real kernels (GPU cases skip without CUDA).

* ``registry``: one record per case (median seconds, useful GFLOP/s, ...), so
  our cases can divide peer timings measured earlier in the same session.
* ``matmul_rate``: float32 torch.mm 2048x2048 GFLOP/s, measured once per session.
* At the end the records go to benchmarks/results.json and the markdown table
  (benchmarks/summary.py) is printed; ``python -m benchmarks.summary`` reprints it.
"""
from __future__ import annotations

import json
import os
import statistics
import time

import pytest
import torch

RESULTS = os.path.join(os.path.dirname(__file__), "results.json")


class Registry:
    def __init__(self):
        self.records = {}
        self.meta = {"torch": torch.__version__, "threads": torch.get_num_threads(),
                     "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}

    def key(self, workload, direction, device, backend):
        return f"{workload}|{direction}|{device}|{backend}"

    def add(self, workload, direction, device, backend, record):
        self.records[self.key(workload, direction, device, backend)] = record

    def get(self, workload, direction, device, backend):
        return self.records.get(self.key(workload, direction, device, backend))


_REGISTRY = Registry()


@pytest.fixture(scope="session")
def registry():
    return _REGISTRY


def median_time(fn, rounds: int, warmup: int = 1, sync=None) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(rounds):
        if sync:
            sync()
        t = time.perf_counter()
        fn()
        if sync:
            sync()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


@pytest.fixture(scope="session")
def matmul_rate():
    """float32 matmul GFLOP/s on this machine now (CPU), the yardstick of the FLOP-rate target."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    t = median_time(lambda: torch.mm(a, b), rounds=7, warmup=2)
    rate = 2 * 2048 ** 3 / t / 1e9
    _REGISTRY.meta["matmul_gflops_cpu_fp32"] = rate
    return rate


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _REGISTRY.records:
        return
    # Merge with earlier results so a partial run (-k) keeps the other rows.
    data = {"meta": _REGISTRY.meta, "records": dict(_REGISTRY.records)}
    with open(RESULTS, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    from benchmarks.summary import render
    terminalreporter.write_line("")
    terminalreporter.write_line(render(data))
