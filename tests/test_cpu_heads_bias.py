"""The CPU backend (``backend="torch"``) with grouped kv heads (GQA/MQA) and a relative position bias.

Through the public API against the dense reference (``backend="dense"``), in both
strategies of the backend (the ``strategy`` fixture of tests/conftest.py): output,
log-sum-exp and every gradient (dq, dk, dv, d_bias), with the lse used or not (a
used lse reaches the backward as ``dlse``), on odd grids with the v2 window
options; fp64 gradcheck with the bias; opcheck of the op with bias and fewer kv
heads; the tile loops with forced odd tiles, one-row chunks and three workers
through their own entry points; the fused strategy's head blocks that split a
group; what the tile path keeps (k, v at kv heads; the bias index in the bounded
mask cache).
"""
from dataclasses import dataclass, field

import pytest
import torch

from nuwa3dna import clear_workspace, dense_nearby_attention
from nuwa3dna.kernels.cpu import sdpa
from nuwa3dna.kernels.cpu.backward import backward
from nuwa3dna.kernels.cpu.forward import forward
from nuwa3dna.kernels.cpu.planner import MASKS, CpuConfig
from nuwa3dna.kernels.cpu.workspace import workspace
from nuwa3dna.kernels.geometry import resolve_extent
from nuwa3dna.kernels.windows import Options, bias_radius
from nuwa3dna.ops import windowed_attention


@dataclass(frozen=True)
class Case:
    B: int
    q_grid: tuple
    heads: int
    kv_heads: int
    D: int
    extent: tuple
    causal: object = False
    kv_grid: tuple = None
    options: dict = field(default_factory=dict)      # dilation, stride, border, after
    bias: bool = True
    lse: bool = True                                 # the loss uses the log-sum-exp too

    @property
    def id(self):
        kv = "" if self.kv_grid is None else "-kv" + "x".join(map(str, self.kv_grid))
        opts = "".join(f"-{k}{v}" for k, v in self.options.items())
        return (f"B{self.B}-{'x'.join(map(str, self.q_grid))}{kv}-h{self.heads}kv{self.kv_heads}-d{self.D}"
                f"-e{'x'.join(map(str, self.extent))}-c{self.causal}{opts}"
                f"{'-bias' if self.bias else ''}{'-lse' if self.lse else ''}").replace(" ", "")

    def make(self, dtype=torch.float32, gen=None):
        kv = self.kv_grid or self.q_grid
        q = torch.randn(self.B, *self.q_grid, self.heads, self.D, generator=gen, dtype=dtype)
        k, v = (torch.randn(self.B, *kv, self.kv_heads, self.D, generator=gen, dtype=dtype) for _ in range(2))
        if not self.bias:
            return q, k, v, None
        ext = self.extent                   # the user's R (the op itself gets extents capped at the axes)
        after = self.options.get("after") or ext
        shift = self.options.get("border") == "shift"
        shape = [self.heads] + [2 * bias_radius(e, a, shift) + 1 for e, a in zip(ext, after)]
        return q, k, v, torch.randn(shape, generator=gen, dtype=dtype)

    def call(self, backend, q, k, v, bias):
        return windowed_attention(q, k, v, self.extent, self.causal, backend=backend, bias=bias, return_lse=True,
                                  **self.options)


def _variants(B, q_grid, heads, kv_heads, D, extent, causal=False, kv_grid=None, **options):
    """The problem with grouped kv heads alone, the bias alone, and both (lse used on two)."""
    return [Case(B, q_grid, heads, kv_heads, D, extent, causal, kv_grid, options, bias=False, lse=True),
            Case(B, q_grid, heads, heads, D, extent, causal, kv_grid, options, bias=True, lse=False),
            Case(B, q_grid, heads, kv_heads, D, extent, causal, kv_grid, options, bias=True, lse=True)]


CASES = (
    _variants(2, (3, 5, 7), 4, 2, 8, (1, 2, 2))
    + _variants(2, (3, 5, 7), 3, 1, 24, (1, 1, 2), causal=True)
    + _variants(1, (3, 5, 7), 6, 2, 40, (1, 1, 1), kv_grid=(2, 3, 4))
    + _variants(2, (4, 7, 9), 4, 2, 8, (1, 1, 1), stride=(2, 3, 2), dilation=(1, 2, 3), border="shift")
    + _variants(1, (5, 6, 7), 3, 1, 8, (2, 1, 1), causal=(True, True, False), stride=(3, 2, 1),
                dilation=(1, 1, 2))
    + _variants(2, (5, 4, 6), 4, 1, 24, (1, 1, 1), dilation=(2, 1, 2), stride=(2, 1, 1))
    + _variants(2, (3, 5, 7), 4, 2, 8, (1, 1, 1), causal=True, stride=(1, 3, 2), dilation=(1, 2, 1))
    + _variants(1, (3, 6, 11), 4, 2, 8, (0, 1, 2), causal=True, border="shift", dilation=(1, 1, 2))
    + _variants(2, (1, 11, 13), 4, 2, 40, (0, 3, 3), causal=True)
    + _variants(1, (3, 6, 7), 4, 2, 8, (1, 2, 1), border="shift", after=(0, 1, 0))
    + _variants(2, (4, 5, 6), 4, 2, 8, (1, 1, 2), kv_grid=(2, 9, 11), dilation=(1, 2, 2), stride=(1, 3, 1))
    # Extents past the axis lengths: the op gets them capped, the bias keeps the user's R (3, 4, 2).
    + _variants(2, (2, 3, 5), 4, 2, 8, (3, 4, 2), causal=True)
)


def _grads(case, backend, q, k, v, bias, dout, dlse):
    xs = [x.detach().clone().requires_grad_(True) for x in (q, k, v) + ((bias,) if bias is not None else ())]
    out, lse = case.call(backend, *xs[:3], xs[3] if bias is not None else None)
    loss = (out * dout).sum() + ((lse * dlse).sum() if case.lse else 0)
    return (out, lse, *torch.autograd.grad(loss, xs))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_heads_bias_against_dense(case, gen, strategy):
    q, k, v, bias = case.make(gen=gen)
    dout = torch.randn(q.shape, generator=gen)
    dlse = torch.randn(q.shape[:5], generator=gen)
    ours = _grads(case, "torch", q, k, v, bias, dout, dlse)
    ref = _grads(case, "dense", q, k, v, bias, dout, dlse)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv", "dbias"), ours, ref):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, atol=5e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


GRADCHECK = [Case(1, (2, 3, 4), 2, 1, 4, (1, 1, 1), causal=True, options=dict(dilation=(1, 2, 1), stride=(1, 1, 2))),
             Case(2, (2, 3, 4), 2, 1, 4, (1, 1, 1), kv_grid=(3, 4, 5), options=dict(border="shift")),
             Case(1, (3, 4, 6), 3, 3, 4, (1, 1, 1), causal=(True, False, True), options=dict(stride=(2, 2, 1)))]


@pytest.mark.parametrize("case", GRADCHECK, ids=lambda c: c.id)
def test_gradcheck_fp64_with_bias(case, gen, strategy):
    q, k, v, bias = (x.requires_grad_(True) for x in case.make(torch.float64, gen))

    def fn(q, k, v, bias):
        out, lse = case.call("torch", q, k, v, bias)
        return out, lse
    # Full Jacobians on the first case, random projections (fast mode) on the rest: time.
    assert torch.autograd.gradcheck(fn, (q, k, v, bias), eps=1e-6, atol=1e-5, fast_mode=case is not GRADCHECK[0])


def test_opcheck_with_bias_and_kv_heads(gen):
    from torch.library import opcheck
    case = Case(1, (3, 5, 6), 4, 2, 8, (1, 1, 2), causal=(True, False, False), options=dict(dilation=(1, 2, 1)))
    q, k, v, bias = (x.requires_grad_(True) for x in case.make(gen=gen))
    window = Options.of(case.causal, **case.options).encode()
    opcheck(torch.ops.nuwa3dna.torch_fwd.default, (q, k, v, [1, 1, 2], False, 0.3, window, bias))
    opcheck(torch.ops.nuwa3dna.torch_fwd.default, (q, k, v, [1, 1, 2], True, 0.3, None, bias))


def _direct(case, q, k, v, bias, dout, dlse, config):
    """The tile loops through their own entry points (no strategy choice), lse used."""
    opts = Options.of(case.causal, **{k: v for k, v in case.options.items() if k != "after"})
    extent, raster = resolve_extent(case.extent, tuple(k.shape[1:4])), case.causal is True
    out, lse = forward(q, k, v, extent, raster, 0.35, config, opts, bias)
    return (out, lse, *backward(dout, dlse, q, k, v, out, lse, extent, raster, 0.35, config, opts, bias))


@pytest.mark.parametrize("config", [CpuConfig(tiles=(1, 1)), CpuConfig(tiles=(2, 3), chunk_elems=1),
                                    CpuConfig(tiles=(3, 2), chunk_elems=3000), CpuConfig(tiles=(16, 16)),
                                    CpuConfig(parts_per_worker=1, max_workers=1)],
                         ids=["1x1", "2x3-rowchunks", "3x2-chunks", "16x16", "whole-batch"])
@pytest.mark.parametrize("case", [
    Case(3, (3, 5, 7), 6, 3, 8, (1, 2, 2), causal=True),
    Case(2, (4, 5, 6), 4, 2, 8, (1, 1, 2), kv_grid=(2, 3, 9)),
    Case(2, (5, 4, 6), 4, 2, 8, (1, 1, 1), options=dict(dilation=(2, 1, 2), stride=(2, 1, 1))),
    Case(1, (3, 7, 6), 4, 1, 8, (1, 2, 1), causal=True),
], ids=lambda c: c.id)
def test_tile_loops_chunks_and_workers(case, config, gen):
    """Odd tiles, chunks that split batch entries between kv heads (the bias cannot broadcast over
    the batch there), chunks of several whole batch entries (the bias broadcast, its gradient
    summed over them), frame runs whose classes repeat (cross grids, stride on T), three
    workers sharing the bias gradient, MQA at batch 1 (fewer kv rows than workers: the
    backward's workers split row tiles, each with its own dK/dV): fp64 against dense, tight."""
    q, k, v, bias = case.make(torch.float64, gen)
    dout = torch.randn(q.shape, generator=gen, dtype=torch.float64)
    dlse = torch.randn(q.shape[:5], generator=gen, dtype=torch.float64)
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        ours = _direct(case, q, k, v, bias, dout, dlse, config)
    finally:
        torch.set_num_threads(prev)
    xs = [x.detach().clone().requires_grad_(True) for x in (q, k, v, bias)]
    out, lse = dense_nearby_attention(*xs[:3], case.extent, case.causal, 0.35, bias=xs[3], return_lse=True,
                                      **case.options)
    ref = (out, lse, *torch.autograd.grad((out * dout).sum() + (lse * dlse).sum(), xs))
    assert len(ours) == 6
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv", "dbias"), ours, ref):
        torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-9, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("case,partial", [(Case(1, (3, 5, 7), 4, 1, 8, (1, 2, 2), causal=True, bias=False), True),
                                          (Case(1, (3, 5, 7), 6, 2, 8, (1, 1, 2), bias=False, lse=False), True),
                                          (Case(1, (3, 5, 7), 6, 3, 8, (1, 1, 2), bias=False), False)],
                         ids=lambda c: getattr(c, "id", str(c)))
def test_fused_blocks_split_groups(case, partial, gen, monkeypatch):
    """One batch entry, three workers: the fused strategy's head blocks hold parts of a group
    when there are fewer kv heads than workers (their dK, dV partial sums add up), else whole groups."""
    monkeypatch.setattr(sdpa, "SMALL_WORK", 0)
    G = case.heads // case.kv_heads
    blocks = sdpa._blocks(1, case.heads, 3, 1, G)
    assert len(blocks) >= 3 and any((h1 - h0) % G for _, _, h0, h1 in blocks) == partial
    q, k, v, bias = case.make(gen=gen)
    dout = torch.randn(q.shape, generator=gen)
    dlse = torch.randn(q.shape[:5], generator=gen)
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        with torch.no_grad():
            fused = sdpa.use_sdpa(case.q_grid, case.q_grid, case.extent, case.causal, CpuConfig())
        assert fused
        ours = _grads(case, "torch", q, k, v, bias, dout, dlse)
    finally:
        torch.set_num_threads(prev)
    ref = _grads(case, "dense", q, k, v, bias, dout, dlse)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), ours, ref):
        torch.testing.assert_close(a, b, atol=5e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_tile_path_keeps_kv_heads_and_bounded_bias_index(gen, monkeypatch):
    """Grouped queries: the strip layouts of k and v stay at the kv heads (never one copy per query
    head). The bias's slot index lives in the window-mask cache (bounded by its byte limit) and
    ``clear_workspace`` drops it."""
    import dataclasses

    from nuwa3dna.kernels.cpu import planner
    monkeypatch.setattr(planner, "DEFAULT", dataclasses.replace(planner.DEFAULT, fused_max_scores=0,
                                                                fused_max_scores_wide=0, max_workers=1))
    case = Case(2, (3, 8, 8), 8, 2, 16, (1, 2, 2))
    q, k, v, bias = case.make(gen=gen)
    clear_workspace()
    with torch.no_grad():
        case.call("torch", q, k, v, bias)
    ws = workspace()
    g = planner.plan(case.q_grid, case.q_grid, case.extent, False, planner.DEFAULT)
    assert ws.bufs["k"].numel() == 2 * 2 * g.ns * 3 * g.h2p * g.lw * 16          # B * Hk * strips
    assert ws.bufs["q"].numel() == 2 * 8 * g.nht * g.ns * 3 * g.bh * g.bw * 16     # B * Hq * tiles
    keys = [key for key in MASKS.items if key[0] == "bias-tiles"]
    assert keys and MASKS.nbytes() <= planner.DEFAULT.mask_cache_limit
    clear_workspace()
    assert not MASKS.items and not ws.bufs


def test_fused_bias_mask_in_small_calls(gen, monkeypatch):
    """The fused strategy's per-head bias mask capped per kernel call (``fused_bias_mask_bytes``):
    one head per call here, groups split across calls, results unchanged."""
    import dataclasses

    from nuwa3dna.kernels.cpu import planner
    monkeypatch.setattr(planner, "DEFAULT", dataclasses.replace(
        planner.DEFAULT, fused_max_scores=1 << 40, fused_bias_mask_bytes=1))
    case = Case(2, (3, 4, 5), 6, 2, 8, (1, 1, 2), causal=True, lse=False)
    q, k, v, bias = case.make(gen=gen)
    dout, dlse = torch.randn(q.shape, generator=gen), torch.randn(q.shape[:5], generator=gen)
    ours, ref = (_grads(case, b, q, k, v, bias, dout, dlse) for b in ("torch", "dense"))
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv", "dbias"), ours, ref):
        torch.testing.assert_close(a, b, atol=5e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision_with_bias_and_kv_heads(dtype, gen, strategy):
    """fp16/bf16 q, k, v with a float32 bias and grouped kv heads, the lse used: the FlashAttention
    rule, err(ours vs fp64) <= 2 * err(dense in dtype vs fp64) + atol, for every output."""
    case = Case(2, (3, 5, 7), 4, 2, 24, (1, 2, 2), causal=True)
    q, k, v, bias = case.make(gen=gen)
    q, k, v = (x * 3 for x in (q, k, v))                  # peaky logits
    dout = torch.randn(q.shape, generator=gen)
    dlse = torch.randn(q.shape[:5], generator=gen)
    low = [x.to(dtype) for x in (q, k, v)]
    ours = _grads(case, "torch", *low, bias, dout.to(dtype), dlse)
    dense = _grads(case, "dense", *low, bias, dout.to(dtype), dlse)
    exact = _grads(case, "dense", *(x.double() for x in (q, k, v)), bias.double(), dout.double(), dlse.double())
    atol = 1e-3 if dtype == torch.float16 else 4e-3
    for name, a, b, r in zip(("out", "lse", "dq", "dk", "dv", "dbias"), ours, dense, exact):
        assert a.dtype == b.dtype, name
        err, base = ((x.double() - r).abs().max().item() for x in (a, b))
        assert err <= 2 * base + atol * max(1.0, r.abs().max().item()), f"{name}: {err=} > 2 * {base=} + atol"
