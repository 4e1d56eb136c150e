"""Windows v2 (docs/design.md section 7): dilation, stride, per-axis causal and border="shift"
in the geometry, the dense reference and the public API, checked against the brute-force
definition (``reference.brute_force_keys``, written without ``geometry``); with every option
at its default, today's mask bit for bit."""
import logging
import random

import pytest
import torch

from nuwa3dna import NearbyAttention3D, brute_force_nearby_attention, dense_nearby_attention, nearby_attention
from nuwa3dna.checks import check_window_grids, check_windows, normalize_extent
from nuwa3dna.dispatch import choose_backend
from nuwa3dna.kernels import windows
from nuwa3dna.kernels.geometry import count_visible, grid_coords, resolve_extent
from nuwa3dna.kernels.problems import TEST_PROBLEMS, WINDOW_PROBLEMS, WORKLOADS, Problem
from nuwa3dna.reference import brute_force_mask, nearby_mask


@pytest.fixture(autouse=True)
def _tiny(one_thread):
    """Tiny problems, many small ops: one intra-op thread (conftest.one_thread)."""


def old_mask(p):
    """The mask of section 1 (what ``visible`` computed before windows v2), from the brute-force
    definition, which is written without ``geometry``: the oracle for "defaults are bit for bit today's"."""
    return brute_force_mask(p.q_grid, p.kv, p.extent, p.causal)


# ----------------------------------------------------------------------------- random problems
COMBOS = [("self", b, c) for b in ("clip", "shift") for c in ("none", "raster", "axis")] + \
         [("cross", b, "none") for b in ("clip", "shift")]


def random_problem(seed, form, border, causal_kind):
    """A random valid problem of one combination; seed % 3 picks dilation, stride or both."""
    rng = random.Random(seed)
    while True:
        q_grid = tuple(rng.randint(1, 9) for _ in range(3))
        kv_grid = tuple(rng.randint(1, 9) for _ in range(3)) if form == "cross" else None
        extent = tuple(rng.choice([0, 1, 1, 2, 3, None]) for _ in range(3))
        dil = tuple(1 if e is None or seed % 3 == 1 else rng.choice([1, 2, 3]) for e in extent)
        st = tuple(1 if e is None or seed % 3 == 0 else rng.randint(1, 2 * e + 1) for e in extent)
        causal = {"none": False, "raster": True,
                  "axis": tuple(rng.random() < 0.5 for _ in range(3))}[causal_kind]
        if (dil == st == (1, 1, 1) and border == "clip") or (causal_kind == "axis" and not any(causal)):
            continue
        p = Problem(1, q_grid, 1, 8, extent, causal, kv_grid, dilation=dil, stride=st, border=border)
        try:
            check_windows(normalize_extent(extent), causal, dil, st, border)
            check_window_grids(p.q_grid, p.kv, extent, causal, dil, border)
        except ValueError:
            continue
        return p


CASES = {combo: [random_problem(1000 * i + s, *combo) for s in range(24)] for i, combo in enumerate(COMBOS)}


@pytest.mark.parametrize("combo", COMBOS, ids="-".join)
def test_dense_mask_is_the_definition(combo):
    """nearby_mask (geometry) == brute_force_mask (the definition) and count_visible == its sum,
    on 24 random problems per combination (self/cross x clip/shift x no/raster/per-axis causal)."""
    cases = CASES[combo]
    assert any(d > 1 for p in cases for d in p.dilation) and any(s > 1 for p in cases for s in p.stride)
    for p in cases:
        mask = nearby_mask(p.q_grid, p.kv, p.extent, p.causal, **p.options)
        assert torch.equal(mask, brute_force_mask(p.q_grid, p.kv, p.extent, p.causal, **p.options)), p.id
        assert p.visible_pairs() == int(mask.sum()), p.id
        assert mask.any(1).all(), p.id                    # no query is left without a key


@pytest.mark.parametrize("p", WINDOW_PROBLEMS + [c[0] for c in CASES.values()], ids=lambda p: p.id)
def test_dense_matches_brute_force(p, gen):
    q, k, v = p.make(torch.float64, generator=gen)
    ref = brute_force_nearby_attention(q, k, v, p.extent, p.causal, **p.options)
    out = nearby_attention(q, k, v, p.extent, p.causal, backend="dense", **p.options)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("p", WINDOW_PROBLEMS[2:6], ids=lambda p: p.id)
def test_dense_gradients_match_brute_force(p, gen):
    q, k, v = p.make(torch.float64, requires_grad=True, generator=gen)
    dout = torch.randn(q.shape, dtype=torch.float64, generator=gen)
    grads = [torch.autograd.grad(f(q, k, v, p.extent, p.causal, **p.options), (q, k, v), dout)
             for f in (dense_nearby_attention, brute_force_nearby_attention)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_axis_window_closed_form_matches_vectorised():
    rng = random.Random(5)
    for _ in range(400):
        n, m = rng.randint(1, 12), rng.randint(1, 12)
        before, after, d = rng.randint(0, 4), rng.randint(0, 4), rng.randint(1, 4)
        s, causal, shift = rng.randint(1, before + after + 1), rng.random() < 0.3, rng.random() < 0.5
        if causal:
            m = n
        args = (n, m, before, after, d, s, causal, shift)
        start, stop = windows.axis_windows(*args)
        assert [windows.axis_window(p, *args) for p in range(n)] == \
            [(a, b, d) for a, b in zip(start.tolist(), stop.tolist())], args


# ----------------------------------------------------------------------------- the formulas by hand
def axis(n, e, m=None, **kw):
    """Per query of a 1-D axis (the w axis), the keys it sees (via the public nearby_mask)."""
    pad = {"causal": False, "after": 0, "dilation": 1, "stride": 1}
    kw = {k: x if k == "border" else (pad[k], pad[k], x) for k, x in kw.items()}
    mask = nearby_mask((1, 1, n), (1, 1, m or n), (0, 0, e), **kw)
    return [row.nonzero().flatten().tolist() for row in mask]


def test_pictures():
    assert axis(7, 1)[0] == [0, 1] and axis(7, 1, border="shift")[0] == [0, 1, 2]
    assert axis(7, 1, border="shift")[6] == [4, 5, 6] and axis(7, 1, border="shift")[3] == [2, 3, 4]
    dil = axis(8, 1, dilation=2)
    assert dil[3] == [1, 3, 5] and dil[0] == [0, 2] and axis(8, 1, dilation=2, border="shift")[0] == [0, 2, 4]
    assert axis(7, 1, stride=3) == [[0, 1, 2]] * 3 + [[3, 4, 5]] * 3 + [[5, 6]]
    caus = axis(6, 1, stride=2, border="shift", causal=True)
    assert caus[:4] == [[0], [0, 1], [1, 2], [1, 2, 3]]
    even = axis(7, 2, border="shift", after=1)                  # NATTEN kernel size 4
    assert even[0] == [0, 1, 2, 3] and even[3] == [1, 2, 3, 4] and even[6] == [3, 4, 5, 6]
    assert axis(4, 0, m=2, dilation=1) == [[0], [0], [1], [1]]  # cross: rescaled centres as before


# ----------------------------------------------------------------------------- defaults unchanged
PLAIN = TEST_PROBLEMS + [WORKLOADS["nuwa-image"], WORKLOADS["cross-sketch"]]


@pytest.mark.parametrize("p", PLAIN, ids=lambda p: p.id)
def test_defaults_bit_identical(p):
    old = old_mask(p)
    assert torch.equal(nearby_mask(p.q_grid, p.kv, p.extent, p.causal), old)
    assert torch.equal(nearby_mask(p.q_grid, p.kv, p.extent, (False,) * 3 if not p.causal else p.causal,
                                   dilation=(1, 1, 1), stride=1, border="clip"), old)
    # The v2 formulas themselves reduce to today's window with every option at its default.
    general = windows.visible_general(grid_coords(p.q_grid), grid_coords(p.kv), p.q_grid, p.kv,
                                      p.resolved_extent, p.causal)
    assert torch.equal(general, old)
    assert windows.count_general(p.q_grid, p.kv, p.resolved_extent, p.causal) == int(old.sum()) \
        == count_visible(p.q_grid, p.kv, p.resolved_extent, p.causal)


@pytest.mark.parametrize("backend", ["auto", "torch", "dense"])
def test_defaults_same_path(backend, gen):
    p = TEST_PROBLEMS[1]
    q, k, v = p.make(generator=gen)
    plain = nearby_attention(q, k, v, p.extent, p.causal, backend=backend)
    spelled = nearby_attention(q, k, v, p.extent, p.causal, backend=backend, dilation=(1, 1, 1), stride=1,
                               border="clip")
    assert torch.equal(plain, spelled)
    assert choose_backend(q, k, p.resolved_extent, p.causal)[0] == "torch"


# ----------------------------------------------------------------------------- backends and API
def test_auto_runs_torch_for_v2_options(gen, caplog):
    p = WINDOW_PROBLEMS[4]
    q, k, v = p.make(generator=gen)
    backend, why = choose_backend(q, k, p.resolved_extent, p.causal, **p.options)
    assert backend == "torch" and "stride=(3, 2, 1)" in why and "border='shift'" in why
    with caplog.at_level(logging.DEBUG, logger="nuwa3dna"):
        auto = nearby_attention(q, k, v, p.extent, p.causal, **p.options)
    assert any("backend='torch'" in r.getMessage() for r in caplog.records)
    assert torch.equal(auto, nearby_attention(q, k, v, p.extent, p.causal, backend="torch", **p.options))


@pytest.mark.parametrize("dtype,want", [(torch.float16, "triton"), (torch.float64, "torch")])
def test_auto_on_cuda_with_v2_options(dtype, want):
    """The Triton kernels take the options (their window-table path): auto sends CUDA tensors
    with them to Triton, float64 to the torch backend; the reason names the options."""
    fake = type("Fake", (), {"device": torch.device("cuda"), "dtype": dtype,
                             "shape": torch.Size((1, 3, 5, 7, 1, 8))})()
    backend, why = choose_backend(fake, fake, (1, 1, 1), False, dilation=(1, 2, 2))
    assert backend == want and "dilation=(1, 2, 2)" in why


def qkv(q_grid=(3, 5, 7), kv_grid=None):
    q = torch.randn(1, *q_grid, 1, 8)
    kv = torch.randn(1, *(kv_grid or q_grid), 1, 8)
    return q, kv, kv


BAD = {
    "dilation-zero": ({"dilation": 0}, ValueError, "dilation must be >= 1"),
    "dilation-float": ({"dilation": 1.5}, TypeError, "1.5"),
    "dilation-bool": ({"dilation": (1, True, 1)}, TypeError, "dilation[1]"),
    "stride-len": ({"stride": (1, 2)}, ValueError, "stride=(1, 2)"),
    "stride-str": ({"stride": "2"}, TypeError, "stride='2'"),
    "border": ({"border": "wrap"}, ValueError, "border='wrap'"),
    "dilation-whole-axis": ({"extent": (None, 1, 1), "dilation": (2, 1, 1)}, ValueError, "extent=(None, 1, 1)"),
    "stride-whole-axis": ({"extent": (1, None, 1), "stride": (1, 2, 1)}, ValueError, "stride=(1, 2, 1)"),
    "stride-too-big": ({"extent": 1, "stride": (1, 4, 1)}, ValueError, "4 > 3"),
    "causal-clip-stride": ({"extent": 1, "stride": (1, 3, 1), "causal": (False, True, False)}, ValueError,
                           "border='shift'"),
    "shift-too-big": ({"extent": (1, 1, 3), "dilation": (1, 1, 2), "border": "shift"}, ValueError,
                      "7 * 2 > 7"),
    "shift-whole-window": ({"extent": (1, 3, 1), "border": "shift"}, ValueError, "axis 'h': 7 * 1 > 5"),
    "causal-len": ({"causal": (True, False)}, ValueError, "causal=(True, False)"),
    "causal-int": ({"causal": (1, 0, 0)}, TypeError, "causal=(1, 0, 0)"),
}


@pytest.mark.parametrize("case", BAD, ids=str)
def test_bad_options_named(case):
    kwargs, exc, text = BAD[case]
    with pytest.raises(exc) as info:
        nearby_attention(*qkv(), **{"extent": 1, **kwargs})
    assert text in str(info.value), str(info.value)


def test_per_axis_causal_needs_equal_grids():
    with pytest.raises(ValueError, match=r"kv grid=\(3, 4, 7\)"):
        nearby_attention(*qkv(kv_grid=(3, 4, 7)), 1, causal=(True, False, False))
    out = nearby_attention(*qkv(kv_grid=(3, 4, 7)), 1, causal=(False, False, False))   # = causal=False
    assert out.shape == (1, 3, 5, 7, 1, 8)


def test_module_options(gen):
    x = torch.randn(2, 4, 5, 7, 16, generator=gen, dtype=torch.float64)
    context = torch.randn(2, 3, 9, 8, 12, generator=gen, dtype=torch.float64)
    for kw, ctx in [(dict(causal=(True, False, False), stride=(1, 2, 3), border="shift"), None),
                    (dict(dilation=(1, 2, 2), stride=(1, 1, 3), context_dim=12), context)]:
        attn = NearbyAttention3D(16, heads=2, dim_head=8, extent=(1, 1, 2), **kw).double()
        src = x if ctx is None else ctx
        q = attn.to_q(x).unflatten(-1, (2, 8))
        k, v = attn.to_kv(src).unflatten(-1, (2, 2, 8)).unbind(-3)
        opts = dict(dilation=attn.dilation, stride=attn.stride, border=attn.border)
        want = attn.to_out(dense_nearby_attention(q, k, v, (1, 1, 2), attn.causal, **opts).flatten(-2))
        torch.testing.assert_close(attn(x, ctx), want)
        assert "stride=" in repr(attn)
    with pytest.raises(ValueError, match="extent=\\(None, 1, 1\\)"):
        NearbyAttention3D(16, extent=(None, 1, 1), dilation=(2, 1, 1))
    with pytest.raises(ValueError, match="border='zero'"):
        NearbyAttention3D(16, border="zero")


def test_resolved_extent_caps_do_not_change_v2_windows():
    """Radii above the axis (capped by resolve_extent) see what the uncapped definition sees."""
    for opts in [dict(dilation=(1, 2, 3)), dict(stride=(1, 3, 5)), dict(causal=(True, True, False))]:
        mask = nearby_mask((3, 4, 5), (3, 4, 5), (9, 9, 9), **opts)
        assert torch.equal(mask, brute_force_mask((3, 4, 5), (3, 4, 5), (9, 9, 9), **opts))
        assert resolve_extent(9, (3, 4, 5)) == (2, 3, 4)
