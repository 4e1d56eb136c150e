"""Beyond the window (docs/design.md section 8): grouped kv heads, global tokens, relative position
bias, ``return_lse`` and ``merge_attentions``, through the public API.

Chain of trust: brute force (the definition, one query at a time) -> dense (``backend="dense"``)
-> each backend. The CPU backend's own bias/GQA tests live in tests/test_cpu_heads_bias.py.
"""
import math
import random

import pytest
import torch

from nuwa3dna import NearbyAttention3D, brute_force_nearby_attention, merge_attentions, nearby_attention
from nuwa3dna.kernels.windows import bias_radius
from nuwa3dna.merge import global_attention


@pytest.fixture(autouse=True)
def _tiny(one_thread):
    """Tiny problems: one intra-op thread (conftest.one_thread)."""


def random_problem(seed):
    """A random odd problem with window options: (q_grid, kv_grid, heads, kv_heads, D, extent,
    causal, options). Cross grids never causal; shift windows fit their axes."""
    rng = random.Random(seed)
    while True:
        q_grid = tuple(rng.choice([1, 2, 3, 4, 5, 7]) for _ in range(3))
        cross = rng.random() < 0.3
        kv_grid = tuple(rng.choice([2, 3, 5, 6]) for _ in range(3)) if cross else q_grid
        extent = tuple(rng.randint(0, 2) for _ in range(3))
        border = rng.choice(["clip", "shift"])
        dilation = tuple(rng.choice([1, 1, 2]) for _ in range(3))
        stride = tuple(rng.randint(1, e + 1) for e in extent)
        causal = False if cross else rng.choice([False, True, (True, False, False), (False, True, True)])
        if border == "shift" and any((2 * e + 1) * d > m for e, d, m in zip(extent, dilation, kv_grid)):
            continue
        if isinstance(causal, tuple) and border == "clip":
            stride = tuple(min(s, e + 1) for s, e in zip(stride, extent))
        heads = rng.choice([2, 4, 6])
        kv_heads = rng.choice([h for h in (1, 2, 3, 6) if heads % h == 0])
        return q_grid, kv_grid, heads, kv_heads, rng.choice([8, 12]), extent, causal, dict(
            dilation=dilation, stride=stride, border=border)


PROBLEMS = [random_problem(s) for s in range(16)]


def pid(p):
    q_grid, kv_grid, heads, kv_heads, D, extent, causal, o = p
    c = causal if isinstance(causal, bool) else "".join("TF"[not x] for x in causal)
    return (f"q{'x'.join(map(str, q_grid))}-kv{'x'.join(map(str, kv_grid))}-h{heads}k{kv_heads}-d{D}"
            f"-e{''.join(map(str, extent))}-c{c}-dil{''.join(map(str, o['dilation']))}"
            f"-s{''.join(map(str, o['stride']))}-{o['border']}")


def make(p, gen, dtype=torch.float64, B=2, n_global=3, grad=False):
    q_grid, kv_grid, heads, kv_heads, D, extent, causal, o = p
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).to(dtype).requires_grad_(grad)
    q, k, v = r(B, *q_grid, heads, D), r(B, *kv_grid, kv_heads, D), r(B, *kv_grid, kv_heads, D)
    ak, av = r(B, n_global, kv_heads, D), r(B, n_global, kv_heads, D)
    shape = (heads,) + tuple(2 * bias_radius(e, None, o["border"] == "shift") + 1 for e in extent)
    bias = r(*shape)
    return q, k, v, ak, av, bias


@pytest.mark.parametrize("p", PROBLEMS, ids=pid)
def test_dense_is_the_definition(p, gen):
    """Dense (mask + SDPA, bias gathered by ``windows.axis_offsets``) against brute force, which
    derives each key's offset from the definition: every option together, and lse."""
    q, k, v, ak, av, bias = make(p, gen)
    extent, causal, o = p[5], p[6], p[7]
    for extra in (dict(bias=bias), dict(additional_keys=ak, additional_values=av),
                  dict(bias=bias, additional_keys=ak, additional_values=av)):
        got, got_lse = nearby_attention(q, k, v, extent, causal, backend="dense", return_lse=True, **o, **extra)
        want, want_lse = brute_force_nearby_attention(q, k, v, extent, causal, return_lse=True, **o, **extra)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got_lse, want_lse, rtol=1e-10, atol=1e-12)


def _loss(out, lse, gen):
    """A loss that uses every output element and the lse, with random weights."""
    w = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.dtype)
    u = torch.randn(lse.shape, generator=gen, dtype=torch.float64).to(lse.dtype)
    return (out * w).sum() + (lse * u).sum()


def _grads(backend, q, k, v, extent, causal, o, gen_seed, **extra):
    xs = [q, k, v] + [x for x in extra.values() if isinstance(x, torch.Tensor)]
    out, lse = nearby_attention(q, k, v, extent, causal, backend=backend, return_lse=True, **o, **extra)
    grads = torch.autograd.grad(_loss(out, lse, torch.Generator().manual_seed(gen_seed)), xs)
    return [out, lse, *grads]


@pytest.mark.parametrize("p", [p for p in PROBLEMS if p[2] == p[3]][:6], ids=pid)
def test_torch_global_tokens_and_lse(p, gen, strategy):
    """The CPU backend with global tokens and a used lse: output, lse and the gradients of q, k, v
    and both global tensors against dense, both CPU strategies (the lse's gradient enters the
    backward as delta - dlse)."""
    q, k, v, ak, av, _ = make(p, gen, torch.float32, grad=True)
    extent, causal, o = p[5], p[6], p[7]
    got = _grads("torch", q, k, v, extent, causal, o, 1, additional_keys=ak, additional_values=av)
    want = _grads("dense", q, k, v, extent, causal, o, 1, additional_keys=ak, additional_values=av)
    for name, a, b in zip(["out", "lse", "dq", "dk", "dv", "dak", "dav"], got, want):
        torch.testing.assert_close(a, b, rtol=2e-4, atol=2e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("p", PROBLEMS, ids=pid)
def test_torch_every_option_together(p, gen):
    """The CPU backend with grouped kv heads, a bias and global tokens on the random problems,
    whose extents often pass their axis length (the backend gets them capped; the bias keeps
    the user's R): out, lse and every gradient against dense, float64."""
    q, k, v, ak, av, bias = make(p, gen, grad=True)
    extent, causal, o = p[5], p[6], p[7]
    extra = dict(bias=bias, additional_keys=ak, additional_values=av)
    got = _grads("torch", q, k, v, extent, causal, o, 3, **extra)
    want = _grads("dense", q, k, v, extent, causal, o, 3, **extra)
    for name, a, b in zip(["out", "lse", "dq", "dk", "dv", "dbias", "dak", "dav"], got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=lambda m: f"{name}: {m}")


def test_torch_gradcheck_global_tokens_and_lse(gen):
    q_grid, extent = (2, 3, 4), (1, 1, 1)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64, requires_grad=True)
    q, k, v = r(1, *q_grid, 2, 4), r(1, *q_grid, 2, 4), r(1, *q_grid, 2, 4)
    ak, av = r(1, 2, 2, 4), r(1, 2, 2, 4)

    def f(q, k, v, ak, av):
        out, lse = nearby_attention(q, k, v, extent, True, backend="torch", additional_keys=ak,
                                    additional_values=av, return_lse=True)
        return out, lse
    assert torch.autograd.gradcheck(f, (q, k, v, ak, av))


def test_triton_global_tokens_and_lse(gen):
    """The Triton kernels (interpreter on CPU) with a used lse and global tokens, plain windows."""
    p = ((3, 4, 5), (3, 4, 5), 2, 2, 16, (1, 1, 2), True, dict(dilation=1, stride=1, border="clip"))
    q, k, v, ak, av, _ = make(p, gen, torch.float32, grad=True)
    extent, causal = p[5], p[6]
    got = _grads("triton", q, k, v, extent, causal, {}, 2, additional_keys=ak, additional_values=av)
    want = _grads("dense", q, k, v, extent, causal, {}, 2, additional_keys=ak, additional_values=av)
    for name, a, b in zip(["out", "lse", "dq", "dk", "dv", "dak", "dav"], got, want):
        torch.testing.assert_close(a, b, rtol=2e-4, atol=2e-5, msg=lambda m: f"{name}: {m}")


# ----------------------------------------------------------------------------- merge_attentions
def test_merge_is_attention_over_the_union(gen):
    """Attention over keys split into two random disjoint sets, merged, equals attention over all."""
    B, N, H, D, M = 2, 7, 3, 8, 11
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64, requires_grad=True)
    q, k, v = r(B, 1, 1, N, H, D), r(B, M, H, D), r(B, M, H, D)
    first = torch.randperm(M, generator=gen)[:4]
    rest = torch.tensor([i for i in range(M) if i not in set(first.tolist())])
    scale = D ** -0.5
    out, lse = merge_attentions([global_attention(q, k[:, first], v[:, first], scale),
                                 global_attention(q, k[:, rest], v[:, rest], scale)])
    s = torch.einsum("bnhd,bmhd->bnhm", q[:, 0, 0], k) * scale
    want = torch.einsum("bnhm,bmhd->bnhd", s.softmax(-1), v)
    torch.testing.assert_close(out[:, 0, 0], want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse[:, 0, 0], s.logsumexp(-1), rtol=1e-12, atol=1e-12)
    parts = lambda a, b, c: merge_attentions([global_attention(a, b[:, first], c[:, first], scale),
                                              global_attention(a, b[:, rest], c[:, rest], scale)])
    assert torch.autograd.gradcheck(parts, (q, k, v))


def test_merge_part_that_saw_nothing(gen):
    """A part with lse = -inf (no key) has weight 0: the other part comes out unchanged, no NaN."""
    out = torch.randn(2, 3, 4, generator=gen)
    lse = torch.randn(2, 3, generator=gen)
    empty = (torch.full_like(out, float("nan")), torch.full_like(lse, float("-inf")))
    got, got_lse = merge_attentions([(out, lse), (torch.zeros_like(out), torch.full_like(lse, float("-inf")))])
    torch.testing.assert_close(got, out)
    torch.testing.assert_close(got_lse, lse)
    assert torch.isnan(merge_attentions([(out, lse), empty])[0]).any()     # NaN values still poison


def test_merge_refusals():
    with pytest.raises(ValueError, match="non-empty list"):
        merge_attentions([])
    with pytest.raises(TypeError, match=r"parts\[1\]"):
        merge_attentions([(torch.zeros(2, 3), torch.zeros(2)), torch.zeros(2, 3)])
    with pytest.raises(ValueError, match="lse must be out.shape"):
        merge_attentions([(torch.zeros(2, 3), torch.zeros(3))])


# ----------------------------------------------------------------------------- boundary
def test_errors_name_the_bad_value():
    q = torch.randn(1, 2, 3, 4, 4, 8)
    k3 = torch.randn(1, 2, 3, 4, 3, 8)
    with pytest.raises(ValueError, match="multiple of k's"):
        nearby_attention(q, k3, k3, 1)
    with pytest.raises(ValueError, match="go together"):
        nearby_attention(q, q, q, 1, additional_keys=torch.randn(1, 2, 4, 8))
    with pytest.raises(ValueError, match=r"additional_keys must have shape \(B=1, N >= 1, kv heads=4, D=8\)"):
        nearby_attention(q, q, q, 1, additional_keys=torch.randn(1, 2, 2, 8), additional_values=torch.randn(1, 2, 2, 8))
    with pytest.raises(ValueError, match=r"bias must have shape .* = \(4, 3, 3, 5\)"):
        nearby_attention(q, q, q, (1, 1, 2), bias=torch.zeros(4, 3, 3, 3))
    with pytest.raises(ValueError, match=r"\(4, 1, 5, 5\)"):
        nearby_attention(q, q, q, (0, 1, 1), border="shift", bias=torch.zeros(4, 1, 3, 3))
    with pytest.raises(ValueError, match="finite extent"):
        nearby_attention(q, q, q, (1, None, 1), bias=torch.zeros(4, 3, 3, 3))
    with pytest.raises(TypeError, match="floating-point"):
        nearby_attention(q, q, q, 1, bias=torch.zeros(4, 3, 3, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="return_lse must be a bool"):
        nearby_attention(q, q, q, 1, return_lse=1)


def test_compile_fullgraph_global_tokens_and_lse(gen):
    p = ((2, 3, 5), (2, 3, 5), 2, 2, 8, (1, 1, 1), True, dict(border="clip"))
    q, k, v, ak, av, _ = make(p, gen, torch.float32)

    def f(q, k, v, ak, av):
        return nearby_attention(q, k, v, (1, 1, 1), True, backend="torch", additional_keys=ak,
                                additional_values=av, return_lse=True)
    got = torch.compile(f, fullgraph=True, backend="eager")(q, k, v, ak, av)
    want = f(q, k, v, ak, av)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])


# ----------------------------------------------------------------------------- the module
def test_module_options(gen):
    """kv_heads, learned and per-call global tokens and a learned bias: the module equals the
    functional call with its own projections, and every new parameter gets a gradient."""
    torch.manual_seed(0)
    m = NearbyAttention3D(24, heads=4, dim_head=8, extent=(1, 1, 2), causal=True, kv_heads=2, global_tokens=3,
                          rel_pos_bias=True, backend="dense").double()
    assert m.to_kv.out_features == 2 * 2 * 8 and m.rel_pos_bias.shape == (4, 3, 3, 5)
    with torch.no_grad():
        m.rel_pos_bias.normal_()
    x = torch.randn(2, 3, 4, 5, 24, generator=gen, dtype=torch.float64)
    ctx = torch.randn(2, 2, 24, generator=gen, dtype=torch.float64)
    y = m(x, global_context=ctx)
    q = m.to_q(x).unflatten(-1, (4, 8))
    k, v = m.to_kv(x).unflatten(-1, (2, 2, 8)).unbind(-3)
    g = m.to_kv(torch.cat([m.global_tokens.expand(2, -1, -1), ctx], 1)).unflatten(-1, (2, 2, 8))
    want = nearby_attention(q, k, v, (1, 1, 2), True, backend="dense", additional_keys=g[:, :, 0],
                            additional_values=g[:, :, 1], bias=m.rel_pos_bias)
    torch.testing.assert_close(y, m.to_out(want.flatten(-2)))
    y.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in (m.rel_pos_bias, m.global_tokens))
    assert "kv_heads=2, global_tokens=3, rel_pos_bias=True" in repr(m)
    with pytest.raises(ValueError, match="kv_heads must be a positive divisor"):
        NearbyAttention3D(24, heads=4, kv_heads=3)
    with pytest.raises(ValueError, match="finite extent"):
        NearbyAttention3D(24, heads=4, extent=(1, None, 1), rel_pos_bias=True)
    with pytest.raises(ValueError, match="global_context must have shape"):
        m(x, global_context=ctx[0])
    with pytest.raises(ValueError, match="bias must have shape"):
        m(x, extent=(1, 1, 1))          # a per-call extent must keep the bias's shape


def test_gqa_costs_no_kv_copies(gen):
    """Grouped kv heads are not repeated at the API: the global part reads k through a view."""
    q = torch.randn(1, 2, 3, 4, 6, 8, generator=gen)
    ak = torch.randn(1, 5, 2, 8, generator=gen)
    out, lse = global_attention(q, ak, ak, 8 ** -0.5)
    s = torch.einsum("bthwgd,bngd->bthwgn", q, ak.repeat_interleave(3, dim=2)) * 8 ** -0.5
    torch.testing.assert_close(lse, s.logsumexp(-1))
    assert math.isfinite(out.sum().item())
