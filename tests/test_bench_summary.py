"""benchmarks/summary.py renders the variant rows (operator v2: ``pytest benchmarks/
--benchmark-only -k variant``) with their paired and per-visible-pair ratios."""
from benchmarks.summary import render


def _rec(workload, backend, ms, **extra):
    return {"workload": workload, "direction": "fwd", "backend": backend, "device": "cpu", "median_ms": ms,
            "gflops": 1.0, "scale": [1, 1, 1], **extra}


def test_variant_rows_are_rendered():
    recs = {"cpu-mid|fwd|cpu|torch": _rec("cpu-mid", "torch", 10.0),
            "cpu-mid-dilation|fwd|cpu|torch": _rec("cpu-mid-dilation", "torch", 12.5, plain_ms_paired=10.0,
                                                   vs_plain_paired=1.25, vs_plain_per_pair=1.75, peak_mb=300.0)}
    text = render({"records": recs, "meta": {}})
    lines = text.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("| device | variant |"))
    rows = [line for line in lines[head + 2:] if line.startswith("| cpu |")]
    assert rows == ["| cpu | cpu-mid-dilation | fwd | 12.50 | 10.00 | 1.25 | 1.75 | 300 |"], rows


def test_no_variant_section_without_variant_rows():
    text = render({"records": {"cpu-mid|fwd|cpu|torch": _rec("cpu-mid", "torch", 10.0)}, "meta": {}})
    assert "| device | variant |" not in text
