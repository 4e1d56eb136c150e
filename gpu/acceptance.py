"""GPU acceptance of the Triton backend: the first thing a session with a lent GPU runs.

    python gpu/acceptance.py --out gpu_acceptance.md            # on the GPU machine, 3-9 minutes
    python gpu/acceptance.py --dry-run --out /tmp/dry.md        # anywhere (CPU, interpreter), ~30 s

On a lent GPU, run it first, in one call with a limit of about 590 s: the
slow steps have their own limits (each sanitizer case 150 s, the pytest step
240 s; ``--case-timeout``, ``--pytest-timeout``), and the report is rewritten
after every step.

Steps, each a section of one markdown report (written after every step, so a
run cut short still leaves what it measured):

1. versions (Python, torch, Triton, CUDA, git revision) and ``nvidia-smi``;
2. ``compute-sanitizer --tool memcheck`` on a small causal and a small cross
   problem, forward and backward, bf16 (``--case``, with PyTorch's caching
   allocator off so a stray access is not hidden inside a pooled block);
3. accuracy: gpu-large and nuwa-video in bf16 and fp16 against the fp32 dense
   result, output and dq/dk/dv, under the FlashAttention rule of the tests
   (err <= 2 * err(dense SDPA in that dtype) + atol);
4. times (``triton.testing.do_bench``, bf16, forward and forward+backward) of
   ours, compiled FlexAttention with the same mask, dense SDPA with the mask,
   and SDPA without a mask (the FlashAttention bar), with the useful TFLOP/s;
   next to the static prediction (``nuwa3dna.kernels.perf``) where it exists;
5. the Triton tests on CUDA (``pytest tests/test_triton.py tests/test_triton_launch.py``),
   last because they compile the most (their own time limit, ``--pytest-timeout``).

``--dry-run`` runs without CUDA: steps 1 and 5 (``--collect-only``) run, the
sanitizer cases run under the Triton interpreter without the sanitizer, the
accuracy step runs on the workloads shrunk to a few tokens (interpreter), and
the timing step builds its inputs and masks but times nothing; each skipped
part says so in the report. ``--only STEP`` (repeatable) runs a subset.
Tested by tests/test_acceptance.py (the dry run).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import shutil
import subprocess
import sys
import time
from typing import Callable, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = ("versions", "sanitizer", "accuracy", "timing", "pytest")
CASES = ("causal", "cross")


def _problems():
    from nuwa3dna.problems import Problem
    return {"causal": Problem(1, (3, 5, 6), 2, 64, (1, 2, 2), causal=True),
            "cross": Problem(1, (3, 5, 7), 2, 64, (1, 1, 2), kv_grid=(2, 3, 4))}


def _sh(cmd: List[str], timeout: float, env=None) -> tuple:
    """(exit status or 'timeout', last 3000 characters of stdout+stderr, seconds)."""
    t0 = time.time()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                           env=dict(os.environ, **(env or {})))
        return r.returncode, (r.stdout + r.stderr)[-3000:], time.time() - t0
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return "timeout", out[-3000:], time.time() - t0


def _block(text: str) -> str:
    return "```\n" + text.strip() + "\n```\n"


# ----------------------------------------------------------------------------- steps

def step_versions(a) -> str:
    import torch
    import triton
    rev = _sh(["git", "rev-parse", "--short", "HEAD"], 30)[1].strip()
    lines = [f"- python {platform.python_version()}, torch {torch.__version__}, triton {triton.__version__}, "
             f"CUDA {torch.version.cuda}, git {rev}",
             f"- cuda available: {torch.cuda.is_available()}"]
    if torch.cuda.is_available():
        lines.append(f"- device: {torch.cuda.get_device_name()} capability {torch.cuda.get_device_capability()}")
    smi = shutil.which("nvidia-smi")
    body = _block(_sh([smi], 60)[1]) if smi else "nvidia-smi: not found (skipped)\n"
    return "\n".join(lines) + "\n\n" + body


def run_case(name: str, device: str) -> None:
    """Forward and backward of a small problem in bf16 through backend="triton" (the sanitizer's target)."""
    import torch
    from nuwa3dna import nearby_attention
    p = _problems()[name]
    if device != "cuda":    # the dry run's interpreter: one head, head dim 16
        p = dataclasses.replace(p, heads=1, D=16)
    q, k, v = p.make(torch.bfloat16, device=device, requires_grad=True)
    out = nearby_attention(q, k, v, p.extent, causal=p.causal, backend="triton")
    out.float().square().sum().backward()
    if device == "cuda":
        torch.cuda.synchronize()
    assert all(torch.isfinite(x).all() for x in (out, q.grad, k.grad, v.grad))
    print(f"case {name}: ok {tuple(out.shape)}")


def step_sanitizer(a) -> str:
    san = shutil.which("compute-sanitizer") or next(
        (p for p in ("/usr/local/cuda/bin/compute-sanitizer",) if os.path.exists(p)), None)
    rows = ["| case | command | status | seconds |", "|---|---|---|---|"]
    logs = []
    for case in CASES:
        cmd = [sys.executable, os.path.join("gpu", "acceptance.py"), "--case", case]
        env = {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}
        if a.dry_run:
            env["TRITON_INTERPRET"] = "1"
            note = "interpreter, no sanitizer (dry run)"
        elif san:
            cmd = [san, "--tool", "memcheck", "--error-exitcode", "9", *cmd]
            note = "memcheck"
        else:
            note = "compute-sanitizer not found: plain run"
        rc, out, sec = _sh(cmd, a.case_timeout, env)
        rows.append(f"| {case} | {note} | {'ok' if rc == 0 else f'FAILED ({rc})'} | {sec:.0f} |")
        logs.append(f"{case}:\n{out[-1200:]}")
    return "\n".join(rows) + "\n\n" + _block("\n".join(logs))


def _max_err(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()


def _fwd_bwd(fn, q, k, v, g):
    """[out, dq, dk, dv] of fn, detached."""
    import torch
    xs = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out = fn(*xs)
    return [out.detach(), *(x.detach() for x in torch.autograd.grad(out, xs, g.to(out.dtype)))]


def _by_heads(fn, q, k, v, g, chunk=2):
    """_fwd_bwd of the dense reference, ``chunk`` heads at a time: heads are independent, and
    SDPA may fall back to its math kernel (a (B, heads, Nq, Nk) fp32 score tensor: 174 GB
    for gpu-large at once)."""
    import torch
    parts = [_fwd_bwd(fn, *(x[..., h:h + chunk, :] for x in (q, k, v, g)))
             for h in range(0, q.shape[-2], chunk)]
    return [torch.cat(ts, dim=-2) for ts in zip(*parts)]


def _accuracy_problems(a):
    from nuwa3dna.problems import WORKLOADS
    names = ("gpu-large", "nuwa-video")
    if not a.dry_run:
        return {n: WORKLOADS[n] for n in names}
    # Interpreter: a few tokens, one head, the same extents and flags.
    return {n: dataclasses.replace(WORKLOADS[n].scaled(5, 7, 7), B=1, heads=1, D=16) for n in names}


def step_accuracy(a) -> str:
    import torch
    from nuwa3dna import nearby_attention
    from nuwa3dna.reference import dense_nearby_attention
    dev = "cpu" if a.dry_run else "cuda"
    atol = {torch.float16: 1e-3, torch.bfloat16: 1e-3}
    rows = ["| workload | dtype | tensor | err ours | err dense | ratio | ok |", "|---|---|---|---|---|---|---|"]
    for name, p in _accuracy_problems(a).items():
        g0 = torch.Generator().manual_seed(0)
        q32, k32, v32 = p.make(torch.float32, device=dev, generator=g0)
        g32 = torch.randn(q32.shape, generator=g0).to(dev)

        def dense(q, k, v, p=p):
            return dense_nearby_attention(q, k, v, p.extent, p.causal)

        ref = _by_heads(dense, q32, k32, v32, g32)
        for dt in (torch.bfloat16, torch.float16):
            q, k, v, g = (x.to(dt) for x in (q32, k32, v32, g32))
            base = _by_heads(dense, q, k, v, g)
            ours = _fwd_bwd(lambda *x, p=p: nearby_attention(*x, p.extent, causal=p.causal, backend="triton"),
                            q, k, v, g)
            for t, o, b, r in zip(("out", "dq", "dk", "dv"), ours, base, ref):
                e, eb = _max_err(o, r), _max_err(b, r)
                # The interpreter casts fp32 -> bf16 by truncation (Triton 3.9's cast_impl passes
                # no rounding mode): one more bf16 ulp of the largest value in the dry run.
                slack = 2.0 ** -7 * r.abs().max().item() if a.dry_run and dt == torch.bfloat16 else 0.0
                ok = e <= 2 * eb + atol[dt] + slack
                rows.append(f"| {p.name if not a.dry_run else p.id} | {str(dt)[6:]} | {t} | {e:.2e} | "
                            f"{eb:.2e} | {e / max(eb, 1e-12):.2f} | {'ok' if ok else 'FAIL'} |")
            del base, ours
        del ref
    note = ("(dry run: workloads shrunk to a few tokens, interpreter on CPU; bf16 gets one ulp of "
            "slack for the interpreter's truncating fp32 -> bf16 cast)\n\n" if a.dry_run else "")
    return note + "\n".join(rows) + "\n"


def _mask_mod(p):
    """FlexAttention mask_mod of 3DNA on raster indices (as a FlexAttention user would write it)."""
    (T, H, W), (T2, H2, W2), (et, eh, ew) = p.q_grid, p.kv, p.resolved_extent

    def mask_mod(b, h, i, j):
        t, y, x = i // (H * W), (i // W) % H, i % W
        a, yb, xc = j // (H2 * W2), (j // W2) % H2, j % W2
        ok = (((a - t * T2 // T).abs() <= et) & ((yb - y * H2 // H).abs() <= eh)
              & ((xc - x * W2 // W).abs() <= ew))
        return ok & (j <= i) if p.causal else ok
    return mask_mod


def _timing_fns(p, dev):
    """{name: (forward fn, forward+backward fn)} of the peers on ``p``, bf16, each in its native layout."""
    import torch
    import torch.nn.functional as F
    from nuwa3dna import nearby_attention
    from nuwa3dna.reference import nearby_mask
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    q, k, v = p.make(torch.bfloat16, device=dev, requires_grad=True)
    qh, kh, vh = (x.detach().flatten(1, 3).transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
    mask = nearby_mask(p.q_grid, p.kv, p.extent, p.causal, device=dev)
    block = create_block_mask(_mask_mod(p), None, None, mask.shape[0], mask.shape[1], device=dev)
    flex = torch.compile(flex_attention, dynamic=False)
    fns = {
        "ours": lambda: nearby_attention(q, k, v, p.extent, causal=p.causal, backend="triton"),
        "flex (compiled)": lambda: flex(qh, kh, vh, block_mask=block),
        "sdpa + mask": lambda: F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask),
        "sdpa, no mask (flash)": lambda: F.scaled_dot_product_attention(qh, kh, vh),
    }
    return fns, (q, k, v, qh, kh, vh)


def step_timing(a) -> str:
    import torch
    from nuwa3dna.problems import WORKLOADS
    try:
        from nuwa3dna.kernels import perf
    except ImportError:
        perf = None
    rows = ["| workload | pass | impl | ms | useful TFLOP/s | predicted ms |", "|---|---|---|---|---|---|"]
    for name in ("gpu-large", "nuwa-video"):
        p = WORKLOADS[name]
        if a.dry_run:
            small = dataclasses.replace(p.scaled(5, 7, 7), B=1, heads=1)
            fns, _ = _timing_fns(small, "cpu")
            rows.append(f"| {name} | - | {', '.join(fns)} | skipped (dry run: inputs and masks built "
                        f"on {small.id}, nothing timed) | | |")
            continue
        from triton.testing import do_bench
        fns, tensors = _timing_fns(p, "cuda")
        for kind in ("fwd", "fwd+bwd"):
            pred = perf.predicted_ms(p, kind) if perf and hasattr(perf, "predicted_ms") else None
            for impl, fn in fns.items():
                def bench(fn=fn, fwd_only=kind == "fwd"):
                    out = fn()
                    if not fwd_only:
                        out.backward(_ones(out))

                try:
                    with torch.no_grad() if kind == "fwd" else torch.enable_grad():
                        ms = do_bench(bench, warmup=10, rep=50, grad_to_none=list(tensors))
                    tf = p.flops(backward=kind != "fwd") / ms / 1e9
                    rows.append(f"| {name} | {kind} | {impl} | {ms:.3f} | {tf:.1f} | "
                                f"{'' if pred is None else f'{pred:.3f}'} |")
                except Exception as e:      # a peer failing to run is a row, not the end of the run
                    rows.append(f"| {name} | {kind} | {impl} | error: {type(e).__name__}: {str(e)[:80]} | | |")
        del fns, tensors
        torch.cuda.empty_cache()
    return "\n".join(rows) + "\n"


_ONES = {}


def _ones(out):
    key = (out.shape, out.dtype, out.device)
    if key not in _ONES:
        import torch
        _ONES[key] = torch.ones_like(out)
    return _ONES[key]


def step_pytest(a) -> str:
    cmd = [sys.executable, "-m", "pytest", "tests/test_triton.py", "tests/test_triton_launch.py", "-q",
           "-p", "no:cacheprovider"]
    env = {}
    if a.dry_run:
        cmd.append("--collect-only")
        env["TRITON_INTERPRET"] = "1"
    rc, out, sec = _sh(cmd, a.pytest_timeout, env)
    head = f"`{' '.join(cmd[1:])}`: exit {rc} in {sec:.0f} s" + (" (dry run: collected only)" if a.dry_run else "")
    return head + "\n\n" + _block(out[-2500:])


# ----------------------------------------------------------------------------- driver

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="gpu_acceptance.md")
    ap.add_argument("--dry-run", action="store_true", help="no CUDA: skip what needs it, run the rest")
    ap.add_argument("--only", action="append", choices=STEPS, help="run only these steps (repeatable)")
    ap.add_argument("--case", choices=CASES, help="internal: run one sanitizer case and exit")
    ap.add_argument("--case-timeout", type=float, default=150)
    ap.add_argument("--pytest-timeout", type=float, default=240)
    a = ap.parse_args(argv)
    import torch
    if a.case:
        run_case(a.case, "cuda" if torch.cuda.is_available() else "cpu")
        return 0
    if not a.dry_run and not torch.cuda.is_available():
        ap.error("no CUDA device: use --dry-run")
    if a.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"   # before nuwa3dna's kernels are imported
    steps: List[tuple] = [(s, globals()["step_" + s]) for s in STEPS if not a.only or s in a.only]
    print("plan:", ", ".join(s for s, _ in steps), "(dry run)" if a.dry_run else "", flush=True)
    sections = [f"# GPU acceptance{' (dry run, no CUDA)' if a.dry_run else ''}\n",
                f"`python gpu/acceptance.py {' '.join(argv if argv is not None else sys.argv[1:])}`\n"]
    failed = False
    for name, fn in steps:
        t0 = time.time()
        try:
            body = fn(a)
        except Exception as e:  # noqa: BLE001  (one failing step must not lose the others' results)
            import traceback
            body, failed = "ERROR\n\n" + _block(traceback.format_exc()[-3000:]), True
        failed |= "FAIL" in body
        sections.append(f"## {name} ({time.time() - t0:.0f} s)\n\n{body}")
        with open(a.out, "w") as f:
            f.write("\n".join(sections))
        print(f"{name}: {time.time() - t0:.0f} s", flush=True)
    print("report:", a.out)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    sys.exit(main())
