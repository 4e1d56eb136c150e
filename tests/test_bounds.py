"""Memory safety of the Triton kernels without a GPU: every masked-in address of
every ``tl.load`` / ``tl.store`` of the forward, preprocess, dK/dV and dQ
kernels addresses an element of a tensor passed to that launch
(``kernels/triton/bounds.BoundsChecker``, under the Triton interpreter), over
test problems that reach every edge: self, cross (rescaled centres), causal,
whole-axis (None) extents, odd grid sizes, a head dim that is not a power of
two (200, padded to 256), non-contiguous inputs, and 16-row tiles forced so
every axis has several tiles (as test_triton.py's small-tiles test). Negative
tests show the checker catches a real out-of-bounds store and load (output and
output-gradient views one frame too short, carved from a larger buffer so the
stray accesses land in memory the process owns).

The v2 window options (the kernels' table path: re-laid tiles, windows and grid
positions read from int32 tables) run over window problems too (dilation and
stride on every axis, per-axis and raster causal, shifted borders, cross grids
finer and coarser than the queries', forced small tiles), and a corrupted re-layout
table that points one key past the grid is caught.

Grouped kv heads and the relative position bias (issue 14) run over plain and
table-path problems too (k, v with fewer heads; the bias table read per score and
its gradient added by atomics, which the checker checks as it checks stores), and a
bias-gradient buffer one head short is caught.

Batch and heads are cut to 2 x 1 (the per-(batch, head) base offsets are
still exercised by the second batch) to keep the interpreter's time small.
Untested here: the compiled GPU kernels (the acceptance script, gpu/acceptance.py,
runs compute-sanitizer on them where a GPU is lent).
"""
import dataclasses

import pytest
import torch

from nuwa3dna.kernels.env import interpreter_enabled
from nuwa3dna.kernels.problems import WINDOW_PROBLEMS
from nuwa3dna.kernels.windows import Options
from nuwa3dna.problems import TEST_PROBLEMS, Problem

pytestmark = pytest.mark.skipif(not interpreter_enabled(), reason="the checker runs under the Triton interpreter")

from nuwa3dna.kernels.triton import relayout  # noqa: E402
from nuwa3dna.kernels.triton.bounds import BoundsChecker, element_addresses  # noqa: E402
from nuwa3dna.kernels.triton.launch import backward, forward  # noqa: E402

KERNELS = {"fwd_kernel", "bwd_preprocess_kernel", "bwd_dkdv_kernel", "bwd_dq_kernel"}
BY_ID = {p.id: p for p in TEST_PROBLEMS}
CASES = [  # (problem, dtype, small tiles)
    (BY_ID["B2-T3H5W7-h2-d24-e1x2x2"], torch.float32, False),
    (BY_ID["B2-T3H5W7-h2-d24-e1x2x2-causal"], torch.float32, True),
    (BY_ID["B1-T1H1W9-h2-d8-e0x0xa-causal"], torch.float32, False),
    (BY_ID["B2-T2H6W5-h2-d64-eax1x3"], torch.bfloat16, False),
    (BY_ID["B2-T3H5W7-kvT2H3W4-h3-d24-e1x1x2"], torch.float16, True),
    (BY_ID["B1-T2H6W5-kvT3H9W11-h2-d8-e0xax1"], torch.float32, False),
    (BY_ID["B2-T1H11W13-h2-d40-e0x3x3-causal"], torch.float32, True),
    (Problem(1, (2, 3, 4), 1, 200, (1, 1, 2), causal=True), torch.float32, False),
    # Key tiles slid back inside the grid and loaded unmasked (KEYS_INSIDE) in the forward and dQ.
    (Problem(2, (2, 9, 11), 1, 24, (1, 1, 1), causal=True), torch.float32, True),
    (Problem(1, (3, 7, 9), 1, 16, (1, 1, 1), kv_grid=(2, 10, 12)), torch.bfloat16, True),
]
WINDOW_CASES = [  # (problem, dtype, small tiles): the table path
    (WINDOW_PROBLEMS[9], torch.float32, False),       # cross (finer kv), None extent, shift, dilation, stride
    (WINDOW_PROBLEMS[6], torch.float32, True),        # raster causal, dilated rows, strided columns
    (WINDOW_PROBLEMS[4], torch.bfloat16, True),       # per-axis causal (t, h), shift, stride 3 on t
    (Problem(1, (6, 6, 11), 1, 8, (1, 1, 2), causal=True, dilation=(2, 1, 2), stride=(2, 2, 1),
             border="shift"), torch.float16, True),   # dilated frames under raster causality
    (Problem(1, (5, 9, 8), 1, 8, (1, 1, 1), kv_grid=(3, 4, 5), stride=(2, 3, 2), dilation=(1, 2, 1)),
     torch.float32, False),                           # cross, coarser kv
]


@pytest.fixture
def bounds():
    """Every load and store inside the test is checked; the test fails on any violation."""
    with BoundsChecker() as chk:
        yield chk
    chk.assert_clean()


def _shrink(p: Problem) -> Problem:
    return dataclasses.replace(p, B=min(p.B, 2), heads=1)


def _strided(shape, dtype, gen):
    """A (B, T, H, W, heads, D) view with padding between rows and a non-unit head-dim stride."""
    B, T, H, W, n, D = shape
    base = torch.randn(B, D + 2, n, T, W + 1, H, generator=gen).to(dtype)
    return base[:, 1:D + 1, :, :, :W, :].permute(0, 3, 5, 4, 2, 1)


def _forward_backward(p: Problem, dtype, gen, strided=False):
    q, k, v = p.make(dtype, generator=gen)
    dout = torch.randn(q.shape, generator=gen).to(dtype)
    if strided:
        q, k, v, dout = (_strided(x.shape, dtype, gen) for x in (q, k, v, dout))
    extent, scale = p.resolved_extent, p.D ** -0.5
    opts, raster = Options.of(p.causal, **p.options), p.causal is True
    out, lse = forward(q, k, v, extent, raster, scale, options=opts)
    backward(q, k, v, out, lse, dout, extent, raster, scale, options=opts)


@pytest.mark.parametrize("p,dtype,small", CASES, ids=[f"{p.id}-{str(d)[6:]}{'-small' if s else ''}"
                                                      for p, d, s in CASES])
def test_kernels_stay_in_bounds(p, dtype, small, gen, bounds, small_tiles):
    small_tiles(small)
    _forward_backward(_shrink(p), dtype, gen)
    assert bounds.launches >= 4 and bounds.checked > 0


@pytest.mark.parametrize("p,dtype,small", WINDOW_CASES, ids=[f"{p.id}-{str(d)[6:]}{'-small' if s else ''}"
                                                             for p, d, s in WINDOW_CASES])
def test_window_options_stay_in_bounds(p, dtype, small, gen, bounds, small_tiles):
    """The table path: the tables themselves are launch arguments, so their loads are checked too."""
    small_tiles(small)
    _forward_backward(_shrink(p), dtype, gen)
    assert bounds.launches >= 4 and bounds.checked > 0


def test_checker_catches_a_bad_window_table(gen, monkeypatch):
    """A re-layout table whose last key column points one past the grid: the kernels read
    (and dK/dV write) that column through it, and the checker reports it. Every key-side
    tensor is a view with a spare column (``_strided``), so the stray accesses land in memory
    the process owns."""
    p = _shrink(WINDOW_PROBLEMS[0])
    real = relayout.packed

    def corrupt(q_grid, kv_grid, extent, options, device):
        tab = real(q_grid, kv_grid, extent, options, device).clone()
        T, T2, H, H2, W, W2 = q_grid[0], kv_grid[0], q_grid[1], kv_grid[1], q_grid[2], kv_grid[2]
        pk_w = 3 * (T + T2 + H + H2) + 3 * W           # the w axis's key re-layout
        tab[pk_w + W2 - 1] = W2                         # one column past the grid
        return tab
    monkeypatch.setattr(relayout, "packed", corrupt)
    shape = (p.B, *p.q_grid, p.heads, p.D)
    q, k, v, dout, dk, dv = (_strided(shape, torch.float32, gen) for _ in range(6))
    opts, extent, scale = Options.of(p.causal, **p.options), p.resolved_extent, p.D ** -0.5
    with BoundsChecker() as chk:
        out, lse = forward(q, k, v, extent, False, scale, options=opts)
        backward(q, k, v, out, lse, dout, extent, False, scale, dk=dk, dv=dv, options=opts)
    for kernel, op in (("fwd_kernel", "load"), ("bwd_dkdv_kernel", "store"), ("bwd_dq_kernel", "load")):
        assert _violations(chk, kernel, op), (kernel, op)


HEADS_BIAS_CASES = [  # (problem, kv heads, bias, dtype, small tiles): heads as given, B cut to 2
    (Problem(2, (3, 5, 7), 2, 24, (1, 2, 2), causal=True), 1, True, torch.float32, True),
    (Problem(1, (3, 4, 5), 3, 16, (1, 1, 2), kv_grid=(5, 7, 3)), 1, True, torch.bfloat16, False),
    (Problem(1, (2, 3, 4), 2, 8, (2, 2, 3)), 2, True, torch.float32, False),       # R past the capped extent
    (Problem(1, (4, 5, 6), 2, 8, (1, 1, 1), causal=True, dilation=(1, 2, 1), stride=(1, 1, 2)), 1, True,
     torch.float16, True),
    (Problem(1, (5, 4, 6), 2, 8, (1, 1, 1), causal=(True, False, False), border="shift"), 1, True,
     torch.float32, False),
    (Problem(1, (3, 4, 5), 2, 16, (1, 1, 1), kv_grid=(5, 7, 9), dilation=(1, 2, 2)), 1, False,
     torch.float32, True),
]


def _bias_for(p: Problem, dtype, gen):
    from nuwa3dna.kernels.windows import bias_radius
    shift = p.options.get("border") == "shift"
    return torch.randn(p.heads, *(2 * bias_radius(e, None, shift) + 1 for e in p.extent), generator=gen).to(dtype)


def _heads_bias_run(p: Problem, kv_heads: int, bias, dtype, gen, dbias=None):
    q, k, v = p.make(dtype, generator=gen)
    k, v = k[:, :, :, :, :kv_heads].contiguous(), v[:, :, :, :, :kv_heads].contiguous()
    dout = torch.randn(q.shape, generator=gen).to(dtype)
    extent, scale = p.resolved_extent, p.D ** -0.5
    opts, raster = Options.of(p.causal, **p.options), p.causal is True
    out, lse = forward(q, k, v, extent, raster, scale, options=opts, bias=bias)
    backward(q, k, v, out, lse, dout, extent, raster, scale, options=opts, bias=bias, dbias=dbias)


@pytest.mark.parametrize("p,kv_heads,has_bias,dtype,small", HEADS_BIAS_CASES,
                         ids=[f"{p.id}-kv{h}{'-bias' if b else ''}-{str(d)[6:]}{'-small' if s else ''}"
                              for p, h, b, d, s in HEADS_BIAS_CASES])
def test_heads_and_bias_stay_in_bounds(p, kv_heads, has_bias, dtype, small, gen, bounds, small_tiles):
    """Grouped kv heads (dK/dV programs per kv head, looping over the group) and the bias
    (gathered per score; d_bias by atomic adds): every load, store and atomic in bounds."""
    small_tiles(small)
    p = dataclasses.replace(p, B=min(p.B, 2))
    bias = _bias_for(p, torch.float32, gen) if has_bias else None
    _heads_bias_run(p, kv_heads, bias, dtype, gen)
    assert bounds.launches >= 4 and bounds.checked > 0


def test_checker_catches_a_short_bias_gradient(gen):
    """A d_bias buffer one head short (a view of a full-size buffer): the last head's dQ
    programs add past it, and the checker reports those atomics and nothing else."""
    p = Problem(1, (2, 3, 4), 2, 8, (1, 1, 1))
    bias = _bias_for(p, torch.float32, gen)
    short = torch.zeros(bias.shape, dtype=torch.float32)[:1]
    with BoundsChecker() as chk:
        _heads_bias_run(p, 1, bias, torch.float32, gen, dbias=short)
    bad = _violations(chk, "bwd_dq_kernel", "atomic")
    assert bad and len(bad) == len(chk.violations), chk.violations


def test_non_contiguous_in_bounds(gen, bounds):
    """Padded, permuted views: an access in a gap between rows would be caught."""
    _forward_backward(Problem(2, (2, 3, 5), 1, 24, (1, 1, 2), causal=True), torch.float32, gen, strided=True)


def test_element_addresses_are_exact():
    base = torch.zeros(4, 6)
    view = base[1:3, ::2]                        # rows 1-2, even columns
    got = (element_addresses(view) - base.data_ptr()) // 4
    assert got.tolist() == [6, 8, 10, 12, 14, 16]
    bc = torch.zeros(3).expand(2, 3)             # stride 0
    assert ((element_addresses(bc) - bc.data_ptr()) // 4).tolist() == [0, 1, 2]


def _short_view(shape, dtype):
    """A view one frame too short, carved from a buffer of the full shape: the kernels,
    which take the grid from q, address the missing frame through its strides."""
    buf = torch.zeros(shape, dtype=dtype)
    return buf[:, :shape[1] - 1]


def _violations(chk, kernel, op):
    return [x for x in chk.violations if x["kernel"] == kernel and x["op"] == op]


def test_checker_catches_out_of_bounds_store(gen):
    """The forward given an output one frame short: the last frame's tiles store past it."""
    p = _shrink(BY_ID["B2-T3H5W7-h2-d24-e1x2x2-causal"])
    q, k, v = p.make(torch.float32, generator=gen)
    with BoundsChecker() as chk:
        forward(q, k, v, p.resolved_extent, p.causal, p.D ** -0.5, out=_short_view(q.shape, q.dtype))
    bad = _violations(chk, "fwd_kernel", "store")
    assert bad and len(bad) == len(chk.violations), chk.violations
    assert all(x["bad_lanes"] > 0 and x["pid"][0] >= 0 for x in bad), bad


def test_checker_catches_out_of_bounds_load(gen):
    """A backward given an output gradient one frame short: preprocess, dK/dV and dQ read past it."""
    p = _shrink(BY_ID["B2-T3H5W7-kvT2H3W4-h3-d24-e1x1x2"])
    q, k, v = p.make(torch.float32, generator=gen)
    extent, scale = p.resolved_extent, p.D ** -0.5
    out, lse = forward(q, k, v, extent, p.causal, scale)
    with BoundsChecker() as chk:
        backward(q, k, v, out, lse, _short_view(q.shape, q.dtype), extent, p.causal, scale)
    for kernel in ("bwd_preprocess_kernel", "bwd_dkdv_kernel", "bwd_dq_kernel"):
        assert _violations(chk, kernel, "load"), kernel
    assert not [x for x in chk.violations if x["op"] == "store"]
