"""The ahead-of-time GPU report (kernels/report.py): every kernel compiles for
sm_90 and sm_80 with the launchers' own configurations, without spills, and the
matmul kernels use wgmma on sm_90 in 16-bit dtypes.

Runs ``python -m nuwa3dna.kernels.report --quick --json`` in a subprocess with
the interpreter off (tests/conftest.py turns it on for this process, and
interpreted kernels cannot be compiled). ``--quick`` covers the gpu-large
workload at head dims 64 and 128 in fp16, bf16 and fp32; the full table (head
dims 32..256, causal nuwa-video too) is ``python -m nuwa3dna.kernels.report``.
Compiles are cached by Triton (and ptxas results by the report), so only the
first run pays the ~2 minutes of compilation.

Untested: that a GPU driver reports the same registers (no GPU in CI).
"""
import json
import os
import subprocess
import sys

import pytest

MATMUL_KERNELS = ("fwd", "dq", "dkdv")


@pytest.fixture(scope="module")
def rows():
    env = dict(os.environ, TRITON_INTERPRET="0")
    res = subprocess.run([sys.executable, "-m", "nuwa3dna.kernels.report", "--quick", "--json"],
                         env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_every_kernel_compiled(rows):
    seen = {(r["kernel"].split(":")[0], r["D"], r["dtype"], r["arch"]) for r in rows}
    for kernel in (*MATMUL_KERNELS, "preprocess"):
        for D in (64, 128):
            for dtype in ("fp16", "bf16", "fp32"):
                for arch in ("sm_90", "sm_80"):
                    assert (kernel, D, dtype, arch) in seen


def test_no_spills_and_shared_memory_fits(rows):
    spilled = [r for r in rows if r["spills"] != 0]
    assert not spilled, spilled
    assert all(0 < r["regs"] <= 255 for r in rows)
    assert all(r["smem_ok"] for r in rows), [r for r in rows if not r["smem_ok"]]


def test_wgmma_on_sm90_for_16bit(rows):
    for r in rows:
        if r["arch"] == "sm_90" and r["dtype"] in ("fp16", "bf16") and r["kernel"] in MATMUL_KERNELS:
            assert r["wgmma"], r
        if r["arch"] == "sm_80":
            assert not r["wgmma"], r   # sanity: sm_80 has no wgmma


def test_report_uses_the_launch_configs(rows):
    """The table's warps/stages/tiles are the launchers' choice (one function picks both)."""
    from nuwa3dna.kernels.triton.configs import pick_configs
    from nuwa3dna.problems import WORKLOADS

    import torch
    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    p = WORKLOADS["gpu-large"]
    for r in rows:
        c = pick_configs(p.q_grid, p.kv, p.resolved_extent, r["D"], dtypes[r["dtype"]],
                         int(r["arch"][3:]))[r["kernel"].split(":")[0]]
        assert (r["num_warps"], r["num_stages"]) == (c.num_warps, c.num_stages)
        if r["kernel"] != "preprocess":
            assert r["tiles"] == "x".join(map(str, c.q_tile)) + "/" + "x".join(map(str, c.k_tile))
