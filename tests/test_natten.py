"""``nuwa3dna.natten`` (NATTEN 0.21's ``na1d/na2d/na3d``) and ``border="shift"``, against NATTEN
itself where it is installed (``pip install --no-deps --no-build-isolation natten==0.21.7``;
.ci/run does), and against the brute-force definition everywhere.

NATTEN on CPU runs its FlexAttention path, forward only, fp32; head dims powers of two.
"""
import random

import pytest
import torch

from nuwa3dna import brute_force_nearby_attention, nearby_attention
from nuwa3dna import natten as ours

FUNCS = {1: ours.na1d, 2: ours.na2d, 3: ours.na3d}


@pytest.fixture(autouse=True)
def _tiny(one_thread):
    """Tiny problems: one intra-op thread (conftest.one_thread)."""


@pytest.fixture
def natten_functional(monkeypatch):
    nf = pytest.importorskip("natten.functional", reason="NATTEN not installed: pip install --no-deps "
                             "--no-build-isolation natten==0.21.7 (CI does) runs the cross-check")
    import torch.nn.attention.flex_attention as flex
    # Without torch.compile, flex_attention still traces each new mask with Dynamo (1-3 s per
    # case on 2 cores); its debug switch runs the same unfused maths directly.
    monkeypatch.setattr(flex, "_FLEX_ATTENTION_DISABLE_COMPILE_DEBUG", True)
    return nf


def random_case(seed):
    """(na_dim, size, kernel_size, stride, dilation, is_causal, heads, head_dim): odd sizes,
    even kernels on every other case, strides and dilations within NATTEN's limits."""
    rng = random.Random(seed)
    na_dim = 1 + seed % 3
    while True:
        size = tuple(rng.choice([3, 5, 7, 9, 11, 6]) for _ in range(na_dim))
        kernel = tuple(rng.randint(2, n if rng.random() < 0.4 else max(2, n // 2)) for n in size)
        if seed % 2 == 0 and not any(k % 2 == 0 for k in kernel):
            continue
        dilation = tuple(rng.randint(1, n // k) for n, k in zip(size, kernel))
        stride = tuple(rng.randint(1, k) for k in kernel)
        causal = tuple(rng.random() < 0.35 for _ in range(na_dim))
        # NATTEN sends a window as large as the input to plain attention, which has no CPU backend.
        if kernel != size or (na_dim > 1 and any(causal)):
            return na_dim, size, kernel, stride, dilation, causal, rng.choice([1, 2]), rng.choice([8, 16, 32])


CASES = [random_case(s) for s in range(48)]


def case_id(c):
    na_dim, size, kernel, stride, dilation, causal = c[:6]
    return f"{na_dim}d-n{size}-k{kernel}-s{stride}-d{dilation}-c{''.join('TF'[not x] for x in causal)}"


def make(size, heads, head_dim, seed, kv_size=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, *size, heads, head_dim, generator=g)
    k, v = (torch.randn(1, *(kv_size or size), heads, head_dim, generator=g) for _ in range(2))
    return q, k, v


@pytest.mark.filterwarnings("ignore:.*flex_attention called without torch.compile", "ignore:return_lse is deprecated")
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_natten(case, natten_functional):
    na_dim, size, kernel, stride, dilation, causal, heads, head_dim = case
    q, k, v = make(size, heads, head_dim, CASES.index(case))
    kw = dict(kernel_size=kernel, stride=stride, dilation=dilation, is_causal=causal)
    want = getattr(natten_functional, f"na{na_dim}d")(q, k, v, **kw)
    got = FUNCS[na_dim](q, k, v, **kw)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert (got - want).abs().max().item() <= 1e-4


@pytest.mark.filterwarnings("ignore:.*flex_attention called without torch.compile", "ignore:return_lse is deprecated")
@pytest.mark.parametrize("seed", range(6))
def test_shift_border_is_natten_na3d(seed, natten_functional):
    """nearby_attention(..., border="shift") with odd kernels K = 2e + 1 is NATTEN's na3d."""
    rng = random.Random(100 + seed)
    size = tuple(rng.choice([3, 5, 7, 9]) for _ in range(3))
    extent = tuple(rng.randint(0, (n - 1) // 2) for n in size)
    kernel = tuple(2 * e + 1 for e in extent)
    if min(kernel) < 2:                                   # NATTEN wants kernel sizes >= 2
        kernel = tuple(max(3, k) for k in kernel)
        extent = tuple(k // 2 for k in kernel)
    dilation = tuple(rng.randint(1, n // k) for n, k in zip(size, kernel))
    stride = tuple(rng.randint(1, k) for k in kernel)
    causal = tuple(rng.random() < 0.3 for _ in range(3))
    q, k, v = make(size, 2, 16, seed)
    want = natten_functional.na3d(q, k, v, kernel, stride=stride, dilation=dilation, is_causal=causal)
    got = nearby_attention(q, k, v, extent, causal if any(causal) else False, backend="dense",
                           dilation=dilation, stride=stride, border="shift")
    assert (got - want).abs().max().item() <= 1e-4


@pytest.mark.filterwarnings("ignore:.*flex_attention called without torch.compile", "ignore:return_lse is deprecated")
@pytest.mark.parametrize("seed", range(4))
def test_additional_keys_and_lse_match_natten(seed, natten_functional):
    """Global keys in the window's softmax and the log-sum-exp, as NATTEN's na3d returns them:
    through ``nuwa3dna.natten.na3d`` (auto) and ``nearby_attention(backend="torch", border="shift")``."""
    rng = random.Random(200 + seed)
    size = tuple(rng.choice([3, 5, 7]) for _ in range(3))
    extent = tuple(rng.randint(1, (n - 1) // 2) for n in size)
    kernel = tuple(2 * e + 1 for e in extent)
    q, k, v = make(size, 2, 16, seed)
    g = torch.Generator().manual_seed(seed)
    n_extra = rng.choice([1, 4, 7])
    ak, av = (torch.randn(1, n_extra, 2, 16, generator=g) for _ in range(2))
    want, want_lse = natten_functional.na3d(q, k, v, kernel, additional_keys=ak, additional_values=av,
                                            return_lse=True)
    for got, got_lse in (ours.na3d(q, k, v, kernel, additional_keys=ak, additional_values=av, return_lse=True),
                         nearby_attention(q, k, v, extent, backend="torch", border="shift", additional_keys=ak,
                                          additional_values=av, return_lse=True)):
        assert got_lse.shape == want_lse.shape
        assert (got - want).abs().max().item() <= 1e-4
        assert (got_lse - want_lse).abs().max().item() <= 1e-4


@pytest.mark.parametrize("kw", [dict(kernel_size=(5, 3), dilation=(2, 1)), dict(kernel_size=3, stride=4)])
def test_errors_match_natten_kind(kw, natten_functional):
    q = torch.randn(1, 7, 7, 1, 8)
    with pytest.raises(ValueError):
        natten_functional.na2d(q, q, q, **kw)
    with pytest.raises(ValueError, match="kernel_size"):
        ours.na2d(q, q, q, **kw)


# ----------------------------------------------------------------------------- without NATTEN
@pytest.mark.parametrize("case", CASES[:12], ids=case_id)
def test_layer_is_the_definition(case):
    """Even kernels (K // 2 keys before the leader, K // 2 - 1 after) against brute force."""
    na_dim, size, kernel, stride, dilation, causal, heads, head_dim = case
    q, k, v = make(size, heads, head_dim, 0)
    got = FUNCS[na_dim](q.double(), k.double(), v.double(), kernel, stride, dilation, causal)
    pad = 3 - na_dim
    lift = lambda x: x.double().reshape(1, *(1,) * pad, *x.shape[1:])
    pad3 = lambda x, fill: (fill,) * pad + tuple(x)
    ref = brute_force_nearby_attention(
        lift(q), lift(k), lift(v), pad3([n // 2 for n in kernel], 0),
        pad3(causal, False) if any(causal) else False, dilation=pad3(dilation, 1), stride=pad3(stride, 1),
        border="shift", after=pad3([n // 2 - (n % 2 == 0) for n in kernel], 0))
    torch.testing.assert_close(got, ref.reshape(got.shape), rtol=1e-10, atol=1e-12)


def test_layer_refusals_and_backward():
    q = torch.randn(2, 6, 7, 2, 16, requires_grad=True)
    with pytest.raises(ValueError, match="additional_keys and additional_values go together"):
        ours.na2d(q, q, q, 3, additional_keys=q[:, 0])
    with pytest.raises(ValueError, match="na3d takes"):
        ours.na3d(q, q, q, 3)
    with pytest.raises(ValueError, match="is_causal"):
        ours.na2d(q, q, q, 3, is_causal=(True,))
    ours.na2d(q, q, q, (3, 4), stride=(2, 1), is_causal=(True, False)).square().sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()          # a CPU backward, beyond NATTEN
