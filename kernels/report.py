"""Ahead-of-time GPU report of the 3DNA kernels, without a GPU.

``python -m nuwa3dna.kernels.report [--quick] [--json]`` compiles every kernel
(forward, preprocess, dK/dV, dQ) for sm_90 and sm_80 with exactly the launch
configuration the launchers pick (``triton.launch.*_launch`` build the arguments,
block sizes, num_warps and num_stages; nothing is restated here), for head
dims 16/32/64/128/256 and float16/bfloat16/float32, on the GPU workloads of
SPEC.md (``gpu-large``: non-causal, ``nuwa-video``: causal). It prints per
config: registers per thread and spill bytes (from ``ptxas -v`` on the PTX
Triton produced, ptxas from the Triton wheel, same flags as Triton's), shared
memory (Triton's metadata, checked against the arch's per-block limit) and
whether the sm_90 PTX uses ``wgmma``.

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
import hashlib
import json
import re
import subprocess
import tempfile
from typing import Dict, List

import torch
import triton
from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import BaseBackend, GPUTarget
from triton.compiler import ASTSource
from triton.runtime.autotuner import Heuristics

from nuwa3dna.kernels.problems import WORKLOADS
from nuwa3dna.kernels.triton import configs, launch

ARCHS = (90, 80)
HEAD_DIMS = (16, 32, 64, 128, 256)
# Largest shared memory one block may use: H100 227 KiB, A100 163 KiB.
SMEM_LIMIT = {90: 232448, 80: 166912}
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
REPORT_WORKLOADS = ("gpu-large", "nuwa-video")
DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def launch_specs(workload: str, D: int, dtype: torch.dtype, arch: int) -> Dict[str, tuple]:
    """The launches of a forward + backward of ``workload`` at head dim D on ``arch``."""
    p = WORKLOADS[workload]
    scale = D ** -0.5
    extent = p.resolved_extent

    def t(grid, dt=dtype):
        return torch.empty(p.B, *grid, p.heads, D, dtype=dt, device="meta")

    q, k, v, out, dout, dq = t(p.q_grid), t(p.kv), t(p.kv), t(p.q_grid), t(p.q_grid), t(p.q_grid)
    dk, dv = t(p.kv), t(p.kv)
    lse = torch.empty(launch.stats_shape(q), dtype=torch.float32, device="meta")
    delta = torch.empty_like(lse)
    specs = {
        "fwd": launch.fwd_launch(q, k, v, out, lse, extent, p.causal, scale, arch),
        "preprocess": launch.preprocess_launch(q, out, dout, delta, arch),
        "dq": launch.dq_launch(q, k, v, dout, lse, delta, dq, extent, p.causal, scale, arch),
    }
    dkdv = launch.dkdv_launches(q, k, v, dout, lse, delta, dk, dv, extent, p.causal, scale, arch)
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
    with open(cache, "w") as f:
        json.dump(usage, f)
    return usage


def compile_spec(spec, arch: int) -> dict:
    src, options = _source(spec)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    ptx = compiled.asm["ptx"]
    usage = _ptxas_usage(ptx, arch)
    return {
        "regs": usage["regs"],
        "spills": usage["spill_stores"] + usage["spill_loads"],
        "shared": compiled.metadata.shared,
        "smem_ok": compiled.metadata.shared <= SMEM_LIMIT[arch],
        "wgmma": "wgmma" in ptx,
        "num_warps": options["num_warps"],
        "num_stages": options["num_stages"],
    }


def report(workloads=REPORT_WORKLOADS, head_dims=HEAD_DIMS, dtypes=DTYPES, archs=ARCHS,
           kernels=("fwd", "preprocess", "dkdv", "dq"), log=None) -> List[dict]:
    rows = []
    for wl in workloads:
        p = WORKLOADS[wl]
        for D in head_dims:
            for dt in dtypes:
                for arch in archs:
                    specs = launch_specs(wl, D, dt, arch)
                    cfgs = configs.pick_configs(p.q_grid, p.kv, p.resolved_extent, D, dt, arch)
                    for name, spec in specs.items():
                        if name.split(":")[0] not in kernels:
                            continue
                        c = cfgs[name.split(":")[0]]
                        tiles = ("x".join(map(str, c.q_tile)) + "/" + "x".join(map(str, c.k_tile))
                                 if name != "preprocess" else str(c.block_q))
                        row = {"workload": wl, "kernel": name, "D": D, "dtype": DTYPE_NAMES[dt],
                               "arch": f"sm_{arch}", "tiles": tiles, **compile_spec(spec, arch)}
                        rows.append(row)
                        if log:
                            log(row)
    return rows


def _fmt(row) -> str:
    return (f"{row['workload']:<11} {row['kernel']:<10} {row['D']:>4} {row['dtype']:<5} {row['arch']:<6} "
            f"{row['tiles']:<13} {row['num_warps']:>2}/{row['num_stages']:<2} {row['regs']:>5} {row['spills']:>6} "
            f"{row['shared']:>7} {'yes' if row['wgmma'] else 'no':>5}")


HEADER = (f"{'workload':<11} {'kernel':<10} {'D':>4} {'dtype':<5} {'arch':<6} {'q/k tiles':<13} "
          f"{'w/s':<5} {'regs':>5} {'spills':>6} {'smem':>7} {'wgmma':>5}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="gpu-large, head dims 64 and 128 only")
    ap.add_argument("--json", action="store_true", help="print one JSON list instead of a table")
    a = ap.parse_args(argv)
    kw = dict(workloads=("gpu-large",), head_dims=(64, 128)) if a.quick else {}
    if a.json:
        print(json.dumps(report(**kw)))
        return
    print(HEADER, flush=True)
    report(log=lambda r: print(_fmt(r), flush=True), **kw)


if __name__ == "__main__":
    main()
