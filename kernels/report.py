"""Ahead-of-time GPU report of the 3DNA kernels, without a GPU.

``python -m nuwa3dna.kernels.report [--quick] [--json] [--jobs N]`` compiles
every kernel (forward, preprocess, dK/dV, dQ) for every architecture family of
``kernels/triton/tables.py`` (sm_80, sm_86, sm_89, sm_90, sm_100, sm_120) with
exactly the launch configuration the launchers pick (``triton.launch.*_launch``
build the arguments, block sizes, num_warps and num_stages; nothing is
restated here), for head dims 16/32/64/128/256 and float16/bfloat16/float32,
on the GPU workloads of docs/design.md (``gpu-large``: non-causal, ``nuwa-video``:
causal), on ``long-axis`` (a 1 x 1 x 65536 causal grid, whose window
arithmetic needs the kernels' int64 variant, WIDE_IDX), and on the table path
of the v2 window options (TABLES: ``cpu-mid-dilation``, non-causal, and
``nuwa-video-stride``, raster causal; ``problems.WINDOW_WORKLOADS``) at every
head dim (that path has its own launch tables, ``tables.WINDOW_LAUNCH_TABLES``),
and with the operator's grouped kv heads and relative position
bias (docs/design.md section 8; ``VARIANTS``: workloads named ``base+variant``, e.g.
``gpu-large+kv2-bias``: 2 kv heads and a bias, the kernels' GROUPED and HAS_BIAS
variants, on both window paths). It prints per config:
registers per thread and spill bytes (from ``ptxas -v`` on the PTX Triton
produced, ptxas from the Triton wheel, same flags as Triton's), shared memory
(Triton's metadata, checked against the family's per-block limit) and the
matrix instructions the PTX uses (wgmma, tcgen05, mma.sync or none).
The exit status is 1 if any config spills or exceeds its shared memory.

``--perf`` prints the static performance model instead (kernels/perf.py: per
workload, pass and architecture the computed and visible score pairs, useful %,
HBM and L2 bytes, and the predicted and roofline times; no compilation);
``--compile`` adds each kernel's registers, spills, shared memory and CTAs per SM
(kernels/occupancy.py), ``--sass`` also the forward loop's SASS instructions per MMA.

The "tf32" rows compile float32 with PyTorch's float32 matmul precision set to TF32
(which the launchers follow: TF32 tensor cores) on the GPU workloads at every head dim
and the table path at 64 (``TF32_PAIRS``).

Specialisation mirrors a real launch: arguments go through Triton's own
``native_specialize_impl`` with each parameter's do_not_specialize flags, on
"meta" tensors with the workload's shapes (contiguous, 16-byte aligned).

Untested: that the registers/spills reported here equal what the driver
reports at load time (no GPU in CI); ptxas is the same binary Triton uses.
"""
from __future__ import annotations

import os
import sys

if "nuwa3dna.kernels.triton.jit" not in sys.modules:
    # The interpreter replaces jit functions by Python ones that cannot be compiled.
    os.environ["TRITON_INTERPRET"] = "0"

import argparse
import contextlib
import hashlib
import itertools
import json
import re
import subprocess
import tempfile
from concurrent.futures import ProcessPoolExecutor
from typing import Dict, List

import torch
import triton
from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import BaseBackend, GPUTarget
from triton.compiler import ASTSource
from triton.runtime.autotuner import Heuristics

from nuwa3dna.kernels.problems import WINDOW_WORKLOADS, WORKLOADS, Problem
from nuwa3dna.kernels.triton import configs, launch
from nuwa3dna.kernels.triton.tables import SMEM_PER_BLOCK
from nuwa3dna.kernels.windows import Options, bias_radius

ARCHS = (80, 86, 89, 90, 100, 120)
HEAD_DIMS = (16, 32, 64, 128, 256)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
KERNELS = ("fwd", "preprocess", "dkdv", "dq")
REPORT_WORKLOADS = ("gpu-large", "nuwa-video")
TABLE_WORKLOADS = ("cpu-mid-dilation", "nuwa-video-stride")
TABLE_HEAD_DIMS = HEAD_DIMS
PROBLEMS = {**WORKLOADS, **WINDOW_WORKLOADS,
            "long-axis": Problem(1, (1, 1, 65536), 8, 64, (0, 0, 32), causal=True, name="long-axis")}
# Issue 14's kernel variants: kv heads (None: the query heads) and a bias (in q's dtype).
# Global tokens are merged outside the kernels (nuwa3dna.merge): ``global64`` compiles the plain ones.
VARIANTS = {"kv2": (2, False), "bias": (None, True), "kv2-bias": (2, True), "global64": (None, False)}
# At head dim 64 on both window paths. Not yet in the default set: head dim 128, where 3 of 96
# configs still spill 24-28 B (dK/dV bf16 on sm_120 and dQ fp32 on sm_86/89, at registers
# capped by ptxas at 168 and 72; configs._bias_rows has no smaller tile there).
VARIANT_PAIRS = (("gpu-large+kv2-bias", 64), ("nuwa-video+kv2-bias", 64), ("nuwa-video-stride+kv2-bias", 64))
DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
# "tf32": float32 inputs with PyTorch's float32 matmuls set to TF32, which the launchers
# follow (configs.float32_tf32): the kernels' TF32 tensor-core variant, on the GPU workloads.
DTYPE_BY_NAME = {**{v: k for k, v in DTYPE_NAMES.items()}, "tf32": torch.float32}
TF32_PAIRS = (*itertools.product(REPORT_WORKLOADS, HEAD_DIMS), *((w, 64) for w in TABLE_WORKLOADS))


@contextlib.contextmanager
def _float32_precision(tf32: bool):
    """PyTorch's float32 matmul precision set to TF32 (or IEEE) while the launches are built."""
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    matmul.fp32_precision = "tf32" if tf32 else "ieee"
    try:
        yield
    finally:
        matmul.fp32_precision = before


def variant(workload: str):
    """(problem, kv heads, bias shape or None) of a workload name, ``base`` or ``base+variant``."""
    base, _, name = workload.partition("+")
    p = PROBLEMS[base]
    kv_heads, bias = VARIANTS[name] if name else (None, False)
    shape = (p.heads, *(2 * bias_radius(e, None, p.border == "shift") + 1 for e in p.extent)) if bias else None
    return p, kv_heads or p.heads, shape


def launch_specs(workload: str, D: int, dtype: torch.dtype, arch: int) -> Dict[str, tuple]:
    """The launches of a forward + backward of ``workload`` (``variant``) at head dim D on ``arch``."""
    p, kv_heads, bias_shape = variant(workload)
    scale = D ** -0.5
    extent = p.resolved_extent
    opts, causal = Options.of(p.causal, **p.options), p.causal is True

    def t(grid, dt=dtype, heads=p.heads):
        return torch.empty(p.B, *grid, heads, D, dtype=dt, device="meta")

    q, k, v, out, dout, dq = t(p.q_grid), t(p.kv, heads=kv_heads), t(p.kv, heads=kv_heads), t(p.q_grid), \
        t(p.q_grid), t(p.q_grid)
    dk, dv = t(p.kv, heads=kv_heads), t(p.kv, heads=kv_heads)
    lse = torch.empty(launch.stats_shape(q), dtype=torch.float32, device="meta")
    delta = torch.empty_like(lse)
    bias = None if bias_shape is None else torch.empty(bias_shape, dtype=dtype, device="meta")
    dbias = None if bias_shape is None else torch.empty(bias_shape, dtype=torch.float32, device="meta")
    specs = {
        "fwd": launch.fwd_launch(q, k, v, out, lse, extent, causal, scale, arch, opts, bias=bias),
        "preprocess": launch.preprocess_launch(q, out, dout, delta, arch),
        "dq": launch.dq_launch(q, k, v, dout, lse, delta, dq, extent, causal, scale, arch, opts, bias=bias,
                               dbias=dbias),
    }
    dkdv = launch.dkdv_launches(q, k, v, dout, lse, delta, dk, dv, extent, causal, scale, arch, opts, bias=bias)
    if len(dkdv) == 1:
        specs["dkdv"] = dkdv[0]
    else:
        specs["dkdv:dk"], specs["dkdv:dv"] = dkdv
    return specs


def _source(spec):
    """ASTSource + options of a launch spec, specialised as Triton's launcher would."""
    kernel, _grid, args, meta = spec
    jit = kernel.fn if isinstance(kernel, Heuristics) else kernel
    meta = dict(meta)
    options = {"num_warps": meta.pop("num_warps"), "num_stages": meta.pop("num_stages")}
    bound = dict(zip(jit.arg_names, args))
    bound.update(meta)
    for name, rule in getattr(kernel, "values", {}).items():
        bound[name] = rule(bound)
    signature, constexprs, attrs = {}, {}, {}
    for i, prm in enumerate(jit.params):
        val = bound[prm.name]
        if prm.is_constexpr:
            signature[prm.name] = "constexpr"
            constexprs[prm.name] = val
            continue
        ty, attr = native_specialize_impl(BaseBackend, val, prm.is_const, not prm.do_not_specialize,
                                          not prm.do_not_specialize_on_alignment)
        signature[prm.name] = ty
        if ty == "constexpr":
            constexprs[prm.name] = attr
        elif isinstance(attr, str):
            attrs[(i,)] = BaseBackend.parse_attr(attr)
    return ASTSource(jit, signature, constexprs, attrs), options


def _ptxas_usage(ptx: str, arch: int) -> dict:
    """Registers and spill bytes from ``ptxas -v`` (cached by the PTX's hash)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
    key = hashlib.sha256(ptx.encode()).hexdigest()
    cache_dir = os.path.join(triton.knobs.cache.dir, "nuwa3dna-ptxas")
    cache = os.path.join(cache_dir, key + ".json")
    if os.path.exists(cache):
        with open(cache) as f:
            return json.load(f)
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        res = subprocess.run([get_ptxas(arch).path, "-v", "--regAllocOptLevel=2",
                              f"--gpu-name={sm_arch_from_capability(arch)}", src, "-o", src + ".o"],
                             capture_output=True, text=True, check=True)
    log = res.stderr + res.stdout
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    usage = {"regs": regs, "spill_stores": int(spill.group(1)), "spill_loads": int(spill.group(2))}
    os.makedirs(cache_dir, exist_ok=True)
    with open(cache + ".tmp%d" % os.getpid(), "w") as f:
        json.dump(usage, f)
    os.replace(cache + ".tmp%d" % os.getpid(), cache)
    return usage


def _mma(ptx: str) -> str:
    """The matrix instructions of a kernel's PTX."""
    for name, pattern in (("wgmma", "wgmma."), ("tcgen05", "tcgen05.mma"), ("mma.sync", "mma.sync")):
        if pattern in ptx:
            return name
    return "none"


def compile_spec(spec, arch: int) -> dict:
    src, options = _source(spec)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    ptx = compiled.asm["ptx"]
    usage = _ptxas_usage(ptx, arch)
    limit = SMEM_PER_BLOCK[configs.arch_family(arch)]
    return {
        "regs": usage["regs"],
        "spills": usage["spill_stores"] + usage["spill_loads"],
        "shared": compiled.metadata.shared,
        "smem_limit": limit,
        "smem_ok": compiled.metadata.shared <= limit,
        "mma": _mma(ptx),
        "wgmma": "wgmma." in ptx,
        "num_warps": options["num_warps"],
        "num_stages": options["num_stages"],
    }


def _rows(job) -> List[dict]:
    """Compile the launches of one (workload, D, dtype name, arch) for ``kernels``."""
    wl, D, dt_name, arch, kernels = job
    (p, _, bias_shape), dt = variant(wl), DTYPE_BY_NAME[dt_name]
    cfgs = configs.pick_configs(p.q_grid, p.kv, p.resolved_extent, D, dt, arch, p.causal is True,
                                Options.of(p.causal, **p.options), bias=bias_shape is not None,
                                tf32=dt_name == "tf32")
    rows = []
    with _float32_precision(dt_name == "tf32"):
        specs = launch_specs(wl, D, dt, arch)
    for name, spec in specs.items():
        kind = name.split(":")[0]
        if kind not in kernels:
            continue
        c = cfgs[kind]
        tiles = ("x".join(map(str, c.q_tile)) + "/" + "x".join(map(str, c.k_tile))
                 if kind != "preprocess" else str(c.block_q))
        rows.append({"workload": wl, "kernel": name, "D": D, "dtype": dt_name, "arch": f"sm_{arch}",
                     "family": configs.arch_family(arch), "tiles": tiles,
                     "wide_idx": bool(spec[3].get("WIDE_IDX", False)), "tables": bool(spec[3].get("TABLES", False)),
                     **compile_spec(spec, arch)})
    return rows


def report(workloads=REPORT_WORKLOADS, head_dims=HEAD_DIMS, dtypes=DTYPES, archs=ARCHS, kernels=KERNELS,
           extra=(("long-axis", 64), *itertools.product(TABLE_WORKLOADS, TABLE_HEAD_DIMS), *VARIANT_PAIRS), jobs=1,
           log=None, tf32=TF32_PAIRS) -> List[dict]:
    """Rows of every (workload, D) of workloads x head_dims plus ``extra``, x dtypes x archs,
    and of the (workload, D) pairs ``tf32`` with float32 on TF32 tensor cores, x archs."""
    pairs = [*itertools.product(workloads, head_dims), *extra]
    work = [(wl, D, DTYPE_NAMES[dt], arch, tuple(kernels))
            for (wl, D), dt, arch in itertools.product(pairs, dtypes, archs)]
    work += [(wl, D, "tf32", arch, tuple(kernels)) for (wl, D), arch in itertools.product(tf32, archs)]
    rows = []
    with ProcessPoolExecutor(jobs) if jobs > 1 else _Serial() as pool:
        for batch in pool.map(_rows, work):
            rows += batch
            for row in batch if log else ():
                log(row)
    return rows


class _Serial:
    """The map of a process pool, in this process."""
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    map = staticmethod(map)


def failures(rows) -> List[dict]:
    """Rows that spill or exceed the family's shared memory per block."""
    return [r for r in rows if r["spills"] or not r["smem_ok"]]


def _fmt(row) -> str:
    return (f"{row['workload']:<26} {row['kernel']:<10} {row['D']:>4} {row['dtype']:<5} {row['arch']:<7} "
            f"{row['tiles']:<13} {row['num_warps']:>2}/{row['num_stages']:<2} {row['regs']:>5} "
            f"{row['spills']:>6} {row['shared']:>7}/{row['smem_limit']:<7} {row['mma']:>8}")


HEADER = (f"{'workload':<26} {'kernel':<10} {'D':>4} {'dtype':<5} {'arch':<7} {'q/k tiles':<13} "
          f"{'w/s':<5} {'regs':>5} {'spills':>6} {'smem/limit':>15} {'mma':>8}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="gpu-large at head dims 64 and 128, long-axis, and the table path at 64")
    ap.add_argument("--json", action="store_true", help="print one JSON list instead of a table")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiler processes")
    ap.add_argument("--perf", action="store_true",
                    help="the static performance model (kernels/perf.py) instead of compiling")
    ap.add_argument("--sass", action="store_true",
                    help="with --perf: compile each forward and count SASS instructions per MMA in its loop "
                         "(implies --compile)")
    ap.add_argument("--compile", action="store_true",
                    help="with --perf: compile each row's kernels and add their registers, spills, shared "
                         "memory and CTAs per SM (kernels/perf.py)")
    a = ap.parse_args(argv)
    if a.perf:
        from nuwa3dna.kernels import perf
        if a.json:
            rows = perf.perf_rows()
            print(json.dumps(perf.with_usage(rows) if a.compile or a.sass else rows))
            return 0
        return perf.main(sass=a.sass, compile=a.compile)
    kw = dict(workloads=("gpu-large",), head_dims=(64, 128),
              extra=(("long-axis", 64), *((w, 64) for w in TABLE_WORKLOADS), VARIANT_PAIRS[0]),
              tf32=(("gpu-large", 64),)) if a.quick else {}
    if a.json:
        rows = report(jobs=a.jobs, **kw)
        print(json.dumps(rows))
    else:
        print(HEADER, flush=True)
        rows = report(jobs=a.jobs, log=lambda r: print(_fmt(r), flush=True), **kw)
        bad = failures(rows)
        print(f"{len(rows)} configs, {len(bad)} with spills or over the shared memory limit", flush=True)
    return 1 if failures(rows) else 0


if __name__ == "__main__":
    sys.exit(main())
