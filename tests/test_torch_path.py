"""The fast PyTorch path (nuwa3dna/torch_path.py) against the dense reference.

Forward and dq/dk/dv on every TEST_PROBLEM in float32; float16/bfloat16 under
the FlashAttention tolerance rule; float64 gradcheck at tiny sizes; odd tile
shapes (padding in rows and columns); non-contiguous inputs; one vs two worker
threads. Speed is measured in benchmarks/, never here.
"""
import pytest
import torch

import nuwa3dna.torch_path as tp
from nuwa3dna import nearby_attention
from nuwa3dna.problems import TEST_PROBLEMS, WORKLOADS, Problem
from nuwa3dna.reference import dense_nearby_attention

IDS = [p.id for p in TEST_PROBLEMS]


def _run(fn, p, q, k, v, dout):
    out = fn(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    return (out, *grads)


def _ours(p):
    return lambda q, k, v: tp.torch_nearby_attention(q, k, v, p.resolved_extent, p.causal, p.D ** -0.5)


def _dense(p):
    return lambda q, k, v: dense_nearby_attention(q, k, v, p.extent, p.causal)


def _inputs(p, dtype, gen):
    q, k, v = p.make(torch.float32, generator=gen)
    dout = torch.randn(q.shape, generator=gen)
    return [x.to(dtype).requires_grad_(True) for x in (q, k, v)], dout.to(dtype)


@pytest.mark.parametrize("p", TEST_PROBLEMS, ids=IDS)
def test_forward_backward_fp32(p, gen):
    (q, k, v), dout = _inputs(p, torch.float32, gen)
    ours = _run(_ours(p), p, q, k, v, dout)
    ref = _run(_dense(p), p, q, k, v, dout)
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, ref):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("p", TEST_PROBLEMS[:2] + TEST_PROBLEMS[6:9], ids=IDS[:2] + IDS[6:9])
def test_low_precision_flash_rule(p, dtype, gen):
    """err(ours vs fp64) <= 2 * err(dense SDPA in dtype vs fp64) + atol, for out, dq, dk, dv."""
    (q, k, v), dout = _inputs(p, dtype, gen)
    ours = _run(_ours(p), p, q, k, v, dout)
    low = _run(_dense(p), p, q, k, v, dout)
    (q64, k64, v64) = [x.detach().double().requires_grad_(True) for x in (q, k, v)]
    ref = _run(_dense(p), p, q64, k64, v64, dout.double())
    atol = 1e-3 if dtype == torch.float16 else 8e-3
    for name, a, b, r in zip(("out", "dq", "dk", "dv"), ours, low, ref):
        assert a.dtype == dtype
        err = (a.double() - r).abs().max().item()
        base = (b.double() - r).abs().max().item()
        assert err <= 2 * base + atol, f"{name}: {err=} > 2 * {base=} + {atol=}"


@pytest.mark.parametrize("p", [
    Problem(1, (2, 3, 4), 2, 4, (1, 1, 1), causal=True),
    Problem(2, (2, 3, 3), 1, 3, (0, 1, 1), kv_grid=(3, 2, 4)),
], ids=lambda p: p.id)
def test_gradcheck_fp64(p, gen):
    q, k, v = p.make(torch.float64, requires_grad=True, generator=gen)
    fn = _ours(p)
    assert torch.autograd.gradcheck(fn, (q, k, v))


@pytest.mark.parametrize("tiles", [(1, 1), (2, 3), (3, 2), (16, 16)])
@pytest.mark.parametrize("p", [TEST_PROBLEMS[1], TEST_PROBLEMS[6], TEST_PROBLEMS[8]],
                         ids=[IDS[1], IDS[6], IDS[8]])
def test_tile_shapes(p, tiles, gen, monkeypatch):
    """Tiles that leave partial row tiles and strips (padding) and tiles larger than the grid."""
    monkeypatch.setattr(tp, "TILE_OVERRIDE", tiles)
    (q, k, v), dout = _inputs(p, torch.float64, gen)
    ours = _run(_ours(p), p, q, k, v, dout)
    ref = _run(_dense(p), p, q, k, v, dout)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


def test_small_chunks_and_worker_counts(gen, monkeypatch):
    """Three workers with tiny chunks vs one worker: identical results."""
    p = TEST_PROBLEMS[1]
    (q, k, v), dout = _inputs(p, torch.float32, gen)
    monkeypatch.setattr(tp, "DYNAMIC_WORKERS", False)
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run(_ours(p), p, q, k, v, dout)
        torch.set_num_threads(3)
        monkeypatch.setattr(tp, "CHUNK_ELEMS", 1)
        many = _run(_ours(p), p, q, k, v, dout)
    finally:
        torch.set_num_threads(prev)
    for a, b in zip(one, many):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_dynamic_workers_follow_idle_cores(monkeypatch):
    monkeypatch.setattr(tp.os, "getloadavg", lambda: (1.0, 1.0, 1.0))   # only us running
    assert tp._idle_cores(2) == 2
    monkeypatch.setattr(tp.os, "getloadavg", lambda: (4.5, 4.0, 4.0))   # cores busy
    assert tp._idle_cores(2) == 1


def test_non_contiguous_inputs(gen):
    p = TEST_PROBLEMS[6]
    q, k, v = p.make(torch.float32, generator=gen)
    # Views with permuted heads/head-dim memory and a strided batch.
    qn = q.transpose(-1, -2).contiguous().transpose(-1, -2)
    kn = torch.stack([k, k], dim=1).flatten(0, 1)[::2]
    vn = v.permute(5, 0, 1, 2, 3, 4).contiguous().permute(1, 2, 3, 4, 5, 0)
    assert not (qn.is_contiguous() or kn.is_contiguous() or vn.is_contiguous())
    out = nearby_attention(qn, kn, vn, p.extent, causal=p.causal, backend="torch")
    ref = dense_nearby_attention(q, k, v, p.extent, p.causal)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


def test_public_api_routes_through_custom_op(gen):
    p = TEST_PROBLEMS[0]
    (q, k, v), dout = _inputs(p, torch.float32, gen)
    out = nearby_attention(q, k, v, p.extent, causal=p.causal, backend="torch")
    assert "torch_fwd" in type(out.grad_fn).__name__ or "nuwa3dna" in str(out.grad_fn)
    ref = dense_nearby_attention(q, k, v, p.extent, p.causal)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["nuwa-video", "cross-sketch", "cpu-mid"])
def test_workload_geometry_scaled(name, gen):
    """The named workloads' geometry (extent, causal, rescaled centres) at a smaller size."""
    p = WORKLOADS[name].scaled(t=2, h=3, w=3)
    p = Problem(p.B, p.q_grid, 2, 16, p.extent, p.causal, p.kv_grid)
    (q, k, v), dout = _inputs(p, torch.float32, gen)
    ours = _run(_ours(p), p, q, k, v, dout)
    ref = _run(_dense(p), p, q, k, v, dout)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def test_workspace_reuse_does_not_leak_between_calls(gen):
    """Scratch buffers are reused: a second, different call must not see stale data."""
    p1, p2 = TEST_PROBLEMS[0], TEST_PROBLEMS[4]
    for p in (p1, p2, p1):
        (q, k, v), _ = _inputs(p, torch.float32, gen)
        with torch.no_grad():
            out = _ours(p)(q, k, v)
            ref = _dense(p)(q, k, v)
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    tp.clear_workspace()


@pytest.mark.parametrize("p", [TEST_PROBLEMS[1], TEST_PROBLEMS[6], TEST_PROBLEMS[9]],
                         ids=[IDS[1], IDS[6], IDS[9]])
def test_query_tile_variants(p, gen, monkeypatch):
    """The first (query-tile stationary) forward and backward, kept for comparison, stay correct."""
    monkeypatch.setattr(tp, "FORWARD", "query_tiles")
    monkeypatch.setattr(tp, "BACKWARD", "query_tiles")
    (q, k, v), dout = _inputs(p, torch.float64, gen)
    ours = _run(_ours(p), p, q, k, v, dout)
    ref = _run(_dense(p), p, q, k, v, dout)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
