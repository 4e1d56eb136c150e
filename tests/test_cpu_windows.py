"""The CPU backend (``backend="torch"``) with the v2 window options (docs/design.md section 7).

Dilation, stride, per-axis and raster causal, clipped and shifted borders, self
and cross, through the public API against the dense reference, forward and the
three gradients, in both strategies of the backend (the ``strategy`` fixture of
tests/test_cpu.py); fp64 gradcheck; the tile loops with forced odd tile shapes
through the backend's own entry points.
"""

import pytest
import torch

from nuwa3dna import nearby_attention
from nuwa3dna.kernels.cpu import planner
from nuwa3dna.kernels.cpu.backward import backward
from nuwa3dna.kernels.cpu.forward import forward
from nuwa3dna.kernels.cpu.layout import relay, unrelay
from nuwa3dna.kernels.cpu.planner import CpuConfig
from nuwa3dna.kernels.problems import FRAME_WINDOW_PROBLEMS, TEST_PROBLEMS, WINDOW_PROBLEMS, Problem
from nuwa3dna.kernels import windows
from nuwa3dna.kernels.windows import Options
from nuwa3dna.reference import dense_nearby_attention

PROBLEMS = WINDOW_PROBLEMS + FRAME_WINDOW_PROBLEMS


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
    # Full Jacobians on the first problem, random projections (fast mode) on the rest: time.
    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-5, fast_mode=p is not GRADCHECK[0])


def _direct(p, q, k, v, dout, config):
    """The tile loops through the backend's own entry points (no strategy choice)."""
    opts = Options.of(p.causal, **p.options)
    scale, extent, raster = p.D ** -0.5, p.resolved_extent, p.causal is True
    out, lse = forward(q, k, v, extent, raster, scale, config, opts)
    return (out, *backward(dout, None, q, k, v, out, lse, extent, raster, scale, config, opts))


@pytest.mark.parametrize("tiles", [(1, 1), (2, 3), (3, 2), (16, 16)])
@pytest.mark.parametrize("p", [WINDOW_PROBLEMS[2], WINDOW_PROBLEMS[6], WINDOW_PROBLEMS[9], FRAME_WINDOW_PROBLEMS[1],
                               FRAME_WINDOW_PROBLEMS[5]], ids=lambda p: p.id)
def test_options_tile_shapes(p, tiles, gen):
    """Partial row tiles and strips, tiles larger than the grid, one-query tiles: fp64, tight."""
    q, k, v = p.make(torch.float64, generator=gen)
    dout = torch.randn(q.shape, generator=gen, dtype=torch.float64)
    ours = _direct(p, q, k, v, dout, CpuConfig(tiles=tiles))
    ref = _run(lambda q, k, v: dense_nearby_attention(q, k, v, p.extent, p.causal, **p.options), q, k, v, dout)
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, ref):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10, msg=lambda m: f"{name}: {m}")


def test_plain_plan_unchanged():
    """Options at their defaults: the plan is today's: one run per key frame, exactly the query
    frames whose window (and raster causality) reaches it, key frames in order."""
    for p in TEST_PROBLEMS:
        g = planner.geometry(p.q_grid, p.kv, p.resolved_extent, p.causal is True, 2, 3)
        sees = windows.axis_mask(p.q_grid[0], p.kv[0], **Options().axis(0, p.resolved_extent))
        if p.causal is True:
            sees &= torch.ones_like(sees).tril()
        expect = [(a, int(col.nonzero().min()), int(col.nonzero().max()) + 1)
                  for a, col in enumerate(sees.T) if col.any()]
        assert list(g.runs) == expect
        assert g == planner.geometry(p.q_grid, p.kv, p.resolved_extent, p.causal is True, 2, 3, Options())


def test_frame_runs():
    """Dilation 2 on T re-lays frames by residue, so the query frames seeing key frame 1 (1 and 3;
    re-laid 3 and 4, key 1 -> 3) are one run; per-axis causal on T hides the query frames
    before the key frame; without re-layout a dilated frame set would split into runs of one."""
    g = planner.geometry((6, 3, 3), (6, 3, 3), (1, 1, 1), False, 2, 2, Options(dilation=(2, 1, 1)))
    assert g.perms[4] == g.perms[5] == (0, 2, 4, 1, 3, 5)
    assert [r for r in g.runs if r[0] == 3] == [(3, 3, 5)]
    g = planner.geometry((6, 3, 3), (6, 3, 3), (2, 1, 1), False, 2, 2, Options(axis_causal=(True, False, False)))
    assert [r for r in g.runs if r[0] == 2] == [(2, 2, 5)]


def test_dilated_halo_size():
    """A dilated axis is re-laid by residue class (``planner.axis_perms``): a tile's halo is the
    plain one (4 rows + 2*3), not the union of interleaved residues (4 + 2*2*3 = 16)."""
    plain = planner.geometry((1, 32, 32), (1, 32, 32), (0, 3, 3), False, 4, 4)
    dil = planner.geometry((1, 32, 32), (1, 32, 32), (0, 3, 3), False, 4, 4, Options(dilation=(1, 2, 2)))
    assert (plain.lh, plain.lw) == (10, 10)
    assert (dil.lh, dil.lw) == (10, 10)
    assert dil.perms[0][:3] == (0, 2, 4) and dil.perms[1][16:18] == (1, 3)


def test_relay_roundtrip():
    g = planner.geometry((2, 7, 9), (2, 11, 6), (1, 1, 1), False, 2, 3, Options(dilation=(1, 3, 2)))
    for side, shape in (("q", (1, 2, 7, 9, 2, 4)), ("k", (1, 2, 11, 6, 2, 4))):
        x = torch.randn(shape)
        assert torch.equal(unrelay(relay(x, g, side), g, side), x)


def test_opcheck_and_compile_with_options(gen):
    """The custom op with its ``window`` list: schema, fake, autograd (opcheck), and
    torch.compile(fullgraph=True) through the public API."""
    from torch.library import opcheck
    p = Problem(1, (3, 6, 6), 1, 8, (1, 1, 1), causal=(True, False, False), dilation=(1, 2, 2), border="shift")
    q, k, v = p.make(torch.float32, requires_grad=True, generator=gen)
    window = Options.of(p.causal, **p.options).encode()
    opcheck(torch.ops.nuwa3dna.torch_fwd.default, (q, k, v, [1, 1, 1], False, 0.3, window))
    torch._dynamo.reset()
    fn = lambda q, k, v: nearby_attention(q, k, v, p.extent, p.causal, backend="torch", **p.options)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out = compiled(q, k, v)
    torch.testing.assert_close(out, fn(q, k, v))
    torch.autograd.grad(out.sum(), (q, k, v))
