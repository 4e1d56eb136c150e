"""The GPU acceptance script (gpu/acceptance.py) runs end to end without CUDA in
its dry run, so its first GPU run is not its first run: every step runs, what
needs CUDA says it was skipped, the interpreter runs the sanitizer cases and the
shrunk accuracy check (within the FlashAttention rule), and the markdown report
is written. About 30-60 s (three Python subprocesses and the interpreter).

Untested here: the GPU-only parts (compute-sanitizer, do_bench, pytest on CUDA).
"""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_dry_run(tmp_path):
    out = tmp_path / "acceptance.md"
    res = subprocess.run([sys.executable, os.path.join(ROOT, "gpu", "acceptance.py"), "--dry-run",
                          "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    text = out.read_text()
    for step in ("versions", "sanitizer", "accuracy", "timing", "pytest"):
        assert f"## {step} (" in text, step
    assert "ERROR" not in text and "FAIL" not in text, text
    assert "nvidia-smi: not found" in text or "NVIDIA-SMI" in text
    assert text.count("| ok |") >= 2 + 2 * 2 * 4          # 2 cases; 2 workloads x 2 dtypes x 4 tensors
    assert "skipped (dry run" in text and "collected only" in text
    assert "tests collected" in text
