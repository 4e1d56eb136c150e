"""The Triton backend beyond the window (issue 14, docs/design.md section 8): grouped kv heads
(GQA/MQA), the relative position bias and global tokens with ``return_lse``, alone and together,
on both kernel paths (plain closed-form windows and the table path of the v2 window options),
through the public API (``nearby_attention(..., backend="triton")``, ``NearbyAttention3D``)
against ``backend="dense"``: out, lse and every gradient (q, k, v, bias, additional keys and
values), under the Triton interpreter on CPU (compiled on a GPU where CUDA is available).

Tolerance as tests/test_triton.py (FlashAttention rule): err(triton vs dense float64) <=
2 * err(dense in the test dtype vs dense float64) + atol. The loss uses every output element
and the lse with random weights, so the lse's gradient (delta - dlse) is exercised everywhere.
Also: grouped heads equal the same call with k, v repeated (out, lse, dq bit for bit), a zero
bias changes nothing (bit for bit), the plain launch stays the plain kernels' (no bias, no
grouping flags), and ``backend="auto"`` on CUDA picks Triton for both.

Untested here: the compiled GPU kernels (kernels/report.py compiles the bias and grouped variants).
"""
import dataclasses
import math
from typing import Optional, Tuple

import pytest
import torch

from nuwa3dna import NearbyAttention3D, nearby_attention
from nuwa3dna.dispatch import choose_backend
from nuwa3dna.kernels.windows import bias_radius

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

from nuwa3dna.kernels.triton import configs, launch  # noqa: E402  (after the interpreter is on)

ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-3}


@dataclasses.dataclass(frozen=True)
class Case:
    B: int
    q_grid: Tuple[int, int, int]
    heads: int
    kv_heads: int
    D: int
    extent: tuple
    causal: object = False
    kv_grid: Optional[Tuple[int, int, int]] = None
    bias: bool = False
    n_global: int = 0
    options: tuple = ()             # (name, value) pairs of window options

    @property
    def id(self) -> str:
        g = lambda x: "x".join(map(str, x))
        c = self.causal if isinstance(self.causal, bool) else "".join("TF"[not x] for x in self.causal)
        parts = [f"B{self.B}", g(self.q_grid)] + ([f"kv{g(self.kv_grid)}"] if self.kv_grid else [])
        parts += [f"h{self.heads}k{self.kv_heads}", f"d{self.D}", "e" + "".join("a" if e is None else str(e)
                                                                               for e in self.extent), f"c{c}"]
        parts += (["bias"] if self.bias else []) + ([f"g{self.n_global}"] if self.n_global else [])
        return "-".join(parts + [f"{k}{v if isinstance(v, str) else g(v)}" for k, v in self.options])


PLAIN = [  # the closed-form kernels
    Case(2, (3, 5, 7), 4, 2, 16, (1, 2, 2)),                                        # GQA alone, batch 2
    Case(1, (3, 5, 7), 3, 1, 24, (1, 2, 2), causal=True),                           # MQA, causal
    Case(2, (4, 3, 5), 2, 2, 40, (1, 1, 2), bias=True),                             # bias alone, padded D
    Case(1, (3, 4, 6), 4, 2, 16, (2, 1, 1), causal=True, bias=True),                # both, causal
    Case(1, (2, 5, 4), 4, 1, 24, (1, 1, 1), bias=True, n_global=3),                 # all three
    Case(1, (3, 4, 5), 2, 1, 16, (1, 1, 2), kv_grid=(5, 7, 3), bias=True),          # cross grids
    Case(1, (2, 3, 4), 2, 2, 8, (2, 2, 3), bias=True, n_global=2),                  # R past the capped extent
    Case(1, (3, 3, 5), 4, 2, 16, (None, 1, 1), causal=True, n_global=4),            # whole frame axis, GQA
]
TABLES = [  # the table path (v2 window options)
    Case(1, (4, 5, 6), 4, 2, 16, (1, 1, 1), causal=True, bias=True,
         options=(("dilation", (1, 2, 1)), ("stride", (1, 1, 2)))),
    Case(1, (5, 4, 6), 2, 1, 16, (1, 1, 1), causal=(True, False, False), bias=True, options=(("border", "shift"),)),
    Case(1, (3, 4, 5), 4, 2, 24, (1, 1, 1), kv_grid=(5, 7, 9), bias=True, n_global=2,
         options=(("dilation", (1, 2, 2)),)),
    Case(1, (3, 7, 5), 2, 2, 40, (1, 2, 1), causal=(False, True, True), bias=True,
         options=(("stride", (1, 2, 1)),)),
    Case(1, (5, 6, 4), 3, 1, 8, (1, 1, 1), kv_grid=(3, 4, 3), bias=True, options=(("stride", (2, 2, 1)),)),
    Case(1, (6, 4, 11), 2, 1, 16, (1, 1, 2), n_global=3, options=(("dilation", (2, 1, 2)), ("border", "shift"))),
]
CASES = PLAIN + TABLES
# Interpreter time: the low-precision and small-tile runs take small problems.
LOWP = [(PLAIN[3], torch.float16), (PLAIN[4], torch.bfloat16), (TABLES[1], torch.bfloat16),
        (dataclasses.replace(TABLES[2], heads=2, kv_heads=1), torch.float16)]
SMALL = [dataclasses.replace(PLAIN[3], heads=2, kv_heads=1),
         dataclasses.replace(TABLES[0], q_grid=(3, 5, 6), heads=2, kv_heads=1)]


def _inputs(c: Case, dtype, gen):
    kv = c.kv_grid or c.q_grid
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)
    q, k, v = r(c.B, *c.q_grid, c.heads, c.D), r(c.B, *kv, c.kv_heads, c.D), r(c.B, *kv, c.kv_heads, c.D)
    extra = {}
    if c.bias:
        shift = dict(c.options).get("border") == "shift"
        extra["bias"] = r(c.heads, *(2 * bias_radius(e, None, shift) + 1 for e in c.extent))
    if c.n_global:
        extra["additional_keys"] = r(c.B, c.n_global, c.kv_heads, c.D)
        extra["additional_values"] = r(c.B, c.n_global, c.kv_heads, c.D)
    return [q, k, v], extra


def _run(c: Case, backend, xs, extra, dtype, gen_seed):
    """out, lse and the gradients of q, k, v and each extra tensor, of a loss using out and lse."""
    xs = [x.to(DEVICE, dtype).requires_grad_(True) for x in xs]
    extra = {n: x.to(DEVICE, dtype).requires_grad_(True) for n, x in extra.items()}
    out, lse = nearby_attention(*xs, c.extent, c.causal, backend=backend, return_lse=True,
                                **dict(c.options), **extra)
    g = torch.Generator().manual_seed(gen_seed)
    w = torch.randn(out.shape, generator=g).to(out)
    u = torch.randn(lse.shape, generator=g).to(lse)
    grads = torch.autograd.grad((out * w).sum() + (lse * u).sum(), xs + list(extra.values()))
    return [out, lse, *grads], ["out", "lse", "dq", "dk", "dv", *("d" + n for n in extra)]


def _check(c: Case, dtype, gen):
    xs, extra = _inputs(c, dtype, gen)
    ours, names = _run(c, "triton", xs, extra, dtype, 1)
    lowp, _ = _run(c, "dense", xs, extra, dtype, 1)
    exact, _ = _run(c, "dense", xs, extra, torch.float64, 1)
    for name, o, l, r in zip(names, ours, lowp, exact):
        assert o.shape == r.shape and o.dtype == l.dtype, name
        err, base = (o.double() - r).abs().max().item(), (l.double() - r).abs().max().item()
        assert err <= 2 * base + ATOL[dtype], f"{c.id} {dtype} {name}: {err=} {base=}"


@pytest.mark.parametrize("c", CASES, ids=lambda c: c.id)
def test_fp32_every_gradient(c, gen):
    _check(c, torch.float32, gen)


@pytest.mark.parametrize("c,dtype", LOWP, ids=[f"{c.id}-{str(d)[6:]}" for c, d in LOWP])
def test_low_precision(c, dtype, gen):
    _check(c, dtype, gen)


@pytest.mark.parametrize("c", SMALL, ids=lambda c: c.id)
def test_small_tiles(c, gen, small_tiles):
    """16-row tiles (conftest.SMALL_TILES): several query and key tiles per axis, so the bias
    index crosses tiles, the dK/dV programs walk their group's heads over many query tiles,
    and the causal skips run."""
    small_tiles()
    _check(c, torch.float32, gen)


def test_grouped_heads_equal_repeated_kv(gen):
    """Grouped heads read k, v in place: out, lse and dq equal the call with k, v repeated to
    every query head bit for bit (the same arithmetic per query head), and dk, dv are that
    call's gradients summed over each group."""
    c = Case(1, (3, 4, 5), 4, 2, 16, (1, 1, 2), causal=True)
    (q, k, v), _ = _inputs(c, torch.float32, gen)
    rep = lambda x: x.repeat_interleave(2, dim=4)
    grouped, _ = _run(c, "triton", [q, k, v], {}, torch.float32, 2)
    plain, _ = _run(c, "triton", [q, rep(k), rep(v)], {}, torch.float32, 2)
    for a, b in zip(grouped[:3], plain[:3]):
        assert torch.equal(a, b)
    for a, b in zip(grouped[3:5], plain[3:5]):
        torch.testing.assert_close(a, b.unflatten(4, (2, 2)).sum(5), rtol=1e-5, atol=1e-6)


def test_zero_bias_changes_nothing(gen, small_tiles):
    """A zero bias adds exact zeros: out and lse equal the call without one, bit for bit, on
    both paths. Tiles forced (conftest.SMALL_TILES): a bias otherwise gets its own, smaller
    walked tiles (configs.pick_configs), which changes the order of the softmax's sums."""
    small_tiles()
    for c in (Case(1, (3, 4, 5), 2, 2, 16, (1, 1, 2), causal=True),
              Case(1, (4, 5, 6), 2, 2, 16, (1, 1, 1), options=(("dilation", (1, 2, 1)), ("stride", (1, 1, 2))))):
        (q, k, v), _ = _inputs(c, torch.float32, gen)
        q, k, v = (x.float().to(DEVICE) for x in (q, k, v))
        zero = torch.zeros(2, *(2 * e + 1 for e in c.extent), device=DEVICE)
        run = lambda **kw: nearby_attention(q, k, v, c.extent, c.causal, backend="triton", return_lse=True,
                                            **dict(c.options), **kw)
        (o1, l1), (o2, l2) = run(bias=zero), run()
        assert torch.equal(o1, o2) and torch.equal(l1, l2)


def test_module_with_every_option(gen):
    """NearbyAttention3D(kv_heads, global_tokens, rel_pos_bias, backend="triton") with window
    options equals backend="dense" in output and every parameter's and input's gradient."""
    x = torch.randn(1, 3, 4, 5, 16, generator=gen).to(DEVICE)
    kw = dict(heads=4, dim_head=8, extent=(1, 1, 1), causal=True, kv_heads=2, global_tokens=2,
              rel_pos_bias=True, dilation=(1, 2, 1))
    torch.manual_seed(0)
    mods = [NearbyAttention3D(16, backend=b, **kw).to(DEVICE) for b in ("triton", "dense")]
    mods[1].load_state_dict(mods[0].state_dict())
    with torch.no_grad():       # a bias far from zero, so that its gradient is not tested at zero only
        for m in mods:
            m.rel_pos_bias.copy_(torch.randn(m.rel_pos_bias.shape, generator=torch.Generator().manual_seed(4)))
    res = []
    for m in mods:
        xi = x.clone().requires_grad_()
        y = m(xi)
        res.append([y, *torch.autograd.grad(y.square().sum(), [xi, *m.parameters()])])
    for a, b in zip(*res):
        assert (a - b).abs().max().item() <= 1e-5


def test_plain_launch_is_the_plain_kernel():
    """Without a bias and with k, v at q's heads the launchers pass no bias (a constexpr None)
    and both flags off: the compiled kernels are the ones of before (the AOT report compares
    the PTX); with them, the flags, the group and the bias's radii (from its shape: an
    extent capped at the axis leaves the bias its own R)."""
    q = torch.empty(2, 3, 5, 7, 4, 16, device="meta")
    kv = torch.empty(2, 3, 5, 7, 2, 16, device="meta")
    lse = torch.empty(launch.stats_shape(q), device="meta")
    _, grid, args, meta = launch.fwd_launch(q, q, q, q, lse, (1, 2, 2), False, 0.5)
    assert args[6] is None and meta["GROUPED"] is False and meta["HAS_BIAS"] is False
    bias = torch.empty(4, 5, 5, 5, device="meta")                      # R = 2 on every axis
    kernel, grid2, args, meta = launch.fwd_launch(q, kv, kv, q, lse, (1, 2, 2), False, 0.5, bias=bias)
    named = dict(zip(kernel.arg_names, args))
    assert named["BIAS"] is bias and meta["GROUPED"] is True and meta["HAS_BIAS"] is True
    assert [named[n] for n in ("n_heads", "group", "RT", "RH", "RW")] == [4, 2, 2, 2, 2]
    tile = configs.pick_configs((3, 5, 7), (3, 5, 7), (1, 2, 2), 16, torch.float32, 90, bias=True)["fwd"].q_tile
    assert grid2[0] == 2 * 4 * math.prod(-(-g // t) for g, t in zip((3, 5, 7), tile))   # the bias's own tiles
    (_, g_dkdv, _, _), = launch.dkdv_launches(q, kv, kv, q, lse, lse, kv, kv, (1, 2, 2), False, 0.5)
    (_, g_full, _, _), = launch.dkdv_launches(q, q, q, q, lse, lse, q, q, (1, 2, 2), False, 0.5)
    assert 2 * g_dkdv[0] == g_full[0]               # one program per (batch, kv head, key tile)


def test_auto_on_cuda_picks_triton_for_heads_and_bias():
    """auto sends CUDA tensors with grouped kv heads or a bias to Triton (float64 still to torch)."""
    shape = lambda h: torch.Size((1, 3, 5, 7, h, 8))
    fake = lambda h, dt=torch.bfloat16: type("FakeCuda", (), {"device": torch.device("cuda", 0), "dtype": dt,
                                                              "shape": shape(h)})()
    q = fake(4)
    assert choose_backend(q, fake(2), (1, 1, 1), False)[0] == "triton"
    assert choose_backend(q, q, (1, 1, 1), False, bias=object())[0] == "triton"
    assert choose_backend(q, fake(1), (1, 1, 1), False, dilation=2, bias=object())[0] == "triton"
    assert choose_backend(fake(4, torch.float64), fake(2, torch.float64), (1, 1, 1), False)[0] == "torch"
