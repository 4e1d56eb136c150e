"""The Triton backend with the v2 window options (docs/design.md section 7): dilation, stride,
per-axis and raster causal, clipped and shifted borders, asymmetric windows (NATTEN's even
kernels), self and cross, through the public path (``nearby_attention(..., backend="triton")``,
``NearbyAttention3D``, ``nuwa3dna.natten.na3d``) against the dense reference, forward and the
three gradients, under the Triton interpreter on CPU (compiled on a GPU where CUDA is available).

Tolerance as tests/test_triton.py (FlashAttention rule): err(triton vs dense float64) <=
2 * err(dense in the test dtype vs dense float64) + atol. Also here, without running kernels:
the window tables of the table path (``relayout``) against the per-axis masks, the exact
computed-pair count of that path against a literal replay of the kernels' loops, and
``backend="auto"`` on CUDA choosing Triton for the options.

Untested here: the compiled GPU kernels (kernels/report.py compiles the table path too).
"""
import dataclasses
import itertools
import math
import random

import pytest
import torch

from nuwa3dna import NearbyAttention3D, nearby_attention
from nuwa3dna import natten as na
from nuwa3dna.dispatch import choose_backend
from nuwa3dna.kernels.windows import Options, axis_mask
from nuwa3dna.problems import TEST_PROBLEMS, WORKLOADS, Problem
from nuwa3dna.kernels.problems import FRAME_WINDOW_PROBLEMS, WINDOW_PROBLEMS
from nuwa3dna.ops import windowed_attention
from nuwa3dna.reference import dense_nearby_attention, nearby_mask

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

from nuwa3dna.kernels.triton import configs, launch, relayout  # noqa: E402  (after the interpreter is on)
from nuwa3dna.kernels.triton.plan import computed_pairs  # noqa: E402

ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-3}

# WINDOW_PROBLEMS keep the frame axis plain; FRAME_WINDOW_PROBLEMS dilate and stride it; these
# also mix cross grids (finer and coarser key grids) with shifted borders, and pad a head dim (40 -> 64).
EXTRA = FRAME_WINDOW_PROBLEMS + [
    Problem(1, (4, 5, 6), 2, 16, (1, 1, 1), kv_grid=(6, 7, 9), dilation=(2, 2, 3), border="shift"),
    Problem(1, (5, 9, 8), 1, 8, (1, 1, 1), kv_grid=(3, 4, 5), stride=(2, 3, 2), dilation=(1, 2, 1)),
    Problem(1, (3, 5, 7), 1, 40, (1, 1, 2), causal=True, dilation=(1, 2, 1), stride=(1, 1, 2)),
]
# Interpreter time: two batches keep one head (the batch and the head offsets are both still run).
PROBLEMS = [dataclasses.replace(p, heads=1) if p.B > 1 else p for p in WINDOW_PROBLEMS + EXTRA]
BY_ID = {p.id: p for p in PROBLEMS}
LOWP = [  # (problem, dtype): shift, causal per axis and raster, cross, dilation and stride
    (PROBLEMS[4], torch.float16), (PROBLEMS[6], torch.bfloat16), (PROBLEMS[8], torch.float16),
    (PROBLEMS[14], torch.bfloat16), (PROBLEMS[18], torch.bfloat16),
]


def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def _grads(fn, q, k, v, g):
    xs = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    out = fn(*xs)
    return [out, *torch.autograd.grad(out, xs, g.to(out.dtype))]


def _check(fn, ref, q, k, v, gen, dtype, what):
    """fn (triton) and ref (dense) on q, k, v: output and dq, dk, dv by the 2x rule."""
    g = torch.randn(q.shape, generator=gen).to(DEVICE)
    exact = _grads(ref, q.double(), k.double(), v.double(), g.double())
    lowp = _grads(ref, q, k, v, g)
    ours = _grads(fn, q, k, v, g)
    for name, o, l, r in zip(("out", "dq", "dk", "dv"), ours, lowp, exact):
        assert o.dtype == dtype and o.shape == r.shape
        err, base = _max_err(o, r), _max_err(l, r)
        assert err <= 2 * base + ATOL[dtype], f"{what} {dtype} {name}: {err=} {base=}"


def _check_problem(p: Problem, dtype, gen):
    q, k, v = p.make(dtype, device=DEVICE, generator=gen)
    scale = p.D ** -0.5
    _check(lambda a, b, c: nearby_attention(a, b, c, p.extent, p.causal, scale, "triton", **p.options),
           lambda a, b, c: dense_nearby_attention(a, b, c, p.extent, p.causal, scale, **p.options),
           q, k, v, gen, dtype, p.id)


@pytest.mark.parametrize("p", PROBLEMS, ids=lambda p: p.id)
def test_fp32_forward_backward(p, gen):
    _check_problem(p, torch.float32, gen)


@pytest.mark.parametrize("p,dtype", LOWP, ids=[f"{p.id}-{str(d)[6:]}" for p, d in LOWP])
def test_low_precision(p, dtype, gen):
    _check_problem(p, dtype, gen)


@pytest.mark.parametrize("p", [PROBLEMS[6], PROBLEMS[12], PROBLEMS[14]], ids=lambda p: p.id)
def test_small_tiles(p, gen, small_tiles):
    """16-row tiles (conftest.SMALL_TILES): several tiles per axis, tiles that straddle two
    residue classes of a dilated axis, and the causal skips in re-laid coordinates
    (raster causal with dilated rows; frame-causal with strided frames; raster causal with
    dilated frames and shifted windows)."""
    small_tiles()
    _check_problem(dataclasses.replace(p, B=1, heads=1), torch.float32, gen)


@pytest.mark.parametrize("size,kernel,stride,dilation,causal", [
    ((6, 7, 8), (2, 4, 4), (1, 2, 1), (1, 1, 2), (True, False, False)),
    ((5, 9, 6), (3, 4, 2), (3, 1, 2), (1, 2, 3), (False, True, False)),
], ids=["3d-k2x4x4-causalT", "3d-k3x4x2-causalH"])
def test_natten_even_kernels(size, kernel, stride, dilation, causal, gen, monkeypatch):
    """``nuwa3dna.natten.na3d`` with even kernel sizes (K // 2 keys before the leader, K // 2 - 1
    after: asymmetric windows) on the Triton kernels, as ``backend="auto"`` runs it on CUDA,
    against the same call on the dense reference."""
    import nuwa3dna.ops as ops
    q, k, v = (torch.randn(1, *size, 2, 16, generator=gen).to(DEVICE) for _ in range(3))

    def on(backend):
        def fn(a, b, c):
            monkeypatch.setattr(ops, "resolve_auto", lambda *args, **kw: backend)
            return na.na3d(a, b, c, kernel, stride=stride, dilation=dilation, is_causal=causal)
        return fn
    _check(on("triton"), on("dense"), q, k, v, gen, torch.float32, "na3d")


def test_asymmetric_cross_clip(gen):
    """An asymmetric window (``after``) with clipped borders, raster-free cross attention."""
    q = torch.randn(1, 4, 6, 5, 2, 16, generator=gen).to(DEVICE)
    k, v = (torch.randn(1, 5, 9, 7, 2, 16, generator=gen).to(DEVICE) for _ in range(2))
    kw = dict(dilation=(1, 2, 1), stride=(1, 1, 2), after=(0, 1, 2))
    _check(lambda a, b, c: windowed_attention(a, b, c, (1, 2, 1), backend="triton", **kw),
           lambda a, b, c: windowed_attention(a, b, c, (1, 2, 1), backend="dense", **kw),
           q, k, v, gen, torch.float32, "after")


def test_module(gen):
    """NearbyAttention3D(backend="triton") with frame-causal, dilated, strided, shifted windows
    equals backend="dense" in output and every parameter's and input's gradient."""
    x = torch.randn(1, 4, 6, 7, 16, generator=gen).to(DEVICE)
    kw = dict(heads=2, dim_head=16, extent=(1, 1, 1), causal=(True, False, False), dilation=(1, 2, 2),
              stride=(1, 1, 2), border="shift")
    torch.manual_seed(0)
    mods = [NearbyAttention3D(16, backend=b, **kw).to(DEVICE) for b in ("triton", "dense")]
    mods[1].load_state_dict(mods[0].state_dict())
    res = []
    for m in mods:
        xi = x.clone().requires_grad_()
        y = m(xi)
        res.append([y, *torch.autograd.grad(y.square().sum(), [xi, *m.parameters()])])
    for a, b in zip(*res):
        assert _max_err(a, b) <= 1e-5


def test_auto_on_cuda_picks_triton():
    """auto sends CUDA tensors with window options to Triton (float64 still to the torch backend)."""
    fake = type("FakeCuda", (), {"device": torch.device("cuda", 0), "dtype": torch.bfloat16,
                                 "shape": torch.Size((1, 3, 5, 7, 1, 8))})()
    for opts in (dict(dilation=(1, 2, 2)), dict(stride=2), dict(border="shift"), dict(after=(1, 1, 0))):
        backend, why = choose_backend(fake, fake, (1, 1, 1), False, **opts)
        assert backend == "triton", (opts, why)
    backend, why = choose_backend(fake, fake, (1, 1, 1), (True, False, False))
    assert backend == "triton" and "per axis" in why
    fake.dtype = torch.float64
    assert choose_backend(fake, fake, (1, 1, 1), False, dilation=2)[0] == "torch"


def test_plain_options_take_the_closed_form_path():
    """Options at their defaults launch exactly today's kernels (no tables, TABLES off); any
    option launches the table path with the packed tables and never the int64 variant."""
    q = torch.empty(1, 3, 5, 7, 2, 16, device="meta")
    lse = torch.empty(launch.stats_shape(q), device="meta")
    for options in (None, Options()):
        _, _, args, meta = launch.fwd_launch(q, q, q, q, lse, (1, 2, 2), False, 0.5, options=options)
        assert args[5] is None and meta["TABLES"] is False
    _, _, args, meta = launch.fwd_launch(q, q, q, q, lse, (1, 2, 2), False, 0.5, options=Options(stride=(1, 2, 1)))
    assert meta["TABLES"] is True and meta["WIDE_IDX"] is False
    assert args[5].dtype == torch.int32 and args[5].numel() == relayout.packed_size((3, 5, 7), (3, 5, 7))


# ----------------------------------------------------------------------------- window tables


def _random_axes(n_cases, seed=0):
    """(n, m, before, after, dilation, stride, causal, shift) within the public checks' limits."""
    rng, out = random.Random(seed), []
    while len(out) < n_cases:
        m = rng.randint(1, 13)
        n = m if rng.random() < 0.5 else rng.randint(1, 13)
        causal, shift = n == m and rng.random() < 0.4, rng.random() < 0.4
        before = rng.randint(0, 4)
        after = before if rng.random() < 0.6 else max(0, before - 1)
        d, s = rng.randint(1, 4), rng.randint(1, before + after + 1)
        if (shift and (before + after + 1) * d > m) or (causal and not shift and s > before + 1):
            continue
        out.append((n, m, before, after, d, s, causal, shift))
    return out


@pytest.mark.parametrize("chunk", range(4))
def test_axis_tables_are_the_windows(chunk):
    """Each re-laid query's [lo, hi) is exactly its window (windows.axis_mask), lo and hi never
    decrease, [q0, q1) is exactly the queries that see each key, and in self-attention a
    query's own position is in its window and queries and keys share one re-layout."""
    for n, m, before, after, d, s, causal, shift in _random_axes(400, seed=chunk):
        t = relayout.axis_table(n, m, before, after, d, s, causal, shift)
        mask = axis_mask(n, m, before, after, d, s, causal, shift)
        assert sorted(t.pq) == list(range(n)) and sorted(t.pk) == list(range(m))
        for i in range(n):
            assert mask[t.pq[i]].nonzero().flatten().tolist() == sorted(t.pk[j] for j in range(t.lo[i], t.hi[i]))
        assert all(a <= b for a, b in zip(t.lo, t.lo[1:])) and all(a <= b for a, b in zip(t.hi, t.hi[1:]))
        for j in range(m):
            assert [i for i in range(n) if t.lo[i] <= j < t.hi[i]] == list(range(t.q0[j], t.q1[j]))
        if n == m:
            assert t.pq == t.pk and all(t.lo[i] <= i < t.hi[i] for i in range(n))


@pytest.mark.parametrize("p", TEST_PROBLEMS, ids=lambda p: p.id)
def test_plain_tables_count_as_the_closed_form(p):
    """With every option at its default the tables are the closed-form windows: the table
    path's computed-pair count equals the plain path's for every kernel and tile."""
    ext, causal = p.resolved_extent, p.causal is True
    tables = tuple(relayout.axis_table(n, m, e, e) for n, m, e in zip(p.q_grid, p.kv, ext))
    for kind, q_tile, k_tile in (("fwd", (2, 2, 4), (1, 2, 8)), ("dkdv", (1, 2, 8), (2, 2, 4)),
                                 ("fwd", (1, 4, 4), (1, 4, 4)), ("dkdv", (1, 1, 16), (4, 2, 2))):
        assert computed_pairs(kind, p.q_grid, p.kv, ext, causal, q_tile, k_tile, tables) == \
            computed_pairs(kind, p.q_grid, p.kv, ext, causal, q_tile, k_tile)


def _replay(kind, p, tables, q_tile, k_tile):
    """The table path's loops transcribed literally (walk.query_walk / bwd_dkdv_kernel in re-laid
    coordinates): (iterations, set of computed (query, key) grid raster pairs of on-grid rows)."""
    (T, H, W), (T2, H2, W2) = p.q_grid, p.kv
    tt, th, tw = tables
    causal, cdiv = p.causal is True, (lambda a, b: -(-a // b))
    q_raster = lambda t, h, w: (tt.pq[t] * H + th.pq[h]) * W + tw.pq[w]
    k_raster = lambda a, b, c: (tt.pk[a] * H2 + th.pk[b]) * W2 + tw.pk[c]
    iters, pairs = 0, set()
    if kind != "dkdv":
        (BT, BH, BW), (_, KH, KW) = q_tile, k_tile
        for t0, h0, w0 in itertools.product(range(0, T, BT), range(0, H, BH), range(0, W, BW)):
            tl_, hl, wl = min(t0 + BT, T) - 1, min(h0 + BH, H) - 1, min(w0 + BW, W) - 1
            a_lo, a_hi, b_lo, b_hi = tt.lo[t0], tt.hi[tl_], th.lo[h0], th.hi[hl]
            c_lo, c_hi = tw.lo[w0], tw.hi[wl]
            n_b, n_c = cdiv(b_hi - b_lo, KH), cdiv(c_hi - c_lo, KW)
            n_iter = (a_hi - a_lo) * n_b * n_c
            if causal:
                rows = (hl - b_lo) // KH + 1
                cols = (wl - c_lo) // KW + 1 if b_lo + (rows - 1) * KH == hl else n_c
                n_iter = (tl_ - a_lo) * n_b * n_c + (rows - 1) * n_c + cols
            qs = [q_raster(*x) for x in itertools.product(range(t0, tl_ + 1), range(h0, hl + 1), range(w0, wl + 1))]
            for it in range(n_iter):
                a, bb, c = a_lo + it // (n_b * n_c), b_lo + ((it // n_c) % n_b) * KH, c_lo + (it % n_c) * KW
                iters += 1
                ks = [k_raster(a, y, x) for y, x in itertools.product(range(bb, min(bb + KH, H2)),
                                                                      range(c, min(c + KW, W2)))]
                pairs.update(itertools.product(qs, ks))
        return iters, pairs
    (_, BH, BW), (KT, KH, KW) = q_tile, k_tile
    for a0, b0, c0 in itertools.product(range(0, T2, KT), range(0, H2, KH), range(0, W2, KW)):
        al, bl, cl = min(a0 + KT, T2) - 1, min(b0 + KH, H2) - 1, min(c0 + KW, W2) - 1
        t_lo, t_hi, h_lo, h_hi, w_lo, w_hi = tt.q0[a0], tt.q1[al], th.q0[b0], th.q1[bl], tw.q0[c0], tw.q1[cl]
        n_h, n_w = cdiv(h_hi - h_lo, BH), cdiv(w_hi - w_lo, BW)
        start = 0
        if causal:
            skip_h = (b0 - h_lo) // BH
            ends = min(h_lo + (skip_h + 1) * BH, h_hi) - 1 == b0
            start = (a0 - t_lo) * n_h * n_w + skip_h * n_w + ((c0 - w_lo) // BW if ends else 0)
        ks = [k_raster(*x) for x in itertools.product(range(a0, al + 1), range(b0, bl + 1), range(c0, cl + 1))]
        for it in range(start, (t_hi - t_lo) * n_h * n_w):
            t, h, w = t_lo + it // (n_h * n_w), h_lo + ((it // n_w) % n_h) * BH, w_lo + (it % n_w) * BW
            iters += 1
            qs = [q_raster(t, y, x) for y, x in itertools.product(range(h, min(h + BH, h_hi)),
                                                                  range(w, min(w + BW, w_hi)))]
            pairs.update(itertools.product(qs, ks))
    return iters, pairs


@pytest.mark.parametrize("p", PROBLEMS, ids=lambda p: p.id)
def test_table_count_equals_replay(p):
    """plan.computed_pairs on the tables equals the literal replay of the table path's loops,
    and the replayed tiles cover every visible pair of the dense mask (causal skips included)."""
    ext = p.resolved_extent
    tables = relayout.window_tables(p.q_grid, p.kv, ext, Options.of(p.causal, **p.options))
    visible = set(map(tuple, nearby_mask(p.q_grid, p.kv, p.extent, p.causal, **p.options).nonzero().tolist()))
    for kind, q_tile, k_tile in (("fwd", (2, 2, 4), (1, 2, 8)), ("fwd", (1, 4, 4), (1, 1, 16)),
                                 ("dkdv", (1, 2, 8), (2, 2, 4)), ("dkdv", (1, 4, 4), (1, 4, 4))):
        iters, pairs = _replay(kind, p, tables, q_tile, k_tile)
        block = math.prod(q_tile[1:] if kind == "dkdv" else q_tile) * math.prod(
            k_tile if kind == "dkdv" else k_tile[1:])
        assert computed_pairs(kind, p.q_grid, p.kv, ext, p.causal is True, q_tile, k_tile, tables) == iters * block
        assert visible <= pairs, (kind, q_tile, k_tile, len(visible - pairs))


def _pairs(p: Problem, kind: str) -> int:
    opts = Options.of(p.causal, **p.options)
    ext = p.resolved_extent
    c = configs.pick_configs(p.q_grid, p.kv, ext, p.D, torch.bfloat16, 90, p.causal is True, opts)[kind]
    tables = None if opts.plain else relayout.window_tables(p.q_grid, p.kv, ext, opts)
    return computed_pairs(kind, p.q_grid, p.kv, ext, p.causal is True, c.q_tile, c.k_tile, tables)


def test_dilation_skips_key_tiles():
    """Key tiles outside every window are skipped: on cpu-mid, dilation (1, 2, 2) computes no
    more pairs than the plain windows (not the 4x of a box over interleaved residues), stride
    (1, 2, 2) no more either, and frame-causal (True, False, False) a third fewer."""
    base = WORKLOADS["cpu-mid"]
    for kind in ("fwd", "dq", "dkdv"):
        plain = _pairs(base, kind)
        assert _pairs(dataclasses.replace(base, dilation=(1, 2, 2)), kind) <= plain
        assert _pairs(dataclasses.replace(base, stride=(1, 2, 2)), kind) <= plain
        assert _pairs(dataclasses.replace(base, causal=(True, False, False)), kind) <= 0.75 * plain
