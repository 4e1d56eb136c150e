"""``backend="auto"``: one decision (``choose_backend``), and auto returns exactly what the
backend it names returns, forward and gradients, on both sides of the measured crossover
(the CPU backend's fused-kernel and tile strategies, ``kernels/cpu/sdpa.use_sdpa``)."""
import logging

import pytest
import torch

from nuwa3dna import nearby_attention
from nuwa3dna.dispatch import choose_backend
from nuwa3dna.kernels.cpu.planner import DEFAULT
from nuwa3dna.kernels.cpu.sdpa import use_sdpa
from nuwa3dna.problems import Problem

CASES = [
    Problem(2, (4, 8, 8), 2, 16, (1, 3, 3), causal=True),          # the model's video layer: fused
    Problem(1, (1, 1, 33), 2, 8, (0, 0, None)),                     # text: fused
    Problem(1, (4, 16, 17), 1, 8, (1, 2, 2)),                       # 1.2e6 scores, 4% visible: tiles
    Problem(1, (4, 16, 17), 1, 8, (None, 6, None), kv_grid=(4, 16, 16)),   # wide window: fused
]


@pytest.mark.parametrize("p", CASES, ids=lambda p: p.id)
def test_auto_is_the_named_backend(p, gen):
    q, k, v = p.make(torch.float32, generator=gen)
    named, why = choose_backend(q, k, p.resolved_extent, p.causal)
    assert named == "torch" and why
    dout = torch.randn(q.shape, generator=gen)
    results = []
    for backend in ("auto", named):
        xs = [x.clone().requires_grad_(True) for x in (q, k, v)]
        out = nearby_attention(*xs, p.extent, causal=p.causal, backend=backend)
        results.append((out, *torch.autograd.grad(out, xs, dout)))
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("p,fused", zip(CASES, (True, True, False, True)), ids=[p.id for p in CASES])
def test_strategies_match_dense(p, fused, gen):
    """Both strategies of the CPU backend agree with the dense reference; the fused one bit for bit
    where the dense reference reaches the same kernel (contiguous inputs, float32)."""
    assert use_sdpa(p.q_grid, p.kv, p.resolved_extent, p.causal, DEFAULT) == fused
    q, k, v = p.make(torch.float32, generator=gen)
    ours = nearby_attention(q, k, v, p.extent, causal=p.causal, backend="torch")
    dense = nearby_attention(q, k, v, p.extent, causal=p.causal, backend="dense")
    torch.testing.assert_close(ours, dense, atol=2e-6, rtol=1e-5)


def test_cuda_goes_to_triton():
    q = torch.empty(1, 2, 2, 2, 1, 8, device="meta")
    fake = type("FakeCuda", (), {"device": torch.device("cuda", 0), "dtype": torch.bfloat16,
                                 "shape": q.shape})()
    assert choose_backend(fake, fake, (1, 1, 1), False)[0] == "triton"
    fake.dtype = torch.float64
    assert choose_backend(fake, fake, (1, 1, 1), False)[0] == "torch"


def test_reason_logged_at_debug(gen, caplog):
    q, k, v = CASES[0].make(generator=gen)
    with caplog.at_level(logging.DEBUG, logger="nuwa3dna"):
        nearby_attention(q, k, v, CASES[0].extent, causal=True)
    assert any("fused-kernel strategy" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("p,fused", [
    (Problem(2, (4, 8, 8), 2, 16, (1, 3, 3), dilation=(1, 2, 2)), True),
    (Problem(1, (4, 16, 17), 1, 8, (1, 2, 2), stride=(1, 2, 2), border="shift"), False),
    (Problem(1, (4, 16, 17), 1, 8, (1, 2, 2), causal=(True, False, False), dilation=(2, 1, 1)), False),
], ids=lambda x: x.id if isinstance(x, Problem) else str(x))
def test_auto_with_window_options(p, fused, gen):
    """The v2 window options run on the torch backend, in the strategy their exact pair count picks;
    auto returns what backend='torch' returns."""
    q, k, v = p.make(torch.float32, generator=gen)
    named, why = choose_backend(q, k, p.resolved_extent, p.causal, **p.options)
    assert named == "torch" and ("fused-kernel" in why) == fused and ("tile" in why) != fused
    with torch.no_grad():
        assert torch.equal(nearby_attention(q, k, v, p.extent, p.causal, **p.options),
                           nearby_attention(q, k, v, p.extent, p.causal, backend="torch", **p.options))
