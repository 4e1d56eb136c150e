"""Markdown summary of the last benchmark run (benchmarks/results.json).

``python -m benchmarks.summary`` prints it; the benchmark session prints it too.
Ratios are peer time / our time from the same run (> 1: we are faster).
``auto / best`` (section after the table): auto's median over the faster of
the single backends auto chooses between (torch or triton, and dense), per
workload and pass, all from the same run (<= ~1.05 within noise when auto
picks right).
"""
from __future__ import annotations

import json
import os
import sys

from benchmarks.conftest import RESULTS

PEERS = ("dense", "flex", "unfold", "natten", "sdpa-full")
OURS = ("torch", "triton", "auto")


def _f(x, fmt="{:.1f}"):
    return "" if x is None else fmt.format(x)


def _targets(recs, meta):
    """SPEC.md section 4 CPU targets, each computed from this run's numbers."""
    get = lambda w, d: recs.get(f"{w}|{d}|cpu|torch")
    lines = []
    fwd, fb, big = get("cpu-mid", "fwd"), get("cpu-mid", "fwdbwd"), get("cpu-mid-4x", "fwd")

    def check(label, value, ok):
        if value is None:
            lines.append(f"- {label}: not measured")
        else:
            lines.append(f"- {label}: {value} {'(met)' if ok else '(NOT met)'}")
    if fwd:
        r = fwd.get("ratio_vs_flex")
        check("cpu-mid fwd vs compiled Flex >= 4x", _f(r, "{:.2f}x") or None, r is not None and r >= 4)
        r = fwd.get("ratio_vs_dense")
        check("cpu-mid fwd vs dense SDPA >= 10x", _f(r, "{:.2f}x") or None, r is not None and r >= 10)
        r = fwd.get("pct_of_matmul")
        check("cpu-mid fwd FLOP rate >= 25% of fp32 matmul", _f(r, "{:.1f}%") or None,
              r is not None and r >= 25)
    if fb:
        r = fb.get("ratio_vs_dense")
        check("cpu-mid fwd+bwd vs dense SDPA autograd >= 5x", _f(r, "{:.2f}x") or None,
              r is not None and r >= 5)
    if fwd and big:
        g = big["median_ms"] / fwd["median_ms"]
        check("time(cpu-mid-4x) / time(cpu-mid) <= 4.5", f"{g:.2f}", g <= 4.5)
        if "peak_mb" in fwd and "peak_mb" in big:
            m = big["peak_mb"] / max(fwd["peak_mb"], 1e-9)
            lines.append(f"- peak memory cpu-mid-4x / cpu-mid (4x tokens): {m:.2f} "
                         f"({fwd['peak_mb']:.0f} MiB -> {big['peak_mb']:.0f} MiB)")
    return lines


def render(data) -> str:
    recs, meta = data["records"], data.get("meta", {})
    head = ("| device | workload | dir | backend | ms | useful GFLOP/s | % fp32 mm | "
            + " | ".join(f"x vs {p}" for p in PEERS) + " | peak MiB |")
    sep = "|" + "---|" * (head.count("|") - 1)
    rows = [head, sep]
    order = lambda r: (r["device"], r["workload"], r["direction"], r["backend"] not in OURS,
                       r["backend"])
    for r in sorted(recs.values(), key=order):
        name = _name(r)
        ours = r["backend"] in OURS
        label = ("**%s**" % r["backend"]) if ours else r["backend"]
        if r.get("auto_choice"):
            label += f" ({r['auto_choice']})"
        rows.append("| " + " | ".join([
            r["device"], name, r["direction"], label,
            _f(r["median_ms"]), _f(r["gflops"]), _f(r.get("pct_of_matmul")),
            *[_f(r.get(f"ratio_vs_{p}"), "{:.2f}") for p in PEERS],
            _f(r.get("peak_mb"), "{:.0f}")]) + " |")
    load = lambda k: "/".join(f"{x:.1f}" for x in meta[k]) if meta.get(k) else "?"
    out = [f"torch {meta.get('torch')}, {meta.get('threads')} CPU threads, "
           f"fp32 matmul {_f(meta.get('matmul_gflops_cpu_fp32'))} GFLOP/s, GPU: {meta.get('cuda')}",
           f"{'every case in its own fresh process' if meta.get('isolated') else 'all cases in one process'}"
           + (f" (OMP_WAIT_POLICY={meta['omp_wait_policy']})" if meta.get("omp_wait_policy") else "") + "; "
           f"load average (1/5/15 min) {load('loadavg_start')} at start, {load('loadavg_end')} at end"
           + (f" ({meta['started']} - {meta['ended']})" if meta.get("started") and meta.get("ended") else ""),
           "", *rows, "", *_auto(recs), *_variants(recs), "", "SPEC targets (CPU, this run):",
           *_targets(recs, meta)]
    return "\n".join(out)


def _variants(recs):
    """The operator-v2 variant rows (``-k variant``): time against plain cpu-mid timed interleaved
    in the same process, and per visible pair (the window options change how many keys a
    query sees; issue 13's bound is 1.3)."""
    rows = sorted((r for r in recs.values() if "vs_plain_paired" in r),
                  key=lambda r: (r["device"], r["workload"], r["direction"]))
    if not rows:
        return []
    lines = ["", "Variants vs plain cpu-mid (interleaved in one process; > 1: the variant is slower).", "",
             "| device | variant | dir | ms | plain ms | variant / plain | per visible pair | peak MiB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append("| " + " | ".join([
            r["device"], r["workload"], r["direction"], _f(r["median_ms"], "{:.2f}"),
            _f(r.get("plain_ms_paired"), "{:.2f}"), _f(r["vs_plain_paired"], "{:.2f}"),
            _f(r.get("vs_plain_per_pair"), "{:.2f}"), _f(r.get("peak_mb"), "{:.0f}")]) + " |")
    return lines


def _name(r):
    return r["workload"] + ("" if r.get("scale", [1, 1, 1]) == [1, 1, 1] else " (/{}x{}x{})".format(*r["scale"]))


def _auto(recs):
    """auto / best single backend, per workload and pass."""
    autos = sorted((r for r in recs.values() if r["backend"] == "auto"),
                   key=lambda r: (r["device"], r["workload"], r["direction"]))
    if not autos:
        return []
    lines = ["auto vs the best single backend (same run). Rows: each backend in its own process; "
             "paired: auto and the contenders interleaved in one process (the figure to read).", "",
             "| device | workload | dir | auto picks | auto ms | torch/triton ms | dense ms | auto / best (rows) "
             "| paired ms (auto; contenders) | auto / best (paired) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    worst = None
    for r in autos:
        get = lambda b: recs.get(f"{r['workload']}|{r['direction']}|{r['device']}|{b}")
        fast = get("torch") or get("triton")
        dense = get("dense")
        pm = r.get("paired_ms") or {}
        paired = "; ".join(f"{b} {ms:.2f}" for b, ms in pm.items())
        ratio = r.get("auto_vs_best_paired")
        if ratio is not None and (worst is None or ratio > worst[0]):
            worst = (ratio, f"{_name(r)} {r['direction']}")
        lines.append("| " + " | ".join([
            r["device"], _name(r), r["direction"], r.get("auto_choice", "?"), _f(r["median_ms"], "{:.2f}"),
            _f(fast and fast["median_ms"], "{:.2f}"), _f(dense and dense["median_ms"], "{:.2f}"),
            _f(r.get("auto_vs_best"), "{:.2f}") + (f" ({r['best_single']})" if r.get("best_single") else ""),
            paired, _f(ratio, "{:.2f}") + (f" ({r['best_single_paired']})" if ratio is not None else "")]) + " |")
    if worst:
        lines += ["", f"- worst auto / best (paired): {worst[0]:.2f} ({worst[1]})"]
    return lines
def main(argv):
    path = argv[0] if argv else RESULTS
    if not os.path.exists(path):
        print(f"no results at {path}; run: pytest benchmarks/ --benchmark-only")
        return 1
    with open(path) as f:
        print(render(json.load(f)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
