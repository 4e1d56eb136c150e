"""3D rotary positions: scores depend on relative offsets only, zero frequencies are the identity,
the module's rotary self-attention agrees across backends and passes fp64 gradcheck (frequencies
included), the KV cache rotates its steps like the full forward, and the errors."""
import pytest
import torch

from nuwa3dna import NearbyAttention3D
from nuwa3dna.model.config import tiny_config
from nuwa3dna.model.nuwa import Nuwa
from nuwa3dna.model.sampling import incremental_logits
from nuwa3dna.model.tasks import random_formation
from nuwa3dna.rotary import grid_positions, init_freqs, rotate


pytestmark = pytest.mark.usefixtures("one_thread")


def test_scores_depend_on_the_offset_only(gen):
    heads, D = 3, 10
    freqs = torch.randn(heads, D // 2, 3, generator=gen)
    q, k = torch.randn(2, heads, D, generator=gen, dtype=torch.float64).unbind(0)
    a, b, shift = (torch.tensor(v, dtype=torch.float64) for v in ((1., 2., 3.), (0., 4., 1.), (5., -2., 7.)))
    s1 = (rotate(q, freqs, a) * rotate(k, freqs, b)).sum(-1)
    s2 = (rotate(q, freqs, a + shift) * rotate(k, freqs, b + shift)).sum(-1)
    torch.testing.assert_close(s1, s2)
    assert not torch.allclose(s1, (q * k).sum(-1))                   # the offset does change the score
    torch.testing.assert_close(rotate(q, freqs, a).norm(dim=-1), q.norm(dim=-1))
    torch.testing.assert_close(rotate(q, torch.zeros_like(freqs), a), q)


def test_init_is_axial_and_bounded():
    f = init_freqs(2, 32)
    assert f.shape == (2, 16, 3)
    assert ((f != 0).sum(-1) == 1).all()                               # one axis per pair
    assert f.max() == pytest.approx(torch.pi / 2) and f[f > 0].min() == pytest.approx(torch.pi / 32)
    assert grid_positions((2, 3, 4))[1, 2, 3].tolist() == [1.0, 2.0, 3.0]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_module_backends_agree_and_gradcheck(causal, gen):
    torch.manual_seed(0)
    m = NearbyAttention3D(12, heads=2, dim_head=7, extent=(1, 1, 2), causal=causal, backend="dense",
                          rotary=True).double()
    x = torch.randn(2, 3, 4, 5, 12, generator=gen, dtype=torch.float64, requires_grad=True)
    ref = m(x)
    m.backend = "torch"
    torch.testing.assert_close(m(x), ref)
    xs = torch.randn(1, 2, 3, 3, 12, generator=gen, dtype=torch.float64, requires_grad=True)
    fn = lambda x, f: torch.func.functional_call(m, {"rotary_freqs": f}, (x,))
    freqs = m.rotary_freqs.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(fn, (xs, freqs))
    m.rotary_freqs.data.zero_()                                        # zero frequencies: plain 3DNA
    plain = NearbyAttention3D(12, heads=2, dim_head=7, extent=(1, 1, 2), causal=causal, backend="torch").double()
    plain.load_state_dict({k: v for k, v in m.state_dict().items() if k != "rotary_freqs"})
    torch.testing.assert_close(m(x), plain(x))


def test_rotary_errors():
    with pytest.raises(ValueError, match="rotary=True with context_dim=8"):
        NearbyAttention3D(16, heads=2, dim_head=8, context_dim=8, rotary=True)
    with pytest.raises(TypeError, match="rotary=1"):
        NearbyAttention3D(16, heads=2, dim_head=8, rotary=1)
    m = NearbyAttention3D(16, heads=2, dim_head=8, rotary=True)
    with pytest.raises(ValueError, match="self-attention only"):
        m(torch.randn(1, 1, 2, 2, 16), torch.randn(1, 1, 2, 2, 16))
    with pytest.raises(ValueError, match="rotary"):
        tiny_config(rotary="yes")


@pytest.mark.parametrize("task,rotary", [("t2v", True), ("v2v", True), ("s2i", True), ("t2v", False)])
def test_nuwa_cache_matches_full_forward_and_dense(task, rotary, gen):
    torch.manual_seed(0)
    nuwa = Nuwa(config=tiny_config(backend="torch", rotary=rotary)).eval()
    for layer in nuwa.layers if rotary else ():                        # random, mixed-axis frequencies
        layer.self_attn.rotary_freqs.data.normal_(generator=gen)
    f, target = random_formation(task, nuwa.config, 2, gen)
    full = nuwa(f, target)
    torch.testing.assert_close(incremental_logits(nuwa, f, target), full, rtol=1e-5, atol=1e-5)
    dense = Nuwa(config=tiny_config(backend="dense", rotary=rotary)).eval()
    dense.load_state_dict(nuwa.state_dict())
    torch.testing.assert_close(dense(f, target), full, rtol=1e-5, atol=1e-5)
