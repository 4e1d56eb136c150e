"""Static performance model of the Triton kernels: ``python -m nuwa3dna.kernels.report --perf``.

One row per (workload, pass, architecture), without a GPU and without compiling, for
the named workloads and their v2-option variants (``problems.WINDOW_WORKLOADS``: the
kernels' table path, counted on its window tables):

* ``computed``: score pairs the kernels compute (``triton.plan.computed_pairs``
  on the launchers' tile plan: loop iterations x tile rows x tile columns,
  padding and causal skips included), over every (batch, head);
* ``visible``: pairs the 3DNA mask lets through; ``useful %`` = visible / computed;
* ``MB``: bytes moved once from HBM (every input read once, every output written
  once, float32 statistics included; K/V re-reads across tiles assumed to hit L2);
* ``L2 MB``: bytes the kernels' tile loads and stores request from L2 (``kernel_l2_bytes``),
  on the launchers' exact tile plan (``triton.plan``: loop iterations per program, causal
  skips included, the table path on its window tables): per program, loop iterations x
  the walked tile's rows x the bytes a row loads (fwd, dQ: a K and a V row of D elements;
  dK/dV: a Q and a dO row, the float32 lse, and delta in the dK pass), plus the program's
  own tiles once (fwd: Q in, O and lse out; dQ: Q, dO, lse, delta in, dQ out; dK/dV: K, V
  in, dK, dV out; split dK and dV passes each their own), plus the backward's preprocess
  (O, dO in, delta out), a bias's dQ atomic adds (4 B per visible pair) and the global
  tokens' PyTorch bytes (as in ``MB``). Tile rows include padding, as ``computed`` does:
  masked rows (off the grid; in dK/dV's walk, past its query range) issue no request, so
  this is an upper bound by the tiles' overhang. The walks run per (batch, query head)
  (forward and dQ programs, and dK/dV programs looping over their kv head's group): with
  grouped kv heads every query head's program loads its kv head's K/V rows; dK/dV's own
  K, V, dK, dV are per kv head. Not counted: the table path's int32 table lookups and a
  bias's gathers (small, L1-resident tables). ``L2 MB`` >= ``MB``: the re-reads across
  tiles (K/V; dK/dV: Q/dO) are what the HBM column assumes hit L2;
* ``roofline us`` = max(MB / bandwidth, useful FLOPs / peak), useful FLOPs as
  SPEC.md section 3 (4 D per visible pair forward, 2.5x that backward);
* ``predicted us`` = max(MB / bandwidth, MMA FLOPs / peak): the tensor-core work
  the kernels issue for the computed pairs (forward Q K^T and P V; dQ: Q K^T,
  dO V^T, dS K; dK/dV: K Q^T, V dO^T, P^T dO, dS^T Q; the bf16 P and dS dots count
  twice, hi + lo, ``jit.dot_acc``). It ignores instruction issue limits (issue 12
  item 5), so it is a lower bound on the kernels' time, not an estimate of it.

Peaks (dense bf16, per the vendors' data sheets): H100 SXM 3.35 TB/s, 989
TFLOP/s; A100 SXM 2.04 TB/s, 312 TFLOP/s.

Compiled columns (``report --perf --compile``; ``--sass`` implies it), per kernel of the
row (fwd; bwd: dQ and dK/dV, or its dK and dV passes; the preprocess only in ``--json``
with ``--compile``):
``regs/spills/smem/CTAs``, i.e. registers per thread and spill bytes (``ptxas -v``),
shared memory in KiB (Triton's metadata), all from kernels/report.py's ``compile_spec``
on ``launch_specs`` (the launchers' own configs, bf16, the workload's head dim), and the
resident CTAs per SM (``occupancy.ctas_per_sm``: the least of the register, shared memory,
warp and block limits of the architecture) with a letter for the limit that binds:
r registers, s shared memory, w warps, b blocks. E.g. ``fwd:168/0/24K/3r``.

Issue 14's rows (``EXTRA_VARIANTS``, named ``cpu-mid+kv2`` etc.): grouped kv heads change
only the bytes (k, v, dk, dv at Hk heads; the same pairs and MMAs); a bias adds, to the
backward, dQ's atomic adds of dS (one per visible pair, at ``ATOMICS_PER_S``, an assumed
rate) and nothing to the MMAs (its gather per score, like the masks, is issue work that the
model ignores); global tokens add their PyTorch part (``global_part_cost``: every aten op's
tensors read and written once, float32 scores in memory, matmuls at the fp32 peak),
run after the kernels, its pairs counted as computed and visible. Not measured here (no GPU):
``gpu/acceptance.py`` times the kernels next to these predictions.
"""
from __future__ import annotations

import math
import re
from typing import Dict, List

import torch

from nuwa3dna.kernels.problems import WINDOW_WORKLOADS, WORKLOADS, Problem
from nuwa3dna.kernels.triton import configs, relayout
from nuwa3dna.kernels.triton.configs import LaunchConfig
from nuwa3dna.kernels.triton.plan import computed_pairs, key_tile_iterations, query_tile_iterations
from nuwa3dna.kernels.windows import Options

PERF_WORKLOADS = {**WORKLOADS, **WINDOW_WORKLOADS}

# (HBM bytes/s, dense 16-bit tensor FLOP/s) of the reference part of each family.
PEAKS = {90: ("H100 SXM", 3.35e12, 989e12), 80: ("A100 SXM", 2.039e12, 312e12)}
PASSES = ("fwd", "bwd")


def _mma_flops_per_pair(kind: str, D: int, split: int) -> int:
    """Tensor-core FLOPs per computed pair; ``split`` = 2 where P/dS enter as bf16 hi + lo."""
    return {"fwd": 2 * D * (1 + split), "dq": 2 * D * (2 + split), "dkdv": 2 * D * (2 + 2 * split)}[kind]


def _n_tiles(grid, tile) -> int:
    return math.prod(-(-g // b) for g, b in zip(grid, tile))


def kernel_l2_bytes(kind: str, p: Problem, cfg: LaunchConfig, dtype=torch.bfloat16, kv_heads=None,
                    tables=None) -> int:
    """Bytes kernel ``kind`` ("fwd", "dq", "dkdv" or "preprocess") of ``p`` requests from L2
    with launch config ``cfg`` (``configs.pick_configs``), over every (batch, head): tile rows
    x bytes per row, padding rows included (module docstring, ``L2 MB``). ``kv_heads``: grouped
    kv heads (None: p.heads); ``tables``: the table path's window tables (v2 options)."""
    row = p.D * (torch.finfo(dtype).bits // 8)          # one token's q, k, v, o, do, dq, dk or dv
    hq, hk = p.B * p.heads, p.B * (kv_heads or p.heads)
    if kind == "preprocess":                            # O, dO in; delta out (raster blocks of rows)
        return hq * _n_tiles((math.prod(p.q_grid),), (cfg.block_q,)) * cfg.block_q * (2 * row + 4)
    args = (p.q_grid, p.kv, p.resolved_extent, p.causal is True, cfg.q_tile, cfg.k_tile, tables)
    if kind in ("fwd", "dq"):                           # one program per query tile and query head
        walked = query_tile_iterations(*args) * cfg.block_k * 2 * row          # K, V rows
        own = (2 * row + 4) if kind == "fwd" else (3 * row + 8)   # fwd: Q, O, lse; dQ: Q, dO, dQ, lse, delta
        return hq * (walked + _n_tiles(p.q_grid, cfg.q_tile) * cfg.block_q * own)
    # dK/dV: one program per key tile and kv head, walking the query tiles of its group's heads.
    walk_rows = hq * key_tile_iterations(*args) * cfg.block_q
    own_rows = hk * _n_tiles(p.kv, cfg.k_tile) * cfg.block_k
    total = 0
    for dk, dv in ((True, False), (False, True)) if cfg.split_dkdv else ((True, True),):  # launch.dkdv_launches
        total += walk_rows * (2 * row + 4 + 4 * dk)                 # Q, dO, lse; delta where dK
        total += own_rows * row * (1 + dk + dk + dv)                # K; V and dK where dK; dV where dV
    return total


# ----------------------------------------------------------------------------- issue 14 variants


# Beyond the window (docs/design.md section 8) on cpu-mid: (base workload, kv heads, global
# tokens, bias). Named ``base+variant`` like kernels/report.py's compiled variants.
EXTRA_VARIANTS = {
    "cpu-mid+kv2": ("cpu-mid", 2, 0, False),
    "cpu-mid+global64": ("cpu-mid", None, 64, False),
    "cpu-mid+bias": ("cpu-mid", None, 0, True),
}
# Assumptions of the rows below, not measured (no GPU): fp32 CUDA-core peak for PyTorch's
# float32 einsums (TF32 off by default), and the L2's float32 atomic throughput: one per
# clock per slice (H100 SXM: 96 slices assumed at 1.755 GHz; A100: 80 at 1.41 GHz).
FP32_PEAKS = {90: 67e12, 80: 19.5e12}
ATOMICS_PER_S = {90: 96 * 1.755e9, 80: 80 * 1.41e9}


class _TorchCost:
    """Bytes every aten op of a block reads and writes once (views and allocations move
    nothing), and the block's matmul FLOPs (``FlopCounterMode``), on meta tensors."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        cost = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                if not func.is_view and "empty" not in func.__name__:
                    leaves = torch.utils._pytree.tree_leaves((args, kwargs, out))
                    cost.bytes += sum(t.numel() * t.element_size() for t in leaves if isinstance(t, torch.Tensor))
                return out
        self.bytes, self.mode = 0, Mode()


def global_part_cost(p: Problem, kv_heads: int, n_global: int, dtype=torch.bfloat16):
    """(bytes, FLOPs) of the global tokens' part, forward and backward separately: nuwa3dna.kernels.merge's
    ``global_attention`` and ``merge`` as ``nearby_attention`` runs them after the
    kernels (PyTorch ops, float32 scores), replayed on meta tensors."""
    from torch.utils.flop_counter import FlopCounterMode

    from nuwa3dna.kernels.merge import global_attention, merge
    meta = lambda *s, dt=dtype: torch.empty(*s, dtype=dt, device="meta", requires_grad=True)
    q, out_w = meta(p.B, *p.q_grid, p.heads, p.D), meta(p.B, *p.q_grid, p.heads, p.D)
    lse_w = meta(p.B, *p.q_grid, p.heads, dt=torch.float32)
    ak, av = meta(p.B, n_global, kv_heads, p.D), meta(p.B, n_global, kv_heads, p.D)
    cost = _TorchCost()
    with cost.mode, FlopCounterMode(display=False) as flops:
        out, lse = merge([(out_w, lse_w), global_attention(q, ak, av, p.D ** -0.5)])
        fwd = (cost.bytes, flops.get_total_flops())
    grads = (torch.empty(out.shape, dtype=out.dtype, device="meta"), torch.empty(lse.shape, device="meta"))
    with cost.mode, FlopCounterMode(display=False) as flops:
        torch.autograd.backward([out, lse], list(grads))
        bwd = (cost.bytes - fwd[0], flops.get_total_flops())
    return {"fwd": fwd, "bwd": bwd}


def workload_rows(p: Problem, arch: int = 90, dtype=torch.bfloat16, kv_heads=None, n_global: int = 0,
                  bias: bool = False, name=None) -> List[Dict]:
    """The forward and backward rows of ``p`` on ``arch``'s reference part; ``kv_heads``,
    ``n_global``, ``bias``: issue 14's variants (``EXTRA_VARIANTS``, ``variant_rows``)."""
    part, bw, peak = PEAKS[arch]
    ext, bh, D = p.resolved_extent, p.B * p.heads, p.D
    opts, raster = Options.of(p.causal, **p.options), p.causal is True
    tables = None if opts.plain else relayout.window_tables(p.q_grid, p.kv, ext, opts)
    cfgs = configs.pick_configs(p.q_grid, p.kv, ext, D, dtype, arch, raster, opts, bias=bias)
    split = 2 if dtype == torch.bfloat16 else 1
    nq = p.B * p.heads * math.prod(p.q_grid)
    nk = p.B * (kv_heads or p.heads) * math.prod(p.kv)         # grouped kv heads: k, v read once
    glob = global_part_cost(p, kv_heads or p.heads, n_global, dtype) if n_global else None
    es = torch.finfo(dtype).bits // 8
    visible = bh * p.visible_pairs()
    rows = []
    for pas in PASSES:
        kinds = ("fwd",) if pas == "fwd" else ("dq", "dkdv")
        computed = {k: bh * computed_pairs(k, p.q_grid, p.kv, ext, raster, cfgs[k].q_tile, cfgs[k].k_tile,
                                           tables) for k in kinds}
        mma = sum(n * _mma_flops_per_pair(k, D, split) for k, n in computed.items())
        if pas == "fwd":    # read q, k, v; write out and the log-sum-exp
            nbytes = (nq + 2 * nk) * D * es + nq * D * es + nq * 4
        else:               # read q, k, v, out, dout, lse; delta round trip; write dq, dk, dv
            nbytes = (3 * nq + 2 * nk) * D * es + nq * 4 * 3 + (nq + 2 * nk) * D * es
        l2 = sum(kernel_l2_bytes(k, p, cfgs[k], dtype, kv_heads, tables)
                 for k in (kinds if pas == "fwd" else ("preprocess", *kinds)))
        useful = p.flops(backward=pas == "bwd") - (p.flops() if pas == "bwd" else 0)
        mem_us = nbytes / bw * 1e6
        predicted = max(mem_us, mma / peak * 1e6)
        seen, done = visible * len(kinds), sum(computed.values())
        extra_us = 0.0
        if bias and pas == "bwd":       # dQ's atomic adds of dS: one per visible pair
            extra_us += visible / ATOMICS_PER_S[arch] * 1e6
            l2 += 4 * visible
        if glob:                        # the global tokens' PyTorch part, after the kernels
            g_bytes, g_flops = glob[pas]
            g_pairs = bh * math.prod(p.q_grid) * n_global * len(kinds)
            seen, done, nbytes, l2 = seen + g_pairs, done + g_pairs, nbytes + g_bytes, l2 + g_bytes
            useful += 4.0 * D * bh * math.prod(p.q_grid) * n_global * (2.5 if pas == "bwd" else 1.0)
            extra_us += g_bytes / bw * 1e6 + g_flops / FP32_PEAKS[arch] * 1e6
            mem_us = nbytes / bw * 1e6
        rows.append(dict(
            workload=name or p.name, pass_=pas, arch=f"sm_{arch}", part=part,
            tiles=" ".join(f"{k}:{'x'.join(map(str, cfgs[k].q_tile))}/{'x'.join(map(str, cfgs[k].k_tile))}"
                           for k in kinds),
            computed=done, visible=seen, useful=seen / done, mb=nbytes / 1e6, l2_mb=l2 / 1e6,
            roofline_us=max(mem_us, useful / peak * 1e6), predicted_us=predicted + extra_us))
    return rows


def variant_rows(name: str, arch: int = 90, dtype=torch.bfloat16) -> List[Dict]:
    """The rows of an ``EXTRA_VARIANTS`` workload."""
    base, kv_heads, n_global, bias = EXTRA_VARIANTS[name]
    return workload_rows(PERF_WORKLOADS[base], arch, dtype, kv_heads, n_global, bias, name)


def perf_rows(workloads=tuple(PERF_WORKLOADS) + tuple(EXTRA_VARIANTS), archs=(90, 80)) -> List[Dict]:
    return [r for name in workloads for arch in archs
            for r in (variant_rows(name, arch) if name in EXTRA_VARIANTS else workload_rows(PERF_WORKLOADS[name], arch))]


HEADER = (f"{'workload':<21}{'pass':<5}{'arch':<7}{'tiles':<40}{'computed':>13}{'visible':>13}"
          f"{'useful %':>9}{'MB':>8}{'L2 MB':>9}{'predicted us':>13}{'roofline us':>12}")
USAGE_HEADER = f"  {'kernel:regs/spills/smem/CTAs per SM':<36}"


def fmt(r: Dict) -> str:
    return (f"{r['workload']:<21}{r['pass_']:<5}{r['arch']:<7}{r['tiles']:<40}{r['computed']:>13,}"
            f"{r['visible']:>13,}{100 * r['useful']:>8.1f}%{r['mb']:>8.1f}{r['l2_mb']:>9.1f}"
            f"{r['predicted_us']:>13.1f}{r['roofline_us']:>12.1f}")


# ----------------------------------------------------------------------------- compiled columns


SHOWN = {"fwd": ("fwd",), "bwd": ("dq", "dkdv", "dkdv:dk", "dkdv:dv")}   # the printed kernels of a pass


def kernel_usage(workload: str, pas: str, arch: int, dtype=torch.bfloat16, D=None) -> Dict[str, Dict]:
    """Per kernel of pass ``pas`` ("fwd"; "bwd": preprocess, dQ, dK/dV or its two passes) of
    ``workload`` (``base+variant`` as kernels/report.py names it) on ``arch``: registers,
    spills, shared memory and warps of the compiled kernel (kernels/report.py ``compile_spec``
    on ``launch_specs``, cached by Triton and the report) and its resident CTAs per SM and
    their limiting resource (``occupancy.ctas_per_sm``)."""
    from nuwa3dna.kernels import report
    from nuwa3dna.kernels.occupancy import ctas_per_sm

    D = D or PERF_WORKLOADS[workload.split("+")[0]].D
    out = {}
    for name, spec in report.launch_specs(workload, D, dtype, arch).items():
        if (name == "fwd") != (pas == "fwd"):
            continue
        c = report.compile_spec(spec, arch)
        ctas, limit = ctas_per_sm(arch, c["regs"], c["num_warps"], c["shared"])
        out[name] = dict(regs=c["regs"], spills=c["spills"], shared=c["shared"], num_warps=c["num_warps"],
                         ctas=ctas, limit=limit)
    return out


def fmt_usage(usage: Dict[str, Dict], pas: str) -> str:
    """``kernel:regs/spills/smem/CTAs`` of the shown kernels, e.g. ``dq:168/0/32K/3r``."""
    return "  " + " ".join(
        f"{name.split(':')[-1]}:{u['regs']}/{u['spills']}/{-(-u['shared'] // 1024)}K/{u['ctas']}{u['limit'][0]}"
        for name, u in usage.items() if name in SHOWN[pas])


def predicted_ms(p: Problem, kind: str, arch: int = 90) -> float:
    """Predicted time (ms) of ``kind`` "fwd" or "fwd+bwd" (gpu/acceptance.py's column)."""
    rows = {r["pass_"]: r["predicted_us"] for r in workload_rows(p, arch)}
    return (rows["fwd"] + (rows["bwd"] if kind != "fwd" else 0.0)) / 1e3


MMA_OPS = ("HGMMA", "HMMA", "UTCHMMA", "UTCQMMA", "UTCOMMA")
_INSTR = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")


def sass_loop(workload: str, kind: str = "fwd", D: int = 64, dtype=torch.bfloat16, arch: int = 90) -> Dict:
    """SASS of the main loop of one kernel, compiled as the launcher would launch it
    (kernels/report.py) and disassembled with the Triton wheel's nvdisasm: the loop is
    the backward branch's body holding the most MMA instructions; returns its
    instruction count, MMA count (HGMMA on sm_90, HMMA on sm_80/86/120) and their ratio."""
    import os
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget

    from nuwa3dna.kernels import report
    src, options = report._source(report.launch_specs(workload, D, dtype, arch)[kind])
    cubin = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options).asm["cubin"]
    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        text = subprocess.run([nvdisasm, "-c", path], capture_output=True, text=True, check=True).stdout
    labels, instrs = {}, []
    for line in text.splitlines():
        m = re.match(r"^(\.L_x_\d+):", line)
        if m:
            labels[m.group(1)] = len(instrs)
        m = _INSTR.match(line)
        if m:
            instrs.append(m.group(2))
    best = None
    for end, ins in enumerate(instrs):
        m = re.search(r"BRA\s+`?\(?(\.L_x_\d+)", ins)
        if m and labels.get(m.group(1), end + 1) <= end:
            body = instrs[labels[m.group(1)]:end + 1]
            mma = sum(any(op in i.split()[0] or (len(i.split()) > 1 and op in i.split()[1]) for op in MMA_OPS)
                      for i in body)
            if best is None or mma > best[1]:
                best = (len(body), mma)
    n, mma = best or (0, 0)
    return dict(instructions=n, mma=mma, per_mma=n / mma if mma else float("nan"))


def with_usage(rows: List[Dict]) -> List[Dict]:
    """``rows`` with each row's ``kernel_usage`` under "kernels" (compiles; ``--compile``)."""
    return [dict(r, kernels=kernel_usage(r["workload"], r["pass_"], int(r["arch"][3:]))) for r in rows]


def main(sass: bool = False, compile: bool = False) -> int:
    """Print the table; ``sass``: the forward loop's instructions per MMA (compiles; implies
    ``compile``); ``compile``: the compiled kernels' registers, spills, shared memory, CTAs/SM."""
    compile = compile or sass
    print(HEADER + (f"{'instr/mma':>11}" if sass else "") + (USAGE_HEADER if compile else ""))
    for r in perf_rows():
        extra = ""
        if sass:
            extra = f"{'':>11}"
            if r["pass_"] == "fwd":
                base = r["workload"].split("+")[0]
                s = sass_loop(r["workload"], "fwd", PERF_WORKLOADS[base].D, torch.bfloat16, int(r["arch"][3:]))
                extra = f"{s['per_mma']:>11.1f}"
        if compile:
            extra += fmt_usage(kernel_usage(r["workload"], r["pass_"], int(r["arch"][3:])), r["pass_"])
        print(fmt(r) + extra, flush=True)
    return 0
