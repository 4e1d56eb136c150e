"""The static performance report's L2 bytes and occupancy columns (kernels/perf.py,
kernels/occupancy.py; ``python -m nuwa3dna.kernels.report --perf [--compile]``).

L2 bytes are checked against a literal replay of the kernels' loops written here with
the simplest loops (every program, every walked tile, the causal cut as a raster
comparison), on small odd problems of both window paths, and against hand counts on
one-tile problems. CTAs per SM are checked on hand-computed cases. One compile-backed
row (gpu-large forward and backward, bf16, sm_90) runs in a subprocess with the
interpreter off (tests/conftest.py turns it on here; interpreted kernels cannot be
compiled); its registers are not pinned (the kernels change).
"""
import json

import pytest
import torch

from nuwa3dna.kernels import perf
from nuwa3dna.kernels.occupancy import SM_LIMITS, ctas_per_sm
from nuwa3dna.kernels.problems import Problem
from nuwa3dna.kernels.triton import configs, relayout
from nuwa3dna.kernels.triton.configs import LaunchConfig
from nuwa3dna.kernels.triton.tables import SMEM_PER_BLOCK
from nuwa3dna.kernels.windows import Options

ES = 2      # bf16 bytes per element


# ----------------------------------------------------------------------------- a literal replay


def _axis_windows(p, tables):
    """Per axis, each query's keys [lo, hi) and each key's queries [q0, q1) (walked coordinates)."""
    if tables is not None:
        return [(list(zip(t.lo, t.hi)), list(zip(t.q0, t.q1))) for t in tables]
    out = []
    for n, m, e in zip(p.q_grid, p.kv, p.resolved_extent):
        win = [(max(i * m // n - e, 0), min(i * m // n + e, m - 1) + 1) for i in range(n)]
        seen = [[i for i in range(n) if win[i][0] <= j < win[i][1]] for j in range(m)]
        out.append((win, [(s[0], s[-1] + 1) if s else (0, 0) for s in seen]))
    return out


def _tiles(n, b):
    return [(o, min(o + b, n) - 1) for o in range(0, n, b)]


def _walk_start(lo, hi, k, n, tables):
    """First walked key row (column) of a key box [lo, hi) walked in tiles of k on an axis of n:
    on plain windows the forward and dQ walks slide back inside the grid where the tiles fit
    (the causal cut depends on where the walk starts); the table path walks from lo."""
    if tables is None:
        return max(min(lo, n - -(-(hi - lo) // k) * k), 0)
    return lo


def replay_iterations(kind, p, cfg, tables=None):
    """(programs, loop iterations) of one (batch, head), replayed program by program."""
    axes = _axis_windows(p, tables)
    causal = p.causal is True
    programs = iters = 0
    if kind in ("fwd", "dq"):
        (BT, BH, BW), (_, KH, KW) = cfg.q_tile, cfg.k_tile
        for ts in _tiles(p.q_grid[0], BT):
            for hs in _tiles(p.q_grid[1], BH):
                for ws in _tiles(p.q_grid[2], BW):
                    programs += 1
                    box = [(min(win[i][0] for i in range(o, l + 1)), max(win[i][1] for i in range(o, l + 1)))
                           for (win, _), (o, l) in zip(axes, (ts, hs, ws))]
                    last = (ts[1], hs[1], ws[1])
                    (b_lo, b_hi), (c_lo, c_hi) = box[1], box[2]
                    b0 = _walk_start(b_lo, b_hi, KH, p.kv[1], tables)
                    c0 = _walk_start(c_lo, c_hi, KW, p.kv[2], tables)
                    for a in range(*box[0]):
                        for bb in range(b0, b0 + b_hi - b_lo, KH):
                            for c in range(c0, c0 + c_hi - c_lo, KW):
                                iters += not (causal and (a, bb, c) > last)     # the walk's causal tail
        return programs, iters
    (_, BH, BW), (KT, KH, KW) = cfg.q_tile, cfg.k_tile
    for ts in _tiles(p.kv[0], KT):
        for hs in _tiles(p.kv[1], KH):
            for ws in _tiles(p.kv[2], KW):
                programs += 1
                rng = [(min(seen[j][0] for j in range(o, l + 1)), max(seen[j][1] for j in range(o, l + 1)))
                       for (_, seen), (o, l) in zip(axes, (ts, hs, ws))]
                first = (ts[0], hs[0], ws[0])
                for t in range(*rng[0]):
                    for h in range(rng[1][0], rng[1][1], BH):
                        for w in range(rng[2][0], rng[2][1], BW):
                            last = (t, min(h + BH, rng[1][1]) - 1, min(w + BW, rng[2][1]) - 1)
                            iters += not (causal and last < first)              # the walk's causal head
    return programs, iters


def replay_l2_bytes(kind, p, cfg, tables=None, kv_heads=None):
    """L2 bytes of ``kind`` from the replay: every program's own rows once, every iteration's
    walked rows (module docstring of kernels/perf.py)."""
    row, hq, hk = p.D * ES, p.B * p.heads, p.B * (kv_heads or p.heads)
    programs, iters = replay_iterations(kind, p, cfg, tables)
    if kind == "fwd":
        return hq * (programs * cfg.block_q * (row + row + 4) + iters * cfg.block_k * (row + row))
    if kind == "dq":
        return hq * (programs * cfg.block_q * (row + row + 4 + 4 + row) + iters * cfg.block_k * (row + row))
    walked = hq * iters * cfg.block_q
    own = hk * programs * cfg.block_k
    if cfg.split_dkdv:      # dK pass: K, V in, dK out, Q, dO, lse, delta walked; dV pass: K in, dV out, no delta
        return walked * (row + row + 8) + own * 3 * row + walked * (row + row + 4) + own * 2 * row
    return walked * (row + row + 8) + own * 4 * row


ODD = [
    Problem(2, (3, 5, 7), 2, 24, (1, 2, 2)),
    Problem(2, (3, 5, 7), 2, 24, (1, 2, 2), causal=True),
    Problem(2, (3, 5, 7), 3, 24, (1, 1, 2), kv_grid=(2, 3, 4)),
    Problem(2, (3, 5, 7), 2, 16, (1, 1, 1), causal=True, stride=(1, 3, 2), dilation=(1, 2, 1)),
    Problem(2, (3, 5, 7), 2, 16, (1, 2, 2), dilation=(1, 2, 2)),
]
# (fwd/dq q_tile, k_tile), (dkdv q_tile, k_tile): overhanging every odd axis
TILES = [(((2, 2, 4), (1, 2, 4)), ((1, 2, 4), (2, 2, 4))), (((1, 4, 2), (1, 4, 4)), ((1, 4, 2), (1, 2, 8)))]


@pytest.mark.parametrize("p", ODD, ids=lambda p: p.id)
@pytest.mark.parametrize("tiles", TILES, ids=("a", "b"))
def test_l2_bytes_equal_a_literal_replay(p, tiles):
    opts = Options.of(p.causal, **p.options)
    tables = None if opts.plain else relayout.window_tables(p.q_grid, p.kv, p.resolved_extent, opts)
    (fq, fk), (dq_, dk_) = tiles
    for kind, (q_tile, k_tile) in (("fwd", (fq, fk)), ("dq", (fq, fk)), ("dkdv", (dq_, dk_))):
        for split in ((False, True) if kind == "dkdv" else (False,)):
            for kv_heads in (None, 1):
                cfg = LaunchConfig(kind, q_tile, k_tile, 32, 4, 1, split)
                got = perf.kernel_l2_bytes(kind, p, cfg, torch.bfloat16, kv_heads, tables)
                assert got == replay_l2_bytes(kind, p, cfg, tables, kv_heads), (kind, split, kv_heads)


def test_l2_bytes_of_the_launchers_configs_equal_the_replay():
    """The configs ``workload_rows`` uses (``pick_configs``), on an odd causal problem."""
    p = ODD[1]
    cfgs = configs.pick_configs(p.q_grid, p.kv, p.resolved_extent, p.D, torch.bfloat16, 90, True, Options())
    for kind in ("fwd", "dq", "dkdv"):
        assert perf.kernel_l2_bytes(kind, p, cfgs[kind]) == replay_l2_bytes(kind, p, cfgs[kind])


def test_l2_bytes_of_one_tile_by_hand():
    """A 1 x 4 x 4 grid whose windows cover it, one program: bf16, D = 16 (32 B a row)."""
    p = Problem(1, (1, 4, 4), 1, 16, (0, 3, 3))
    fwd = LaunchConfig("fwd", (1, 4, 4), (1, 2, 4), 16, 4, 1)
    # 2 key tiles of 8 rows, K and V: 2 * 8 * 64; Q in, O out, lse out: 16 * (32 + 32 + 4)
    assert perf.kernel_l2_bytes("fwd", p, fwd) == 1024 + 1088
    # dQ: the same walk; Q, dO in, dQ out, lse, delta in: 16 * (96 + 8)
    assert perf.kernel_l2_bytes("dq", p, LaunchConfig("dq", (1, 4, 4), (1, 2, 4), 16, 4, 1)) == 1024 + 1664
    # dK/dV: 2 query tiles of 8 rows of Q, dO, lse, delta: 2 * 8 * 72; K, V in, dK, dV out: 16 * 128
    dkdv = LaunchConfig("dkdv", (1, 2, 4), (1, 4, 4), 16, 4, 1)
    assert perf.kernel_l2_bytes("dkdv", p, dkdv) == 1152 + 2048
    # split: dK pass 1152 + 16 * 96; dV pass (no delta, no V) 2 * 8 * 68 + 16 * 64
    split = LaunchConfig("dkdv", (1, 2, 4), (1, 4, 4), 16, 4, 1, True)
    assert perf.kernel_l2_bytes("dkdv", p, split) == 1152 + 1536 + 1088 + 1024
    # preprocess: one block of 32 raster rows (16 of them padding): O, dO in, delta out
    pre = LaunchConfig("preprocess", (1, 1, 32), (1, 1, 1), 16, 4, 1)
    assert perf.kernel_l2_bytes("preprocess", p, pre) == 32 * 68


def test_l2_column_of_every_row():
    """``L2 MB`` >= ``MB`` on every row (K/V re-reads are what the HBM column assumes hit L2);
    grouped kv heads load the same K/V rows per query head in the forward and fewer dK/dV
    tiles in the backward; the bias adds the atomics of dQ to the backward only."""
    rows = perf.perf_rows()
    for r in rows:
        assert r["l2_mb"] >= r["mb"] > 0, r
    by = {(r["workload"], r["pass_"], r["arch"]): r for r in rows}
    for arch in ("sm_90", "sm_80"):
        assert by["cpu-mid+kv2", "fwd", arch]["l2_mb"] == by["cpu-mid", "fwd", arch]["l2_mb"]
        assert by["cpu-mid+kv2", "bwd", arch]["l2_mb"] < by["cpu-mid", "bwd", arch]["l2_mb"]
        assert by["cpu-mid+global64", "fwd", arch]["l2_mb"] > by["cpu-mid", "fwd", arch]["l2_mb"]
    # gpu-large fwd on sm_90 by hand: 64 x 64 tiles, every iteration loads 64 K and 64 V rows of 128 B
    r, p = by["gpu-large", "fwd", "sm_90"], perf.PERF_WORKLOADS["gpu-large"]
    n_q = p.B * p.heads * 16 * 48 * 48
    assert r["l2_mb"] * 1e6 == pytest.approx(r["computed"] // 64 * 2 * 128 + n_q * (2 * 128 + 4))


def test_header_and_rows_fit_200_columns():
    r = next(r for r in perf.perf_rows(workloads=("gpu-large",), archs=(90,)) if r["pass_"] == "bwd")
    usage = {k: dict(regs=255, spills=0, shared=232448, num_warps=8, ctas=1, limit="regs")
             for k in ("preprocess", "dq", "dkdv")}
    line = perf.fmt(r) + " " * 11 + perf.fmt_usage(usage, "bwd")
    assert "preprocess" not in line and "dq:255/0/227K/1r dkdv:255/0/227K/1r" in line
    assert len(line) <= 200 and len(perf.HEADER + " " * 11 + perf.USAGE_HEADER) <= 200
    assert "L2 MB" in perf.HEADER


# ----------------------------------------------------------------------------- occupancy


@pytest.mark.parametrize("arch, regs, warps, shared, expect", [
    (90, 168, 4, 0, (3, "regs")),           # 168 x 32 = 5376 a warp: 3 warps per sub-partition, 12 per SM
    (90, 170, 4, 0, (2, "regs")),           # 5440 rounds up to 5632: 2 warps per sub-partition
    (90, 32, 4, 57344, (4, "smem")),        # 56 KiB + the reserved 1 KiB, 4 in 228 KiB
    (86, 32, 4, 100 * 1024, (0, "smem")),   # over sm_86's 99 KiB per block: cannot launch
    (86, 32, 4, 99 * 1024, (1, "smem")),    # 99 KiB + 1 KiB reserved = the SM's 100 KiB
    (80, 32, 4, 99 * 1024, (1, "smem")),    # 100 KiB twice is over sm_80's 164 KiB
    (86, 24, 4, 0, (12, "warps")),          # 48 warps per SM on sm_86
    (80, 24, 4, 0, (16, "warps")),          # 64 on sm_80
    (86, 24, 1, 0, (16, "blocks")),         # 16 blocks per SM on sm_86
    (90, 24, 1, 0, (32, "blocks")),
    (80, 256, 4, 0, (0, "regs")),           # over 255 registers per thread
    (80, 207, 8, 33280, (1, "regs")),       # 6656 a warp: 2 per sub-partition, 8 per SM: one 8-warp CTA
])
def test_ctas_per_sm(arch, regs, warps, shared, expect):
    assert ctas_per_sm(arch, regs, warps, shared) == expect


def test_sm_limits_agree_with_the_launch_tables():
    for arch, lim in SM_LIMITS.items():
        assert lim.smem_per_block == SMEM_PER_BLOCK[configs.arch_family(arch)], arch
        assert lim.smem_per_sm == lim.smem_per_block + 1024
        assert lim.max_warps in (48, 64) and lim.max_blocks in (16, 24, 32)


def test_compiled_columns_of_gpu_large_on_sm_90(run_compiled):
    """``kernel_usage`` compiles the row's kernels with the launchers' configs (kernels/report.py)."""
    code = ("import json; from nuwa3dna.kernels import perf\n"
            "print(json.dumps({p: perf.kernel_usage('gpu-large', p, 90) for p in ('fwd', 'bwd')}))\n")
    out = json.loads(run_compiled("-c", code, timeout=900).strip().splitlines()[-1])
    assert set(out["fwd"]) == {"fwd"} and set(out["bwd"]) == {"preprocess", "dq", "dkdv"}
    for usage in (*out["fwd"].values(), *out["bwd"].values()):
        assert usage["regs"] > 0 and usage["spills"] == 0 and usage["ctas"] >= 1, usage
        assert (usage["ctas"], usage["limit"]) == tuple(
            ctas_per_sm(90, usage["regs"], usage["num_warps"], usage["shared"]))
