"""The CPU backend (``backend="torch"``) through the public API, against the dense reference.

Both strategies of the backend (the tile loops and the fused flash kernel with
the window mask, chosen per problem by ``sdpa.use_sdpa``) are forced in turn
by the ``strategy`` fixture (tests/conftest.py), which swaps the backend's frozen default config.
Forward and dq/dk/dv on every TEST_PROBLEM in float32; float16/bfloat16 under
the FlashAttention rule with peaky logits across head dims; float64 gradcheck;
the gradients autograd really hands over (stride-0 and non-contiguous dO);
odd tile shapes and worker counts through the backend's own entry points with
a ``CpuConfig``. Speed is measured in benchmarks/, never here.
"""

import pytest
import torch

from nuwa3dna import NearbyAttention3D, nearby_attention
from nuwa3dna.kernels.cpu.backward import backward
from nuwa3dna.kernels.cpu.forward import forward
from nuwa3dna.kernels.cpu.planner import CpuConfig
from nuwa3dna.problems import TEST_PROBLEMS, WORKLOADS, Problem
from nuwa3dna.reference import dense_nearby_attention

IDS = [p.id for p in TEST_PROBLEMS]

def _ours(p, scale=None):
    return lambda q, k, v: nearby_attention(q, k, v, p.extent, causal=p.causal, scale=scale, backend="torch")


def _dense(p, scale=None):
    return lambda q, k, v: dense_nearby_attention(q, k, v, p.extent, p.causal, scale)


def _run(fn, q, k, v, dout):
    q, k, v = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    out = fn(q, k, v)
    return (out, *torch.autograd.grad(out, (q, k, v), dout))


def _inputs(p, dtype, gen, spread=1.0):
    q, k, v = p.make(torch.float32, generator=gen)
    dout = torch.randn(q.shape, generator=gen)
    return [x.to(dtype) for x in (q * spread, k * spread, v)], dout.to(dtype)


@pytest.mark.parametrize("p", TEST_PROBLEMS, ids=IDS)
def test_forward_backward_fp32(p, gen, strategy):
    (q, k, v), dout = _inputs(p, torch.float32, gen)
    ours, ref = _run(_ours(p), q, k, v, dout), _run(_dense(p), q, k, v, dout)
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, ref):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


LOWP = [Problem(2, (3, 5, 7), 2, d, (1, 2, 2), causal=c) for d, c in ((8, True), (24, False), (40, True), (64, False))]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("p", LOWP + [TEST_PROBLEMS[6]], ids=lambda p: p.id)
def test_low_precision_flash_rule(p, dtype, gen, strategy):
    """err(ours vs fp64) <= 2 * err(dense SDPA in dtype vs fp64) + atol, for out, dq, dk, dv,
    with logits 9x the unit-variance ones (q, k scaled by 3) and a scale that is not a power of two."""
    (q, k, v), dout = _inputs(p, dtype, gen, spread=3.0)
    ours, low = _run(_ours(p), q, k, v, dout), _run(_dense(p), q, k, v, dout)
    ref = _run(_dense(p), q.double(), k.double(), v.double(), dout.double())
    atol = 1e-3 if dtype == torch.float16 else 4e-3
    for name, a, b, r in zip(("out", "dq", "dk", "dv"), ours, low, ref):
        assert a.dtype == dtype
        err = (a.double() - r).abs().max().item()
        base = (b.double() - r).abs().max().item()
        assert err <= 2 * base + atol, f"{name}: {err=} > 2 * {base=} + {atol=}"


@pytest.mark.parametrize("p", [
    Problem(1, (2, 3, 4), 2, 4, (1, 1, 1), causal=True),
    Problem(2, (2, 3, 3), 1, 3, (0, 1, 1), kv_grid=(3, 2, 4)),
], ids=lambda p: p.id)
def test_gradcheck_fp64(p, gen, strategy):
    q, k, v = p.make(torch.float64, requires_grad=True, generator=gen)
    assert torch.autograd.gradcheck(_ours(p, scale=0.7), (q, k, v))


def test_gradients_autograd_hands_over(gen, strategy):
    """out.sum() gives a stride-0 dO; a transposed loss gives a non-contiguous one."""
    p = TEST_PROBLEMS[1]
    (q, k, v), _ = _inputs(p, torch.float32, gen)
    for loss in (lambda o: o.sum(), lambda o: (o.transpose(1, 3) * torch.linspace(0, 1, o.shape[-1])).sum()):
        grads = []
        for fn in (_ours(p), _dense(p)):
            xs = [x.clone().requires_grad_(True) for x in (q, k, v)]
            grads.append(torch.autograd.grad(loss(fn(*xs)), xs))
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def test_non_contiguous_inputs(gen, strategy):
    p = TEST_PROBLEMS[6]
    q, k, v = p.make(torch.float32, generator=gen)
    qn = q.transpose(-1, -2).contiguous().transpose(-1, -2)
    kn = torch.stack([k, k], dim=1).flatten(0, 1)[::2]
    vn = v.permute(5, 0, 1, 2, 3, 4).contiguous().permute(1, 2, 3, 4, 5, 0)
    assert not (qn.is_contiguous() or kn.is_contiguous() or vn.is_contiguous())
    dout = torch.randn(q.shape, generator=gen)
    ours, ref = _run(_ours(p), qn, kn, vn, dout), _run(_dense(p), q, k, v, dout)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def test_module_backend_torch_matches_dense(gen, strategy):
    torch.manual_seed(0)
    attn = NearbyAttention3D(24, heads=3, dim_head=8, extent=(1, 2, 1), causal=True, backend="torch")
    x = torch.randn(2, 3, 5, 6, 24, generator=gen)
    y = attn(x)
    grads = torch.autograd.grad(y.square().sum(), list(attn.parameters()))
    attn.backend = "dense"
    y2 = attn(x)
    grads2 = torch.autograd.grad(y2.square().sum(), list(attn.parameters()))
    torch.testing.assert_close(y, y2, atol=2e-5, rtol=1e-4)
    for a, b in zip(grads, grads2):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def _direct(p, q, k, v, dout, config):
    scale = p.D ** -0.5
    out, lse = forward(q, k, v, p.resolved_extent, p.causal, scale, config)
    return (out, *backward(dout, None, q, k, v, out, lse, p.resolved_extent, p.causal, scale, config))


@pytest.mark.parametrize("tiles", [(1, 1), (2, 3), (3, 2), (16, 16)])
@pytest.mark.parametrize("p", [TEST_PROBLEMS[1], TEST_PROBLEMS[6], TEST_PROBLEMS[8]],
                         ids=[IDS[1], IDS[6], IDS[8]])
def test_tile_shapes(p, tiles, gen):
    """Tiles that leave partial row tiles and strips (padding) and tiles larger than the grid."""
    (q, k, v), dout = _inputs(p, torch.float64, gen)
    ours = _direct(p, q, k, v, dout, CpuConfig(tiles=tiles))
    ref = _run(_dense(p), q, k, v, dout)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


def test_small_chunks_and_worker_counts(gen):
    """Three workers with one-tile chunks vs one worker: the same results."""
    p = TEST_PROBLEMS[1]
    (q, k, v), dout = _inputs(p, torch.float32, gen)
    one = _direct(p, q, k, v, dout, CpuConfig(max_workers=1))
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        many = _direct(p, q, k, v, dout, CpuConfig(chunk_elems=1))
    finally:
        torch.set_num_threads(prev)
    for a, b in zip(one, many):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", ["nuwa-video", "cross-sketch", "cpu-mid"])
def test_workload_geometry_scaled(name, gen, strategy):
    """The named workloads' geometry (extent, causal, rescaled centres) at a smaller size."""
    p = WORKLOADS[name].scaled(t=2, h=3, w=3)
    p = Problem(p.B, p.q_grid, 2, 16, p.extent, p.causal, p.kv_grid)
    (q, k, v), dout = _inputs(p, torch.float32, gen)
    for a, b in zip(_run(_ours(p), q, k, v, dout), _run(_dense(p), q, k, v, dout)):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def test_workspace_reuse_does_not_leak_between_calls(gen, strategy):
    """Scratch buffers are reused: a second, different call must not see stale data."""
    for p in (TEST_PROBLEMS[0], TEST_PROBLEMS[4], TEST_PROBLEMS[0]):
        (q, k, v), _ = _inputs(p, torch.float32, gen)
        with torch.no_grad():
            torch.testing.assert_close(_ours(p)(q, k, v), _dense(p)(q, k, v), atol=2e-5, rtol=1e-4)
