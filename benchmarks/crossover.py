"""Where ``backend="auto"`` should switch from the CPU tile path to dense SDPA.

``python -m benchmarks.crossover`` times both backends, forward and forward +
backward, interleaved in one process (so machine load hits both alike), on the
model's own layer sizes at several batch sizes and on the named workloads, and
prints each problem's score elements (B*heads*Nq*Nk: what dense computes), its
visible fraction and the time ratio dense / tile (> 1: the tile path is faster).
The threshold in ``nuwa3dna/dispatch.py`` comes from this table.
"""
from __future__ import annotations

import math
import time

import torch

from nuwa3dna import nearby_attention
from nuwa3dna.problems import WORKLOADS, Problem


def _model_problems():
    out = []
    for B in (1, 4, 16):
        out += [
            Problem(B, (4, 8, 8), 4, 32, (1, 3, 3), causal=True, name="video-self"),
            Problem(B, (1, 8, 8), 4, 32, (0, 3, 3), causal=True, name="image-self"),
            Problem(B, (1, 1, 32), 4, 32, (0, 0, None), name="text-self"),
            Problem(B, (4, 8, 8), 4, 32, (0, 0, None), kv_grid=(1, 1, 32), name="text-cross"),
            Problem(B, (4, 8, 8), 4, 32, (1, 2, 2), kv_grid=(4, 8, 8), name="sketch-cross"),
        ]
    # Between the model's sizes and the named workloads: where the switch lies.
    out += [Problem(B, (8, 16, 16), 4, 32, (1, 3, 3), causal=c, name="mid")
            for B in (1, 4) for c in (False, True)]
    out += [Problem(1, (4, 16, 16), 8, 64, (1, 3, 3), name="mid"),
            Problem(1, (16, 16, 16), 8, 64, (1, 3, 3), name="mid"),
            Problem(2, (1, 32, 32), 8, 64, (0, 3, 3), causal=True, name="mid")]
    return out


def _time(fn, reps: int) -> float:
    fn()
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure(p: Problem, reps: int = 7):
    q, k, v = p.make(torch.float32, requires_grad=True)
    dout = torch.randn(q.shape)
    res = {}
    for backend in ("dense", "torch"):
        def fwd():
            with torch.no_grad():
                nearby_attention(q, k, v, p.extent, causal=p.causal, backend=backend)

        def fwdbwd():
            out = nearby_attention(q, k, v, p.extent, causal=p.causal, backend=backend)
            torch.autograd.grad(out, (q, k, v), dout)
        res[backend] = (_time(fwd, reps), _time(fwdbwd, max(3, reps // 2)))
    return res


def main():
    import sys
    from benchmarks.workloads import MODEL_WORKLOADS
    probs = _model_problems() + [WORKLOADS[n] for n in ("nuwa-image", "nuwa-video", "cross-sketch", "cpu-mid")]
    probs += list(MODEL_WORKLOADS.values())     # the suite's model-size rows (batch 8): "model-"
    if len(sys.argv) > 1:                        # e.g. "mid": only problems whose id contains it
        probs = [p for p in probs if any(a in p.id for a in sys.argv[1:])]
    print(f"torch threads {torch.get_num_threads()}")
    print("| problem | score elements | visible % | fwd dense ms | fwd tile ms | fwd dense/tile "
          "| fwd+bwd dense ms | fwd+bwd tile ms | fwd+bwd dense/tile |")
    print("|---|---|---|---|---|---|---|---|---|")
    for p in probs:
        nq, nk = math.prod(p.q_grid), math.prod(p.kv)
        scores = p.B * p.heads * nq * nk
        vis = p.visible_pairs() / (nq * nk)
        r = measure(p)
        (df, db), (tf, tb) = r["dense"], r["torch"]
        print(f"| {p.id} | {scores:.3g} | {100 * vis:.1f} | {df * 1e3:.2f} | {tf * 1e3:.2f} | {df / tf:.2f} "
              f"| {db * 1e3:.2f} | {tb * 1e3:.2f} | {db / tb:.2f} |", flush=True)


if __name__ == "__main__":
    main()
