"""The Triton backend (kernels/triton/) against the dense reference, through the
public path (``nearby_attention(..., backend="triton")``, ``NearbyAttention3D``),
under the Triton interpreter on CPU (tests/conftest.py turns it on before
import), and compiled on the GPU where CUDA is available. The lse and
poisoned-buffer tests call the drivers (``launch.forward`` / ``launch.backward``);
tests/test_triton_launch.py checks the launch machinery (tile plans, device,
index widths).

Tolerance (FlashAttention rule): err(triton vs dense float64) <= 2 * err(dense
in the test dtype vs dense float64) + atol, for the output and dq, dk, dv.
The output gradient reaches the op as autograd hands it over: contiguous
("randn"), broadcast with stride 0 ("sum", from out.sum()) or transposed ("strided").

Untested here: the compiled GPU kernels (no GPU in CI; kernels/report.py
compiles them), bf16 ``tl.dot`` itself (the interpreter path upcasts bf16 tiles,
see UPCAST_DOT), and sizes beyond a few hundred tokens (the interpreter runs
one program at a time).
"""

import pytest
import torch

from nuwa3dna import NearbyAttention3D, nearby_attention
from nuwa3dna.kernels.env import interpreter_enabled
from nuwa3dna.problems import TEST_PROBLEMS, Problem
from nuwa3dna.reference import dense_nearby_attention, nearby_mask

# On a CUDA machine the same tests run the compiled kernels on the GPU.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

from nuwa3dna.kernels.triton import configs  # noqa: E402  (after the interpreter is on)
from nuwa3dna.kernels.triton.launch import backward, forward, stats_shape  # noqa: E402

ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-3}
DOUTS = ("randn", "sum", "strided")
# A head dim that is not a power of two (padded to 256 inside the kernel, masked).
D200 = Problem(1, (2, 3, 4), 1, 200, (1, 1, 2), causal=True)
BY_ID = {p.id: p for p in TEST_PROBLEMS}
LOWP = [  # (problem, dtype, dout): head dims 8, 16, 24, 40, 64; causal, cross, None extents
    (BY_ID["B2-T3H5W7-h2-d24-e1x2x2-causal"], torch.float16, "sum"),
    (BY_ID["B2-T3H5W7-h2-d24-e1x2x2-causal"], torch.bfloat16, "randn"),
    (BY_ID["B2-T3H5W7-kvT2H3W4-h3-d24-e1x1x2"], torch.float16, "strided"),
    (BY_ID["B2-T3H5W7-kvT2H3W4-h3-d24-e1x1x2"], torch.bfloat16, "sum"),
    (BY_ID["B2-T2H6W5-h2-d64-eax1x3"], torch.float16, "randn"),
    (BY_ID["B2-T2H6W5-h2-d64-eax1x3"], torch.bfloat16, "strided"),
    (BY_ID["B1-T5H3W3-h2-d16-e2x0x0"], torch.float16, "strided"),
    (BY_ID["B1-T5H3W3-h2-d16-e2x0x0"], torch.bfloat16, "randn"),
    (BY_ID["B2-T1H11W13-h2-d40-e0x3x3-causal"], torch.bfloat16, "sum"),
    (BY_ID["B2-T1H1W9-h3-d8-e0x0x2"], torch.float16, "randn"),
]
NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def _loss(kind: str, out: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """A scalar whose gradient w.r.t. ``out`` is g (contiguous), ones (stride 0) or g with
    heads and head dim swapped in memory (strided)."""
    if kind == "sum":
        return out.sum()
    if kind == "strided":
        return (out.transpose(4, 5) * g.transpose(4, 5).contiguous()).sum()
    return (out * g).sum()


def _run(fn, q, k, v, kind, g, backward_=True):
    """([out, dq, dk, dv] of fn, (strides, contiguous) of the output gradient it received)."""
    xs = [x.detach().clone().requires_grad_(backward_) for x in (q, k, v)]
    out = fn(*xs)
    if not backward_:
        return [out], None
    seen = []
    out.register_hook(lambda grad: seen.append((grad.stride(), grad.is_contiguous())))
    return [out, *torch.autograd.grad(_loss(kind, out, g.to(out.dtype)), xs)], seen[0]


def _check(p: Problem, dtype, gen, dout="randn", backward_=True):
    """Forward (+ dq, dk, dv) of backend="triton" vs dense float64, FlashAttention tolerance."""
    q, k, v = p.make(dtype, device=DEVICE, generator=gen)
    g = torch.randn(q.shape, generator=gen).to(DEVICE, dtype)
    scale = p.D ** -0.5

    def dense(a, b, c):
        return dense_nearby_attention(a, b, c, p.extent, p.causal, scale)

    def triton(a, b, c):
        return nearby_attention(a, b, c, p.extent, causal=p.causal, scale=scale, backend="triton")

    ref, _ = _run(dense, q.double(), k.double(), v.double(), dout, g, backward_)
    lowp, _ = _run(dense, q, k, v, dout, g, backward_)
    ours, strides = _run(triton, q, k, v, dout, g, backward_)
    if backward_:   # the op saw the gradient layout the test names
        assert (0 in strides[0]) == (dout == "sum") and strides[1] == (dout == "randn"), strides
    for name, o, l, r in zip(("out", "dq", "dk", "dv"), ours, lowp, ref):
        assert o.dtype == dtype and o.shape == r.shape
        err, base = _max_err(o, r), _max_err(l, r)
        assert err <= 2 * base + ATOL[dtype], f"{p.id} {dtype} {name}: {err=} {base=}"


@pytest.mark.skipif(DEVICE == "cuda", reason="the interpreter is for CPU-only machines")
def test_interpreter_is_on():
    assert interpreter_enabled()
    # bf16 tiles are upcast only in the interpreter; the GPU keeps native bf16 dots.
    mode = configs.dot_mode
    assert mode(torch.bfloat16) == "upcast" and mode(torch.float16) == mode(torch.float32) == "ieee"
    assert mode(torch.float32, tf32=True) == "tf32-interp" and mode(torch.float16, tf32=True) == "ieee"


@pytest.mark.parametrize("p,dout", [pytest.param(p, DOUTS[i % 3], id=f"{p.id}-dout:{DOUTS[i % 3]}")
                                    for i, p in enumerate(TEST_PROBLEMS)])
def test_fp32_forward_backward(p, dout, gen):
    _check(p, torch.float32, gen, dout)


@pytest.mark.parametrize("p,dtype,dout", [pytest.param(p, dt, d, id=f"{p.id}-{NAMES[dt]}-dout:{d}")
                                          for p, dt, d in LOWP])
def test_low_precision(p, dtype, dout, gen):
    _check(p, dtype, gen, dout)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_head_dim_200_padded(dtype, gen):
    _check(D200, dtype, gen)


def test_module(gen):
    """NearbyAttention3D(backend="triton"), self (causal) and cross, equals backend="dense"
    in output and in every parameter's and input's gradient."""
    x = torch.randn(1, 2, 3, 5, 16, generator=gen).to(DEVICE)
    context = torch.randn(1, 3, 2, 3, 8, generator=gen).to(DEVICE)
    for causal, ctx, extent in ((True, None, (1, 1, 2)), (False, context, (0, None, 1))):
        torch.manual_seed(0)
        mods = [NearbyAttention3D(16, heads=2, dim_head=24, extent=extent, causal=causal,
                                  context_dim=None if ctx is None else 8, backend=b).to(DEVICE)
                for b in ("triton", "dense")]
        mods[1].load_state_dict(mods[0].state_dict())
        res = []
        for m in mods:
            xs = [x.clone().requires_grad_()] + ([] if ctx is None else [ctx.clone().requires_grad_()])
            y = m(*xs)
            res.append([y, *torch.autograd.grad(y.square().sum(), [*xs, *m.parameters()])])
        for a, b in zip(*res):
            assert _max_err(a, b) <= 1e-5


def test_double_backward_raises(gen):
    """The backward op has no gradient of its own: a clear error, not a silent zero."""
    p = BY_ID["B2-T1H1W9-h3-d8-e0x0x2"]
    q, k, v = p.make(torch.float32, device=DEVICE, generator=gen, requires_grad=True)
    out = nearby_attention(q, k, v, p.extent, backend="triton")
    dq, = torch.autograd.grad(out.square().sum(), q, create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward"):
        dq.sum().backward()


def test_public_api_extent_none(gen):
    """nearby_attention(backend="triton") with extent=None (whole grid) is full attention."""
    p = Problem(2, (2, 3, 3), 2, 16, (None, None, None), kv_grid=(1, 2, 5))
    q, k, v = p.make(torch.float32, device=DEVICE, generator=gen)
    out = nearby_attention(q, k, v, None, backend="triton")
    qh, kh, vh = (x.flatten(1, 3).transpose(1, 2).double() for x in (q, k, v))
    full = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh).transpose(1, 2).reshape(q.shape)
    assert _max_err(out, full) <= 1e-5


def test_non_contiguous_inputs(gen):
    """Strided views (permuted, sliced, head dim not unit-stride) go in as they are."""
    p = Problem(2, (2, 5, 6), 2, 24, (1, 2, 1), causal=True)
    B, (T, H, W), n, D = p.B, p.q_grid, p.heads, p.D

    def strided():
        base = torch.randn(B, D + 3, n, T, W + 2, H, generator=gen).to(DEVICE)  # odd layout, padded
        return base[:, 1:D + 1, :, :, 1:W + 1, :].permute(0, 3, 5, 4, 2, 1)     # -> (B, T, H, W, heads, D)

    q, k, v, dout = strided(), strided(), strided(), strided()
    assert not any(x.is_contiguous() for x in (q, k, v, dout)) and q.stride(-1) != 1
    qc, kc, vc = (x.contiguous().requires_grad_() for x in (q, k, v))
    qs, ks, vs = (x.requires_grad_() for x in (q, k, v))
    out_s = nearby_attention(qs, ks, vs, p.extent, causal=True, backend="triton")
    g_s = torch.autograd.grad(out_s, (qs, ks, vs), dout)
    ref = dense_nearby_attention(qc, kc, vc, p.extent, True)
    g_r = torch.autograd.grad(ref, (qc, kc, vc), dout.contiguous())
    for a, b in zip((out_s, *g_s), (ref, *g_r)):
        assert _max_err(a, b) <= 1e-5


def test_log_sum_exp(gen):
    """The saved statistic is the natural log-sum-exp of the visible scaled scores."""
    p = BY_ID["B2-T3H5W7-h2-d24-e1x2x2-causal"]
    q, k, v = p.make(torch.float32, device=DEVICE, generator=gen)
    scale = p.D ** -0.5
    _, lse = forward(q, k, v, p.resolved_extent, p.causal, scale)
    qh, kh = (x.flatten(1, 3).transpose(1, 2).double() for x in (q, k))     # [B, heads, N, D]
    s = (qh @ kh.transpose(-1, -2)) * scale
    s = s.masked_fill(~nearby_mask(p.q_grid, p.kv, p.extent, p.causal, device=DEVICE), float("-inf"))
    assert lse.shape == stats_shape(q) and lse.dtype == torch.float32
    assert _max_err(lse.flatten(2), torch.logsumexp(s, -1)) <= 1e-5


def test_poisoned_buffers_fully_written(gen):
    """NaN-filled output, statistic and gradient buffers are overwritten everywhere."""
    p = BY_ID["B2-T3H5W7-kvT2H3W4-h3-d24-e1x1x2"]   # cross attention, grids not multiples of any tile
    q, k, v = p.make(torch.float32, device=DEVICE, generator=gen)
    scale = p.D ** -0.5
    extent = p.resolved_extent
    nan = lambda shape: torch.full(shape, float("nan"), device=DEVICE)
    out, lse = forward(q, k, v, extent, False, scale, out=nan(q.shape), lse=nan(stats_shape(q)))
    dout = torch.randn(q.shape, generator=gen).to(DEVICE)
    dq, dk, dv = backward(q, k, v, out, lse, dout, extent, False, scale,
                          dq=nan(q.shape), dk=nan(k.shape), dv=nan(v.shape), delta=nan(stats_shape(q)))
    for x in (out, lse, dq, dk, dv):
        assert not x.isnan().any()
    q64, k64, v64 = (x.double().requires_grad_() for x in (q, k, v))
    ref = dense_nearby_attention(q64, k64, v64, p.extent, False, scale)
    refs = [ref, *torch.autograd.grad(ref, (q64, k64, v64), dout.double())]
    for o, r in zip((out, dq, dk, dv), refs):
        assert _max_err(o, r) <= 1e-5


@pytest.mark.parametrize("p", [TEST_PROBLEMS[i] for i in (1, 5, 6)], ids=lambda p: p.id)
def test_small_tiles(p, gen, small_tiles):
    """Force 16-row tiles (2x2x4 etc.) so every axis has several tiles: the loop bounds,
    the causal tile skipping (forward tail, dK/dV head) and the query-range inversion
    are all exercised, not just one tile covering the grid."""
    small_tiles()
    _check(p, torch.float32, gen)


# Grids larger than the (forced small) tiles' key spans: the forward and dQ walk key tiles that
# all lie inside the grid (slid back at its far edges) and load them unmasked (KEYS_INSIDE).
INSIDE = [Problem(2, (2, 9, 11), 2, 24, (1, 1, 1)), Problem(2, (2, 9, 11), 2, 24, (1, 1, 1), causal=True),
          Problem(1, (3, 7, 9), 2, 16, (1, 1, 1), kv_grid=(2, 10, 12))]


@pytest.mark.parametrize("p,dtype", [(p, dt) for p in INSIDE for dt in (torch.float32, torch.bfloat16)],
                         ids=[f"{p.id}-{NAMES[dt]}" for p in INSIDE for dt in (torch.float32, torch.bfloat16)])
def test_keys_inside(p, dtype, gen, small_tiles, monkeypatch):
    """Unmasked key loads (KEYS_INSIDE, plan.keys_inside): chosen at launch for these grids,
    and forward and gradients still match dense."""
    from nuwa3dna.kernels.triton import launch

    small_tiles()
    unmasked, run = [], launch._run

    def record(spec):
        kernel, _, _, meta = spec
        if meta.get("KEYS_INSIDE"):
            unmasked.append(kernel.__name__)
        run(spec)
    monkeypatch.setattr(launch, "_run", record)
    _check(p, dtype, gen)
    assert unmasked == ["fwd_kernel", "bwd_dq_kernel"], unmasked


@pytest.fixture
def tf32():
    """PyTorch's float32 matmul precision set to TF32 for the test, restored after."""
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    matmul.fp32_precision = "tf32"
    yield
    matmul.fp32_precision = before


@pytest.mark.parametrize("p", [BY_ID["B2-T3H5W7-h2-d24-e1x2x2-causal"], BY_ID["B2-T2H6W5-h2-d64-eax1x3"],
                               BY_ID["B1-T2H6W5-kvT3H9W11-h2-d8-e0xax1"]], ids=lambda p: p.id)
def test_float32_follows_torch_tf32_setting(p, gen, tf32):
    """With PyTorch's float32 matmuls set to TF32, float32 inputs take TF32 dots (emulated in
    the interpreter: operands rounded to 10 mantissa bits). Forward and gradients then sit
    within the 2x rule of a float16 dense run (the same 10-bit mantissa), and are less
    exact than with the setting back at IEEE (so the setting did reach the kernels)."""
    q, k, v = p.make(torch.float32, device=DEVICE, generator=gen)
    g = torch.randn(q.shape, generator=gen).to(DEVICE)
    scale = p.D ** -0.5

    def dense(a, b, c):
        return dense_nearby_attention(a, b, c, p.extent, p.causal, scale)

    def triton(a, b, c):
        return nearby_attention(a, b, c, p.extent, causal=p.causal, scale=scale, backend="triton")

    ref, _ = _run(dense, q.double(), k.double(), v.double(), "randn", g)
    half, _ = _run(dense, q.half(), k.half(), v.half(), "randn", g)
    ours, _ = _run(triton, q, k, v, "randn", g)
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    exact, _ = _run(triton, q, k, v, "randn", g)
    for name, o, h, e, r in zip(("out", "dq", "dk", "dv"), ours, half, exact, ref):
        err, base = _max_err(o, r), _max_err(h, r)
        assert err <= 2 * base + ATOL[torch.float16], f"{p.id} tf32 {name}: {err=} {base=}"
        assert _max_err(e, r) < err, f"{p.id} {name}: the TF32 result is no less exact than IEEE"


@pytest.mark.parametrize("p,dtype", [(BY_ID["B2-T3H5W7-h2-d24-e1x2x2-causal"], torch.float32),
                                     (D200, torch.bfloat16)], ids=["causal-fp32", "d200-bf16"])
def test_sm80_launch_table(p, dtype, gen, monkeypatch):
    """The interpreter normally takes the sm_90 table; run the sm_80 one's tile
    shapes and dK/dV split too (warps and stages mean nothing to the interpreter)."""
    monkeypatch.setattr(configs, "device_arch", lambda device: 80)
    _check(p, dtype, gen)
