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

from nuwa3dna.problems import WORKLOADS, Problem

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

# Operator v2 beyond the window (issue 14), each timed against its plain workload
# interleaved in one process (benchmarks/test_bench_attention.py, ``test_variant``):
# name -> (workload, kv heads (None: as many as q), relative position bias).
VARIANTS = {
    "cpu-mid-kv2": ("cpu-mid", 2, False),       # GQA: 2 kv heads for 8 query heads
    "cpu-mid-bias": ("cpu-mid", None, True),    # bias (8, 3, 7, 7)
}


def problem_to_json(p: Problem) -> dict:
    return dataclasses.asdict(p)


def problem_from_json(d: dict) -> Problem:
    tup = lambda x: None if x is None else tuple(x)
    return Problem(d["B"], tup(d["q_grid"]), d["heads"], d["D"], tup(d["extent"]), d["causal"],
                   tup(d["kv_grid"]), d.get("name"))

