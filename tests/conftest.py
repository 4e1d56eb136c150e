"""Test setup: the Triton interpreter must be on before any kernel is defined,
so it is set here, before the package is imported (CPU-only machines)."""
import os
import subprocess
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture
def gen():
    """A fresh, seeded generator per test: inputs are random but reproducible."""
    return torch.Generator().manual_seed(0)


@pytest.fixture
def one_thread():
    """Tiny model shapes: on 2 shared cores extra intra-op threads only add barrier
    waits (measured 0.11 s vs 0.02 s per tiny training step with 2 vs 1 threads)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def app_config():
    """Factory of the tiny NuwaConfig of the command-line and training tests
    (tests/test_cli.py, tests/test_ddp.py): the shipped frame sizes (32 px, 4
    frames) with dim 32 and one layer per stack; keyword arguments override fields."""
    from nuwa3dna.model.config import NuwaConfig
    base = dict(dim=32, enc_depth=1, dec_depth=1, heads=2, dim_head=16, vq_hidden=16, vq_codebook_size=32,
                vq_codebook_dim=8, sketch_hidden=8, sketch_codebook_size=16, sketch_codebook_dim=8,
                v2v_given_frames=2)
    return lambda **overrides: NuwaConfig(**{**base, **overrides})


# 16-row tiles: many tiles per axis, so the causal skips and edges are exercised.
SMALL_TILES = {
    "fwd": ((2, 2, 4), (1, 2, 8)), "dq": ((1, 4, 4), (1, 4, 4)), "dkdv": ((1, 2, 8), (2, 2, 4)),
}


@pytest.fixture
def small_tiles(monkeypatch):
    """Call with True to make the Triton launchers use 16-row tiles (SMALL_TILES), so every
    axis has several tiles: loop bounds, causal skips and the query-range inversion run."""
    def force(on: bool = True):
        if not on:
            return
        import dataclasses

        from nuwa3dna.kernels.triton import configs
        real = configs.pick_configs

        def small(*args, **kwargs):
            cfgs = dict(real(*args, **kwargs))
            for kind, (qt, kt) in SMALL_TILES.items():
                cfgs[kind] = dataclasses.replace(cfgs[kind], q_tile=qt, k_tile=kt)
            return cfgs
        monkeypatch.setattr(configs, "pick_configs", small)
    return force


# The CPU backend's two strategies, forced through its frozen default config.
CPU_STRATEGIES = {"tiles": dict(fused_max_scores=0, fused_max_scores_wide=0),
                  "fused": dict(fused_max_scores=1 << 40)}


@pytest.fixture(params=list(CPU_STRATEGIES))
def strategy(request, monkeypatch):
    """Run the test with the CPU backend forced to one strategy (tile loops or fused kernel)."""
    import dataclasses

    from nuwa3dna.kernels.cpu import planner
    monkeypatch.setattr(planner, "DEFAULT", dataclasses.replace(planner.DEFAULT, **CPU_STRATEGIES[request.param]))
    return request.param


@pytest.fixture(scope="session")
def run_compiled():
    """``run(*args, timeout=600, ok=(0,))``: ``python *args`` in a fresh process with the
    Triton interpreter off (ahead-of-time compiles need real ``@triton.jit`` kernels, and
    this process has the interpreter on); checks the exit status is in ``ok`` and returns
    stdout."""
    def run(*args, timeout=600, ok=(0,)):
        env = dict(os.environ, TRITON_INTERPRET="0")
        res = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout)
        assert res.returncode in ok, res.stderr[-4000:]
        return res.stdout
    return run
