"""Workloads the benchmarks time: the shared named workloads plus the model's own layer sizes.

``WORKLOADS`` (``nuwa3dna.problems``, SPEC.md section 3) are shared by tests,
benchmarks and the README. ``MODEL_WORKLOADS`` are defined here only: the
attention calls of the shipped NÜWA model (model/checkpoints/default/config.json:
dim 128, 4 heads of 32, 32 px images / 4 = 8x8 tokens, 4 frames, 32 text
tokens), at batch 8. They are small (0.2-1.3 M score elements per call), the
sizes where ``backend="auto"`` may prefer dense SDPA, so they show whether
auto picks the faster single backend where the model actually runs.

* ``model-video``: decoder self-attention over a video, extent ``video_extent``.
* ``model-image``: decoder self-attention over one image, ``image_extent``.
* ``model-text``: text encoder self-attention, ``text_extent`` (the whole text).
* ``model-text-cross``: decoder cross-attention from the video to the text
  memory, ``cross_text_extent`` (every query sees the whole text).
* ``model-sketch-cross``: decoder cross-attention from the video to the sketch
  memory (same grid, so centres coincide), ``cross_sketch_extent``.
"""
from __future__ import annotations

import dataclasses

from typing import Optional

from nuwa3dna.problems import WINDOW_WORKLOADS, WORKLOADS, Problem

MODEL_WORKLOADS = {
    p.name: p for p in [
        Problem(8, (4, 8, 8), 4, 32, (1, 3, 3), causal=True, name="model-video"),
        Problem(8, (1, 8, 8), 4, 32, (0, 3, 3), causal=True, name="model-image"),
        Problem(8, (1, 1, 32), 4, 32, (0, 0, None), name="model-text"),
        Problem(8, (4, 8, 8), 4, 32, (0, 0, None), kv_grid=(1, 1, 32), name="model-text-cross"),
        Problem(8, (4, 8, 8), 4, 32, (1, 2, 2), kv_grid=(4, 8, 8), name="model-sketch-cross"),
    ]
}

ALL_WORKLOADS = {**WORKLOADS, **MODEL_WORKLOADS}

@dataclasses.dataclass(frozen=True)
class Variant:
    """An operator-v2 case timed against a plain workload, interleaved in one process
    (benchmarks/test_bench_attention.py, ``test_variant``): ``problem`` (a workload, with
    its window options) with ``kv_heads`` (None: as many as q), a relative position bias
    and ``global_tokens`` extra keys, against ``plain`` with none of them."""
    plain: str
    problem: str
    kv_heads: Optional[int] = None
    bias: bool = False
    global_tokens: int = 0


VARIANTS = {
    "cpu-mid-kv2": Variant("cpu-mid", "cpu-mid", kv_heads=2),         # GQA: 2 kv heads for 8 query heads
    "cpu-mid-bias": Variant("cpu-mid", "cpu-mid", bias=True),          # bias (8, 3, 7, 7)
    "cpu-mid-g64": Variant("cpu-mid", "cpu-mid", global_tokens=64),    # 64 global tokens
    # window options (issue 13): compared per visible pair (``vs_plain_per_pair``)
    **{n: Variant("cpu-mid", n) for n in ("cpu-mid-dilation", "cpu-mid-stride", "cpu-mid-frame-causal")},
}
VARIANT_PROBLEMS = {**ALL_WORKLOADS, **WINDOW_WORKLOADS}


def problem_to_json(p: Problem) -> dict:
    return dataclasses.asdict(p)


def problem_from_json(d: dict) -> Problem:
    tup = lambda x: None if x is None else tuple(x)
    return Problem(d["B"], tup(d["q_grid"]), d["heads"], d["D"], tup(d["extent"]), d["causal"],
                   tup(d["kv_grid"]), d.get("name"))

