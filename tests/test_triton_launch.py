"""The Triton backend's launch machinery, without running attention: tile plans,
the device the kernels launch on, and the index widths of the window arithmetic
(the jit helpers evaluated in small probe kernels against
``nuwa3dna.kernels.geometry`` at sizes where int32 overflows). Runs under the
Triton interpreter on CPU (tests/conftest.py), compiled where CUDA is available.
"""
import itertools
import math

import pytest
import torch

from nuwa3dna.kernels import geometry
from nuwa3dna.problems import TEST_PROBLEMS, WORKLOADS, Problem

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

import triton  # noqa: E402  (after the interpreter is on)
import triton.language as tl  # noqa: E402

from nuwa3dna.kernels.triton import configs, launch  # noqa: E402
from nuwa3dna.kernels.triton.jit import centre, floor_div_wide, query_range  # noqa: E402
from nuwa3dna.kernels.triton.launch import backward, forward, stats_shape  # noqa: E402
from nuwa3dna.kernels.triton.tables import LAUNCH_TABLES  # noqa: E402

BY_ID = {p.id: p for p in TEST_PROBLEMS}


def test_library_loads_without_triton(run_compiled):
    """nuwa3dna, the kernels.triton package and its configs import no Triton, so the
    library (and backend="torch") works where Triton is absent."""
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch, nuwa3dna, nuwa3dna.kernels.triton.configs as c\n"
            "q = torch.randn(1, 2, 3, 4, 2, 8)\n"
            "assert nuwa3dna.nearby_attention(q, q, q, 1, backend='torch').shape == q.shape\n"
            "c.pick_configs((2, 3, 4), (2, 3, 4), (1, 1, 1), 8, torch.float32)\n")
    run_compiled("-c", code, timeout=300)


@pytest.mark.parametrize("family", sorted(LAUNCH_TABLES))
def test_tile_plans_are_consistent(family):
    """Every planned tile has the configured number of rows and a one-frame walked tile."""
    for p in [*TEST_PROBLEMS, *WORKLOADS.values(), Problem(1, (2, 3, 4), 1, 200, (1, 1, 2), causal=True)]:
        for dtype in (torch.float32, torch.bfloat16):
            cfgs = configs.pick_configs(p.q_grid, p.kv, p.resolved_extent, p.D, dtype, family)
            for kind in ("fwd", "dq"):
                assert cfgs[kind].k_tile[0] == 1, (p.id, kind)
                assert cfgs[kind].block_q >= 16 and cfgs[kind].block_k >= 16
            assert cfgs["dkdv"].q_tile[0] == 1
            assert cfgs["fwd"].block_d >= max(16, p.D)


def test_launches_on_the_inputs_device(monkeypatch):
    """Tensors on cuda:1 while cuda:0 is current: every launch happens with cuda:1 current.
    No GPU needed: fake CUDA tensors (FakeTensorMode), a mocked current device, and
    launches recorded instead of run."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    current, seen = [0], []

    class FakeDevice:       # torch.cuda.device(d): d current inside the block
        def __init__(self, device):
            self.index = torch.device(device).index

        def __enter__(self):
            self.prev, current[0] = current[0], self.index

        def __exit__(self, *exc):
            current[0] = self.prev

    monkeypatch.setattr(torch.cuda, "device", FakeDevice)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(launch, "_run", lambda spec: seen.append((spec[0].__name__, current[0])))
    p = BY_ID["B2-T3H5W7-h2-d24-e1x2x2-causal"]
    with FakeTensorMode(allow_non_fake_inputs=True):
        q, k, v = (torch.empty(p.B, *p.q_grid, p.heads, p.D, device="cuda:1") for _ in range(3))
        out, lse = forward(q, k, v, p.resolved_extent, True, 0.5)
        backward(q, k, v, out, lse, torch.empty_like(out), p.resolved_extent, True, 0.5)
    assert out.device == torch.device("cuda:1") and current == [0]
    assert [name for name, _ in seen] == ["fwd_kernel", "bwd_preprocess_kernel", "bwd_dkdv_kernel",
                                          "bwd_dq_kernel"]
    assert all(dev == 1 for _, dev in seen), seen


@triton.jit
def _index_probe(I, K0, K1, OUT, n_q, n_kv, e, N: tl.constexpr, WIDE_IDX: tl.constexpr):
    """OUT = [centre(I), query_range(K0, K1) as q0, q1], N values each (int32)."""
    offs = tl.arange(0, N)
    tl.store(OUT + offs, centre(tl.load(I + offs), n_q, n_kv, WIDE_IDX))
    q0, q1 = query_range(tl.load(K0 + offs), tl.load(K1 + offs), n_q, n_kv, e, WIDE_IDX)
    tl.store(OUT + N + offs, q0)
    tl.store(OUT + 2 * N + offs, q1)


@triton.jit
def _div_probe(X, OUT, d, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(OUT + offs, floor_div_wide(tl.load(X + offs), d))


@pytest.mark.parametrize("d", [1, 3, 46341, 65537, 999983, (1 << 31) - 1])
def test_floor_div_wide(d):
    """floor_div_wide (reciprocal estimate + int64 fix-up) is exact, also at exact
    multiples of d and one below or above them, for quotients up to 2**32."""
    g = torch.Generator().manual_seed(d)
    quot = torch.cat([torch.tensor([0, 1, 2, 46340, (1 << 31) - 1, (1 << 32) - 1]),
                      torch.randint(0, 1 << 32, (10,), generator=g)])
    x = torch.cat([quot * d, (quot * d - 1).clamp(min=0), quot * d + d - 1, quot * d + d // 2])
    out = torch.empty_like(x, device=DEVICE)
    _div_probe[(1,)](x.to(DEVICE), out, d, N=x.numel())
    assert out.cpu().tolist() == (x // d).tolist()


# (n_q, n_kv, e) of one axis whose window products pass int32 (2 * 50000**2 > 2**31).
LONG_AXES = [(50000, 50000, 3), (46341, 46341, 46340), (1 << 21, 1500, 1499), (3000, 1 << 20, 7),
             (70000, 40000, 2)]


@pytest.mark.parametrize("n_q,n_kv,e", LONG_AXES, ids=lambda x: str(x))
def test_window_index_formulas_on_long_axes(n_q, n_kv, e):
    """The kernels' centre and query-range formulas equal nuwa3dna.kernels.geometry's at
    sizes where the int32 products overflow; the launcher turns WIDE_IDX on exactly there."""
    N = 16
    g = torch.Generator().manual_seed(n_q)
    ends = lambda n: [0, 1, n // 2, n - 2, n - 1]        # and random indices
    i = torch.cat([torch.tensor(ends(n_q)), torch.randint(0, n_q, (N - 5,), generator=g)])
    k0 = torch.cat([torch.tensor(ends(n_kv)), torch.randint(0, n_kv, (N - 5,), generator=g)])
    k1 = torch.minimum(k0 + torch.tensor([0, 7] * (N // 2)), torch.tensor(n_kv - 1))   # one key or a run
    want = [[geometry.centre_int(x, n_q, n_kv) for x in i.tolist()]]
    want += map(list, zip(*(geometry.query_range(a, b + 1, n_q, n_kv, e)
                            for a, b in zip(k0.tolist(), k1.tolist()))))

    def probe(wide):
        out = torch.zeros(3 * N, dtype=torch.int32, device=DEVICE)
        args = [x.to(DEVICE, torch.int32) for x in (i, k0, k1)]
        _index_probe[(1,)](*args, out, n_q, n_kv, e, N=N, WIDE_IDX=wide)
        c, q0, q1 = out.cpu().view(3, N).tolist()
        empty = [a >= b for a, b in zip(q0, q1)]         # geometry returns (0, 0) for no query
        return [c, [0 if z else a for a, z in zip(q0, empty)], [0 if z else b for b, z in zip(q1, empty)]]

    assert probe(True) == want
    assert probe(False) != want                          # int32 alone overflows here
    assert launch.needs_wide_index((1, 1, n_q), (1, 1, n_kv), (0, 0, e))


def test_launcher_index_width():
    """WIDE_IDX only where needed (no named workload needs it); grids of 2**31 tokens are refused."""
    def spec(q_grid, kv_grid, extent, D=16):
        q, k = (torch.empty(1, *g, 1, D, device="meta") for g in (q_grid, kv_grid))
        lse = torch.empty(stats_shape(q), device="meta")
        return launch.fwd_launch(q, k, k, q, lse, extent, False, 1.0)[3]

    assert spec((1, 1, 50000), (1, 1, 50000), (0, 0, 3))["WIDE_IDX"]
    for p in WORKLOADS.values():
        assert not spec(p.q_grid, p.kv, p.resolved_extent)["WIDE_IDX"], p.id
    with pytest.raises(ValueError, match="int32"):
        spec((2048, 1024, 1024), (8, 8, 8), (1, 1, 1))


# ----------------------------------------------------------------------------- the tile planner's count


def _replay(kind, q_grid, kv_grid, extent, causal, q_tile, k_tile):
    """The kernels' loops transcribed literally, one program and one iteration at a time:
    (iterations, set of computed (query, key) raster pairs of on-grid rows)."""
    (T, H, W), (T2, H2, W2), (ET, EH, EW) = q_grid, kv_grid, extent
    cdiv, c_ = (lambda a, b: -(-a // b)), (lambda i, n, m: i * m // n)
    iters, pairs, inside = 0, set(), True
    if kind != "dkdv":
        (BT, BH, BW), (_, KH, KW) = q_tile, k_tile
        for t0, h0, w0 in itertools.product(range(0, T, BT), range(0, H, BH), range(0, W, BW)):
            tl_, hl, wl = min(t0 + BT, T) - 1, min(h0 + BH, H) - 1, min(w0 + BW, W) - 1
            a_lo, a_hi = max(c_(t0, T, T2) - ET, 0), min(c_(tl_, T, T2) + ET + 1, T2)
            b_lo, b_hi = max(c_(h0, H, H2) - EH, 0), min(c_(hl, H, H2) + EH + 1, H2)
            c_lo, c_hi = max(c_(w0, W, W2) - EW, 0), min(c_(wl, W, W2) + EW + 1, W2)
            n_b, n_c = cdiv(b_hi - b_lo, KH), cdiv(c_hi - c_lo, KW)
            # The walked tiles slide back inside the grid where they fit.
            b_lo, c_lo = max(min(b_lo, H2 - n_b * KH), 0), max(min(c_lo, W2 - n_c * KW), 0)
            n_iter = (a_hi - a_lo) * n_b * n_c
            if causal:
                rows = (hl - b_lo) // KH + 1
                cols = (wl - c_lo) // KW + 1 if b_lo + (rows - 1) * KH == hl else n_c
                n_iter = (tl_ - a_lo) * n_b * n_c + (rows - 1) * n_c + cols
            for it in range(n_iter):
                a, bb, c = a_lo + it // (n_b * n_c), b_lo + ((it // n_c) % n_b) * KH, c_lo + (it % n_c) * KW
                iters += 1
                inside &= bb + KH <= H2 and c + KW <= W2
                qs = [(t * H + h) * W + w for t, h, w in itertools.product(
                    range(t0, min(t0 + BT, T)), range(h0, min(h0 + BH, H)), range(w0, min(w0 + BW, W)))]
                ks = [(a * H2 + h) * W2 + w for h, w in itertools.product(
                    range(bb, min(bb + KH, H2)), range(c, min(c + KW, W2)))]
                pairs.update(itertools.product(qs, ks))
        return iters, pairs, inside
    (_, BH, BW), (KT, KH, KW) = q_tile, k_tile
    for a0, b0, c0 in itertools.product(range(0, T2, KT), range(0, H2, KH), range(0, W2, KW)):
        t_lo, t_hi = geometry.query_range(a0, min(a0 + KT, T2), T, T2, ET)
        h_lo, h_hi = geometry.query_range(b0, min(b0 + KH, H2), H, H2, EH)
        w_lo, w_hi = geometry.query_range(c0, min(c0 + KW, W2), W, W2, EW)
        n_h, n_w = cdiv(h_hi - h_lo, BH), cdiv(w_hi - w_lo, BW)
        start = 0
        if causal:
            skip_h = (b0 - h_lo) // BH
            ends = min(h_lo + (skip_h + 1) * BH, h_hi) - 1 == b0
            start = (a0 - t_lo) * n_h * n_w + skip_h * n_w + ((c0 - w_lo) // BW if ends else 0)
        for it in range(start, (t_hi - t_lo) * n_h * n_w):
            t, h, w = t_lo + it // (n_h * n_w), h_lo + ((it // n_w) % n_h) * BH, w_lo + (it % n_w) * BW
            iters += 1
            qs = [(t * H + y) * W + x for y, x in itertools.product(range(h, min(h + BH, h_hi)),
                                                                    range(w, min(w + BW, w_hi)))]
            ks = [(a * H2 + y) * W2 + x for a, y, x in itertools.product(
                range(a0, min(a0 + KT, T2)), range(b0, min(b0 + KH, H2)), range(c0, min(c0 + KW, W2)))]
            pairs.update(itertools.product(qs, ks))
    return iters, pairs, None


PLAN_TILES = {"fwd": [((2, 2, 4), (1, 2, 8)), ((1, 4, 4), (1, 4, 4)), ((4, 1, 4), (1, 1, 16))],
              "dkdv": [((1, 2, 8), (2, 2, 4)), ((1, 4, 4), (1, 1, 16)), ((1, 1, 16), (4, 2, 2))]}


@pytest.mark.parametrize("p", TEST_PROBLEMS, ids=lambda p: p.id)
def test_planner_count_equals_replay(p):
    """plan.computed_pairs (per-axis sums) equals the literal replay of the loops, and the
    replayed tiles cover every visible pair (the dense mask's), for forward/dQ and dK/dV;
    plan.keys_inside (the kernels' unmasked key loads) says True exactly when every
    replayed forward key tile lies inside the grid."""
    from nuwa3dna.kernels.triton.plan import computed_pairs, keys_inside
    from nuwa3dna.reference import nearby_mask

    ext = p.resolved_extent
    visible = set(map(tuple, nearby_mask(p.q_grid, p.kv, p.extent, p.causal).nonzero().tolist()))
    for kind, tiles in PLAN_TILES.items():
        for q_tile, k_tile in tiles:
            iters, pairs, inside = _replay(kind, p.q_grid, p.kv, ext, p.causal, q_tile, k_tile)
            if kind == "fwd" and not p.causal:      # causal walks a prefix: inside may hold there only
                assert keys_inside(p.q_grid, p.kv, ext, q_tile, k_tile) == inside, (q_tile, k_tile)
            elif kind == "fwd":
                assert inside or not keys_inside(p.q_grid, p.kv, ext, q_tile, k_tile), (q_tile, k_tile)
            block = math.prod(q_tile[1:] if kind == "dkdv" else q_tile) * math.prod(
                k_tile if kind == "dkdv" else k_tile[1:])
            assert computed_pairs(kind, p.q_grid, p.kv, ext, p.causal, q_tile, k_tile) == iters * block
            assert visible <= pairs, (kind, q_tile, k_tile, len(visible - pairs))


@pytest.mark.parametrize("name,old,cut", [("nuwa-video", 4956160, 1 / 3), ("nuwa-image", 135168, 0.38)])
def test_planner_counts_causal_skips(name, old, cut):
    """The NÜWA decoders' forward (and dQ) compute at least a third fewer pairs than the
    non-causal box model's plan did (16x2x2 / 1x8x8 on nuwa-video, 1x2x32 / 1x8x8 on
    nuwa-image), and at least the useful fractions of SPEC section 6 (16%, 11%)."""
    from nuwa3dna.kernels.triton.plan import computed_pairs

    p = WORKLOADS[name]
    for kind in ("fwd", "dq"):
        c = configs.pick_configs(p.q_grid, p.kv, p.resolved_extent, p.D, torch.bfloat16, 90, p.causal)[kind]
        n = computed_pairs(kind, p.q_grid, p.kv, p.resolved_extent, True, c.q_tile, c.k_tile)
        assert n <= (1 - cut) * old, (kind, c, n)
        assert p.visible_pairs() / n >= {"nuwa-video": 0.16, "nuwa-image": 0.11}[name]
