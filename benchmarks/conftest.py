"""Benchmark session plumbing (run: ``pytest benchmarks/ --benchmark-only``).

Unlike tests/conftest.py this does NOT set TRITON_INTERPRET: benchmarks time
real kernels (GPU cases skip without CUDA).

* ``registry``: one record per case (median seconds, useful GFLOP/s, ...), so
  our cases can divide peer timings measured earlier in the same session.
* ``matmul_rate``: float32 torch.mm 2048x2048 GFLOP/s, measured once per session,
  in a fresh process like every timed case (benchmarks/isolated.py).
* At the end the records go to benchmarks/results.json and the markdown table
  (benchmarks/summary.py) is printed; ``python -m benchmarks.summary`` reprints it.
  A partial run (``-k``) replaces the file with its own rows: rows of different
  sessions are not comparable on a shared machine, so they are never merged.
"""
from __future__ import annotations

import json
import os
import time

import pytest
import torch

RESULTS = os.path.join(os.path.dirname(__file__), "results.json")


class Registry:
    def __init__(self):
        self.records = {}
        self.meta = {"torch": torch.__version__, "threads": torch.get_num_threads(),
                     "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                     "isolated": True, "loadavg_start": list(os.getloadavg()),
                     "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}

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


@pytest.fixture(scope="session")
def matmul_rate():
    """float32 matmul GFLOP/s on this machine now (CPU), the yardstick of the FLOP-rate target."""
    from benchmarks.isolated import omp_wait_policy, run_case
    rate = run_case({"kind": "matmul", "n": 2048, "rounds": 7})["gflops"]
    _REGISTRY.meta["omp_wait_policy"] = omp_wait_policy()
    _REGISTRY.meta["matmul_gflops_cpu_fp32"] = rate
    return rate


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _REGISTRY.records:
        return
    _REGISTRY.meta["loadavg_end"] = list(os.getloadavg())
    _REGISTRY.meta["ended"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    data = {"meta": _REGISTRY.meta, "records": dict(_REGISTRY.records)}
    with open(RESULTS, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    from benchmarks.summary import render
    terminalreporter.write_line("")
    terminalreporter.write_line(render(data))
