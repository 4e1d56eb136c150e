"""The fused Triton kernels (kernels/nearby.py) against the dense reference, under
the Triton interpreter on CPU (tests/conftest.py turns it on before import),
and compiled on the GPU where CUDA is available.

Tolerance (FlashAttention rule): err(triton vs dense float64) <= 2 * err(dense
in the test dtype vs dense float64) + atol, for the output and dq, dk, dv.

Untested here: the compiled GPU kernels (no GPU in CI; kernels/report.py
compiles them), bf16 ``tl.dot`` itself (the interpreter path upcasts bf16 tiles,
see UPCAST_DOT), and sizes beyond a few hundred tokens (the interpreter runs
one program at a time).
"""
import pytest
import torch

from nuwa3dna import nearby_attention
from nuwa3dna.checks import interpreter_enabled
from nuwa3dna.problems import TEST_PROBLEMS, Problem
from nuwa3dna.reference import dense_nearby_attention, nearby_mask

# On a CUDA machine the same tests run the compiled kernels on the GPU.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

from nuwa3dna.kernels.nearby import (  # noqa: E402  (after the interpreter is on)
    nearby_attention_backward, nearby_attention_forward, stats_shape, triton_nearby_attention, upcast_dot)

ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-3}
# A head dim that is not a power of two (padded to 256 inside the kernel, masked).
D200 = Problem(1, (2, 3, 4), 1, 200, (1, 1, 2), causal=True)
LOWP = [p for p in TEST_PROBLEMS if p.id in {
    "B2-T3H5W7-h2-d24-e1x2x2-causal",              # causal, 3D
    "B2-T3H5W7-kvT2H3W4-h3-d24-e1x1x2",            # cross, rescaled centres
    "B2-T2H6W5-h2-d64-eax1x3",                     # None extent, power-of-two head dim
}]
assert len(LOWP) == 3


def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def _check(p: Problem, dtype, gen, backward=True):
    """Forward (+ dq, dk, dv) of the kernels vs dense float64, FlashAttention tolerance."""
    q, k, v = p.make(dtype, device=DEVICE, generator=gen)
    dout = torch.randn(q.shape, generator=gen).to(DEVICE, dtype)
    scale = p.D ** -0.5
    extent = p.resolved_extent

    def grads(fn, *xs):
        xs = [x.detach().clone().requires_grad_(backward) for x in xs]
        out = fn(*xs)
        if not backward:
            return [out]
        return [out, *torch.autograd.grad(out, xs, dout.to(out.dtype))]

    ref = grads(lambda a, b, c: dense_nearby_attention(a, b, c, p.extent, p.causal, scale),
                q.double(), k.double(), v.double())
    lowp = grads(lambda a, b, c: dense_nearby_attention(a, b, c, p.extent, p.causal, scale), q, k, v)
    ours = grads(lambda a, b, c: triton_nearby_attention(a, b, c, extent, p.causal, scale), q, k, v)
    for name, o, l, r in zip(("out", "dq", "dk", "dv"), ours, lowp, ref):
        assert o.dtype == dtype and o.shape == r.shape
        err, base = _max_err(o, r), _max_err(l, r)
        assert err <= 2 * base + ATOL[dtype], f"{p.id} {dtype} {name}: {err=} {base=}"


@pytest.mark.skipif(DEVICE == "cuda", reason="the interpreter is for CPU-only machines")
def test_interpreter_is_on():
    assert interpreter_enabled()
    # bf16 tiles are upcast only in the interpreter; the GPU keeps native bf16 dots.
    assert upcast_dot(torch.bfloat16) and not upcast_dot(torch.float16) and not upcast_dot(torch.float32)


@pytest.mark.parametrize("p", TEST_PROBLEMS, ids=lambda p: p.id)
def test_fp32_forward_backward(p, gen):
    _check(p, torch.float32, gen)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("p", LOWP, ids=lambda p: p.id)
def test_low_precision(p, dtype, gen):
    _check(p, dtype, gen)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_head_dim_200_padded(dtype, gen):
    _check(D200, dtype, gen)


def test_public_api_extent_none(gen):
    """nearby_attention(backend="triton") with extent=None (whole grid) is full attention."""
    p = Problem(2, (2, 3, 3), 2, 16, (None, None, None), kv_grid=(1, 2, 5))
    q, k, v = p.make(torch.float32, device=DEVICE, generator=gen)
    out = nearby_attention(q, k, v, None, backend="triton")
    qh, kh, vh = (x.flatten(1, 3).transpose(1, 2).double() for x in (q, k, v))
    full = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh).transpose(1, 2).reshape(q.shape)
    assert _max_err(out, full) <= 1e-5


def test_log_sum_exp(gen):
    """The saved statistic is the natural log-sum-exp of the visible scaled scores."""
    p = TEST_PROBLEMS[1]   # causal
    q, k, v = p.make(torch.float32, device=DEVICE, generator=gen)
    scale = p.D ** -0.5
    _, lse = nearby_attention_forward(q, k, v, p.resolved_extent, p.causal, scale)
    qh, kh = (x.flatten(1, 3).transpose(1, 2).double() for x in (q, k))     # [B, heads, N, D]
    s = (qh @ kh.transpose(-1, -2)) * scale
    s = s.masked_fill(~nearby_mask(p.q_grid, p.kv, p.extent, p.causal), float("-inf"))
    assert lse.shape == stats_shape(q) and lse.dtype == torch.float32
    assert _max_err(lse.flatten(2), torch.logsumexp(s, -1)) <= 1e-5


def test_poisoned_buffers_fully_written(gen):
    """NaN-filled output, statistic and gradient buffers are overwritten everywhere."""
    p = TEST_PROBLEMS[6]   # cross attention, grids not multiples of any tile
    q, k, v = p.make(torch.float32, device=DEVICE, generator=gen)
    scale = p.D ** -0.5
    extent = p.resolved_extent
    nan = lambda shape: torch.full(shape, float("nan"), device=DEVICE)
    out, lse = nearby_attention_forward(q, k, v, extent, False, scale, out=nan(q.shape), lse=nan(stats_shape(q)))
    dout = torch.randn(q.shape, generator=gen).to(DEVICE)
    dq, dk, dv = nearby_attention_backward(q, k, v, out, lse, dout, extent, False, scale,
                                           dq=nan(q.shape), dk=nan(k.shape), dv=nan(v.shape),
                                           delta=nan(stats_shape(q)))
    for x in (out, lse, dq, dk, dv):
        assert not x.isnan().any()
    q64, k64, v64 = (x.double().requires_grad_() for x in (q, k, v))
    ref = dense_nearby_attention(q64, k64, v64, p.extent, False, scale)
    refs = [ref, *torch.autograd.grad(ref, (q64, k64, v64), dout.double())]
    for o, r in zip((out, dq, dk, dv), refs):
        assert _max_err(o, r) <= 1e-5


def test_non_contiguous_inputs(gen):
    """Strided views (permuted, sliced, head dim not unit-stride) go in as they are."""
    p = Problem(2, (2, 5, 6), 2, 24, (1, 2, 1), causal=True)
    B, (T, H, W), n, D = p.B, p.q_grid, p.heads, p.D

    def strided():
        base = torch.randn(B, D + 3, n, T, W + 2, H, generator=gen).to(DEVICE)          # odd layout, padded
        return base[:, 1:D + 1, :, :, 1:W + 1, :].permute(0, 3, 5, 4, 2, 1)  # -> (B, T, H, W, heads, D)

    q, k, v, dout = strided(), strided(), strided(), strided()
    assert not any(x.is_contiguous() for x in (q, k, v, dout)) and q.stride(-1) != 1
    qc, kc, vc = (x.contiguous().requires_grad_() for x in (q, k, v))
    qs, ks, vs = (x.requires_grad_() for x in (q, k, v))
    scale = D ** -0.5
    out_s = triton_nearby_attention(qs, ks, vs, p.resolved_extent, True, scale)
    g_s = torch.autograd.grad(out_s, (qs, ks, vs), dout)
    ref = dense_nearby_attention(qc, kc, vc, p.extent, True, scale)
    g_r = torch.autograd.grad(ref, (qc, kc, vc), dout.contiguous())
    for a, b in zip((out_s, *g_s), (ref, *g_r)):
        assert _max_err(a, b) <= 1e-5


SMALL_TILES = {  # 16-row tiles: many tiles per axis, so the causal skips and edges are exercised
    "fwd": ((2, 2, 4), (1, 2, 8)), "dq": ((1, 4, 4), (1, 4, 4)), "dkdv": ((1, 2, 8), (2, 2, 4)),
}


@pytest.mark.parametrize("p", [TEST_PROBLEMS[i] for i in (1, 5, 6)], ids=lambda p: p.id)
def test_small_tiles(p, gen, monkeypatch):
    """Force 16-row tiles (2x2x4 etc.) so every axis has several tiles: the loop bounds,
    the causal tile skipping (forward tail, dK/dV head) and the query-range inversion
    are all exercised, not just one tile covering the grid."""
    import dataclasses

    from nuwa3dna.kernels import nearby

    real = nearby.pick_configs

    def small(*args, **kwargs):
        cfgs = dict(real(*args, **kwargs))
        for kind, (qt, kt) in SMALL_TILES.items():
            cfgs[kind] = dataclasses.replace(cfgs[kind], q_tile=qt, k_tile=kt)
        return cfgs

    monkeypatch.setattr(nearby, "pick_configs", small)
    _check(p, torch.float32, gen)


def test_tile_plans_are_consistent():
    """Every planned tile has the configured number of rows and a one-frame walked tile."""
    from nuwa3dna.kernels.nearby import pick_configs
    from nuwa3dna.problems import WORKLOADS

    for p in [*TEST_PROBLEMS, *WORKLOADS.values(), D200]:
        for dtype in (torch.float32, torch.bfloat16):
            cfgs = pick_configs(p.q_grid, p.kv, p.resolved_extent, p.D, dtype)
            for kind in ("fwd", "dq"):
                assert cfgs[kind].k_tile[0] == 1, (p.id, kind)
                assert cfgs[kind].block_q >= 16 and cfgs[kind].block_k >= 16
            assert cfgs["dkdv"].q_tile[0] == 1
            assert cfgs["fwd"].block_d >= max(16, p.D)


def test_broadcast_output_gradient(gen):
    """out.sum() hands the backward a stride-0 (expanded) dO; it is read through its strides."""
    p = TEST_PROBLEMS[2]
    q, k, v = p.make(torch.float32, device=DEVICE, generator=gen, requires_grad=True)
    scale = p.D ** -0.5
    g = torch.autograd.grad(triton_nearby_attention(q, k, v, p.resolved_extent, p.causal, scale).sum(), (q, k, v))
    r = torch.autograd.grad(dense_nearby_attention(q, k, v, p.extent, p.causal, scale).sum(), (q, k, v))
    for a, b in zip(g, r):
        assert _max_err(a, b) <= 1e-5


@pytest.mark.parametrize("p,dtype", [(TEST_PROBLEMS[1], torch.float32), (D200, torch.bfloat16)],
                         ids=["causal-fp32", "d200-bf16"])
def test_sm80_launch_table(p, dtype, gen, monkeypatch):
    """The interpreter normally takes the sm_90 table; run the sm_80 one's tile
    shapes and dK/dV split too (warps and stages mean nothing to the interpreter)."""
    from nuwa3dna.kernels import nearby

    monkeypatch.setattr(nearby, "device_arch", lambda device: 80)
    _check(p, dtype, gen)
