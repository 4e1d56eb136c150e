"""The ahead-of-time GPU report (kernels/report.py): every kernel compiles for
every architecture family (sm_80, 86, 89, 90, 100, 120) with the launchers'
own configurations, without spills and within the family's shared memory per
block, and the matmul kernels use the family's matrix instructions.

Runs ``python -m nuwa3dna.kernels.report --quick --json`` in a subprocess with
the interpreter off (tests/conftest.py turns it on for this process, and
interpreted kernels cannot be compiled). ``--quick`` covers the gpu-large
workload at head dims 64 and 128, the long-axis grid (int64 window
arithmetic) at 64 and the table path of the v2 window options (cpu-mid-dilation,
nuwa-video-stride: raster causal) at 64, and gpu-large with 2 kv heads and a relative
position bias (the GROUPED and HAS_BIAS kernels) at 64, in fp16, bf16 and fp32, and gpu-large at 64
with float32 on TF32 tensor cores; the full table
(head dims 16..256, causal nuwa-video, the table path at 64..256) is
``python -m nuwa3dna.kernels.report``. Compiles are
cached by Triton (and ptxas results by the report), so only the first run
pays the few minutes of compilation.

Untested: that a GPU driver reports the same registers (no GPU in CI).
"""
import json
import math

import pytest
import torch

from nuwa3dna.kernels.triton import configs
from nuwa3dna.kernels.triton.tables import LAUNCH_TABLES, SMEM_PER_BLOCK, WINDOW_LAUNCH_TABLES
from nuwa3dna.kernels.windows import Options

TABLE_WORKLOADS = ("cpu-mid-dilation", "nuwa-video-stride")

MATMUL_KERNELS = ("fwd", "dq", "dkdv")
ARCHS = ("sm_80", "sm_86", "sm_89", "sm_90", "sm_100", "sm_120")


@pytest.fixture(scope="module")
def rows(run_compiled):
    out = run_compiled("-m", "nuwa3dna.kernels.report", "--quick", "--json", timeout=1800, ok=(0, 1))
    return json.loads(out.strip().splitlines()[-1])


def test_every_kernel_compiled(rows):
    seen = {(r["workload"], r["kernel"].split(":")[0], r["D"], r["dtype"], r["arch"]) for r in rows}
    for wl, D in (("gpu-large", 64), ("gpu-large", 128), ("long-axis", 64), ("cpu-mid-dilation", 64),
                  ("nuwa-video-stride", 64), ("gpu-large+kv2-bias", 64)):
        for kernel in (*MATMUL_KERNELS, "preprocess"):
            for dtype in ("fp16", "bf16", "fp32"):
                for arch in ARCHS:
                    assert (wl, kernel, D, dtype, arch) in seen
    assert all(("gpu-large", kernel, 64, "tf32", arch) in seen for kernel in MATMUL_KERNELS for arch in ARCHS)
    assert all(r["wide_idx"] == (r["workload"] == "long-axis") for r in rows if r["kernel"] != "preprocess")
    assert all(r["tables"] == (r["workload"] in TABLE_WORKLOADS) for r in rows if r["kernel"] != "preprocess")


def test_no_spills_and_shared_memory_fits(rows):
    spilled = [r for r in rows if r["spills"] != 0]
    assert not spilled, spilled
    assert all(0 < r["regs"] <= 255 for r in rows)
    assert all(r["smem_limit"] == SMEM_PER_BLOCK[r["family"]] for r in rows)
    assert all(r["smem_ok"] for r in rows), [r for r in rows if not r["smem_ok"]]


def test_matrix_instructions(rows):
    """16-bit dots: wgmma on sm_90 and tcgen05 on sm_100 (except the 32-row dK/dV passes
    at head dim 256: mma.sync), mma.sync on sm_80/86/89/120; float32 dots are exact FMAs,
    or tensor-core MMAs with PyTorch's TF32 setting ("tf32" rows)."""
    for r in rows:
        if r["kernel"] == "preprocess" or r["dtype"] == "fp32":
            assert r["mma"] == "none", r
        elif r["dtype"] == "tf32":   # float32 on TF32 tensor cores: 16-32-row tiles, mostly mma.sync
            assert r["mma"] in ("mma.sync", "tcgen05"), r
        elif r["arch"] == "sm_100" and ":" not in r["kernel"]:
            # tcgen05 wants >= 64 rows per program: the 32-row tiles (dK/dV at head dim 256,
            # the halved bias tiles of configs._bias_rows) fall back to mma.sync
            assert r["mma"] == ("tcgen05" if _program_rows(r) >= 64 else "mma.sync"), r
        elif r["arch"] == "sm_90" and ":" not in r["kernel"]:
            assert r["mma"] == "wgmma", r
        else:
            assert r["mma"] == "mma.sync", r


def _program_rows(r) -> int:
    """Rows one program owns: its query tile (fwd, dq) or key tile (dkdv), from the "q/k" tiles column."""
    q, k = (math.prod(int(x) for x in t.split("x")) for t in r["tiles"].split("/"))
    return k if r["kernel"].startswith("dkdv") else q


def test_report_uses_the_launch_configs(rows):
    """The table's warps/stages/tiles are the launchers' choice (one function picks both)."""
    from nuwa3dna.kernels.report import variant

    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "tf32": torch.float32}
    for r in rows:
        p, _, bias_shape = variant(r["workload"])       # "base+variant": bias tiles (configs._bias_rows)
        cfgs = configs.pick_configs(p.q_grid, p.kv, p.resolved_extent, r["D"], dtypes[r["dtype"]],
                                    int(r["arch"][3:]), p.causal is True, Options.of(p.causal, **p.options),
                                    bias=bias_shape is not None, tf32=r["dtype"] == "tf32")
        c = cfgs[r["kernel"].split(":")[0]]
        assert (r["num_warps"], r["num_stages"]) == (c.num_warps, c.num_stages)
        if r["kernel"] != "preprocess":
            assert r["tiles"] == "x".join(map(str, c.q_tile)) + "/" + "x".join(map(str, c.k_tile))


@pytest.mark.parametrize("capability,family", [
    ((8, 0), 80), ((8, 7), 80), ((8, 6), 86), ((8, 9), 86), ((9, 0), 90),
    ((10, 0), 100), ((10, 3), 100), ((12, 0), 120), ((12, 1), 120)])
def test_device_arch_maps_capability_to_family(capability, family, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert configs.device_arch(torch.device("cuda", 0)) == family
    assert configs.device_arch(torch.device("cpu")) == 90        # interpreter: only tiles matter
    assert family in LAUNCH_TABLES and family in SMEM_PER_BLOCK


def test_launch_tables_are_read_only():
    """Both sets (plain path, and the table path of the v2 window options) are frozen and
    complete: every family, dtype class, kernel and padded head dim."""
    with pytest.raises(TypeError):
        LAUNCH_TABLES[90]["16bit"]["fwd"][64] = (16, 16, 4, 1)
    with pytest.raises(TypeError):
        WINDOW_LAUNCH_TABLES[90]["16bit"]["fwd"][64] = (16, 16, 4, 1)
    assert sorted(WINDOW_LAUNCH_TABLES) == sorted(LAUNCH_TABLES)
    for family, table in [*LAUNCH_TABLES.items(), *WINDOW_LAUNCH_TABLES.items()]:
        for dtype_class in ("16bit", "fp32"):
            for kernel in MATMUL_KERNELS:
                assert sorted(table[dtype_class][kernel]) == [16, 32, 64, 128, 256], (family, kernel)


def test_perf_model():
    """``report --perf`` (kernels/perf.py): one row per (workload, pass, architecture), the
    named workloads and their v2-option variants; the useful fractions of SPEC.md section 6
    hold on the exact plan; the dilated and strided cpu-mid compute no more pairs than the
    plain one, the frame-causal a quarter fewer; the prediction (MMA work of the computed
    pairs) is never below the roofline (useful work)."""
    from nuwa3dna.kernels import perf
    from nuwa3dna.kernels.problems import WINDOW_WORKLOADS, WORKLOADS

    rows = perf.perf_rows()
    assert {(r["workload"], r["pass_"], r["arch"]) for r in rows} == {
        (w, p, a) for w in [*WORKLOADS, *WINDOW_WORKLOADS, *perf.EXTRA_VARIANTS] for p in ("fwd", "bwd")
        for a in ("sm_90", "sm_80")}
    by = {(r["workload"], r["pass_"], r["arch"]): r for r in rows}
    assert by["nuwa-video", "fwd", "sm_90"]["useful"] >= 0.16
    assert by["nuwa-image", "fwd", "sm_90"]["useful"] >= 0.11
    for pas in ("fwd", "bwd"):
        plain = by["cpu-mid", pas, "sm_90"]["computed"]
        assert by["cpu-mid-dilation", pas, "sm_90"]["computed"] <= plain
        assert by["cpu-mid-stride", pas, "sm_90"]["computed"] <= plain
        assert by["cpu-mid-frame-causal", pas, "sm_90"]["computed"] <= 0.75 * plain
    for r in rows:
        assert 0 < r["useful"] <= 1 and r["visible"] <= r["computed"]
        assert r["predicted_us"] >= r["roofline_us"] > 0


def test_perf_rows_of_heads_bias_and_global_tokens():
    """Issue 14's rows on cpu-mid: 2 kv heads compute the same pairs and move less; a bias
    adds the atomic adds of dS to the backward only; 64 global tokens add their pairs (every
    query sees them) and their PyTorch part's bytes (float32 scores in memory: more than the
    window kernels move)."""
    from nuwa3dna.kernels import perf

    by = {(r["workload"], r["pass_"]): r for r in perf.perf_rows(archs=(90,))}
    p = perf.PERF_WORKLOADS["cpu-mid"]
    n_q = p.B * p.heads * p.q_grid[0] * p.q_grid[1] * p.q_grid[2]
    for pas, kinds in (("fwd", 1), ("bwd", 2)):
        plain, kv2 = by["cpu-mid", pas], by["cpu-mid+kv2", pas]
        assert kv2["computed"] == plain["computed"] and kv2["mb"] < plain["mb"]
        glob = by["cpu-mid+global64", pas]
        assert glob["visible"] == plain["visible"] + kinds * n_q * 64
        assert glob["mb"] > 2 * plain["mb"] and glob["predicted_us"] > plain["predicted_us"]
    assert by["cpu-mid+bias", "bwd"]["predicted_us"] > by["cpu-mid", "bwd"]["predicted_us"]
    assert by["cpu-mid+bias", "fwd"]["visible"] == by["cpu-mid", "fwd"]["visible"]


def test_report_variants_launch_the_variant_kernels(run_compiled):
    """``base+variant`` workloads of the AOT report launch the GROUPED / HAS_BIAS kernels with
    the variant's kv heads and a bias shaped by the base workload's extent; plain ones do not."""
    code = ("import json; from nuwa3dna.kernels import report; import torch\n"
            "out = {}\n"
            "for wl in ('gpu-large', 'gpu-large+kv2-bias', 'nuwa-video-stride+kv2-bias'):\n"
            "    specs = report.launch_specs(wl, 64, torch.bfloat16, 90)\n"
            "    out[wl] = {k: [s[3].get('GROUPED'), s[3].get('HAS_BIAS'), s[1][0]] for k, s in specs.items()}\n"
            "print(json.dumps(out))\n")
    out = json.loads(run_compiled("-c", code, timeout=300).strip().splitlines()[-1])
    for kind in ("fwd", "dq", "dkdv"):
        assert out["gpu-large"][kind][:2] == [False, False]
        assert out["gpu-large+kv2-bias"][kind][:2] == [True, True]
        assert out["nuwa-video-stride+kv2-bias"][kind][:2] == [True, True]
    assert out["gpu-large+kv2-bias"]["dkdv"][2] < out["gpu-large"]["dkdv"][2]     # programs per kv head


def test_perf_command(run_compiled):
    head, *lines = run_compiled("-m", "nuwa3dna.kernels.report", "--perf", timeout=300).strip().splitlines()
    assert all(col in head for col in ("useful %", "predicted us", "roofline us", "computed", "visible"))
    assert len(lines) == (6 + 4 + 3) * 2 * 2


def test_sass_loop_of_the_forward(run_compiled):
    """``report --perf --sass``: the gpu-large bf16 sm_90 forward loop, found in the SASS
    (nvdisasm of the cubin), holds the 12 HGMMA of one iteration (Q K^T, and P V as
    bf16 hi + lo: 3 x 4 k-steps of 16 at head dim 64)."""
    code = ("import json; from nuwa3dna.kernels import perf\n"
            "print(json.dumps(perf.sass_loop('gpu-large', 'fwd', 64)))\n")
    s = json.loads(run_compiled("-c", code).strip().splitlines()[-1])
    assert s["mma"] == 12 and s["instructions"] > s["mma"], s
