"""The model's operator-v2 options (docs/design.md section 8): grouped kv heads (MQA) in every
attention and the KV cache, and the decoder's text cross-attention folded into its self-attention
as global tokens. The cache must reproduce the full forward with each, and MQA must shrink it."""
import pytest
import torch

from nuwa3dna.model.cache import DecoderCache
from nuwa3dna.model.config import tiny_config
from nuwa3dna.model.nuwa import Nuwa
from nuwa3dna.model.sampling import incremental_logits
from nuwa3dna.model.tasks import random_formation

pytestmark = pytest.mark.usefixtures("one_thread")

OPTIONS = {"mqa": dict(kv_heads=1), "text-global": dict(text_global=True),
           "both": dict(kv_heads=1, text_global=True)}


@pytest.mark.parametrize("name", list(OPTIONS))
@pytest.mark.parametrize("task", ["t2v", "s2v", "i2i"])
def test_cached_steps_match_full_forward(name, task, gen):
    torch.manual_seed(0)
    nuwa = Nuwa(config=tiny_config(backend="torch", **OPTIONS[name])).eval()
    f, target = random_formation(task, nuwa.config, 2, gen)
    full = nuwa(f, target)
    torch.testing.assert_close(incremental_logits(nuwa, f, target), full, rtol=1e-5, atol=1e-5)


def test_text_global_is_one_softmax_and_uses_the_text(gen):
    """No text cross-attention layer is built; changing the caption changes the logits."""
    torch.manual_seed(0)
    nuwa = Nuwa(config=tiny_config(backend="torch", text_global=True)).eval()
    assert not any(hasattr(layer, "cross_text") for layer in nuwa.layers)
    f, target = random_formation("t2v", nuwa.config, 2, gen)
    other = f.__class__(**{**f.__dict__, "text_ids": f.text_ids.roll(1, dims=0)})
    assert not torch.allclose(nuwa(f, target), nuwa(other, target))


def test_mqa_shrinks_the_cache_and_the_projections(gen):
    torch.manual_seed(0)
    cfg = tiny_config(backend="torch")
    caches = {}
    for kv in (None, 1):
        nuwa = Nuwa(config=tiny_config(backend="torch", kv_heads=kv)).eval()
        f, _ = random_formation("t2v", nuwa.config, 2, gen)
        text_mem, vis_mem = nuwa.encode(f)
        cache = DecoderCache(nuwa, f, text_mem, vis_mem)
        caches[kv] = sum(x.numel() for x in cache.k + cache.v)
        assert nuwa.layers[0].self_attn.to_kv.out_features == 2 * (kv or cfg.heads) * cfg.dim_head
    assert caches[1] * cfg.heads == caches[None]


def test_config_refuses_bad_options():
    with pytest.raises(ValueError, match="kv_heads must be None or a positive divisor"):
        tiny_config(kv_heads=3)
    with pytest.raises(ValueError, match="text_global must be a bool"):
        tiny_config(text_global=1)


def test_rotary_with_grouped_heads_keeps_scores_relative(gen):
    """A key shared by a group of query heads is rotated once: the group's query heads use its
    frequencies, so every query head's score still depends on the offset only."""
    from nuwa3dna import NearbyAttention3D
    m = NearbyAttention3D(16, heads=4, dim_head=8, kv_heads=2, rotary=True).double()
    assert m.rotary_freqs.shape == (2, 4, 3)
    with torch.no_grad():
        m.rotary_freqs.normal_()
    q = torch.randn(4, 8, generator=gen, dtype=torch.float64)
    k = torch.randn(2, 8, generator=gen, dtype=torch.float64)
    a, b, shift = (torch.tensor(v, dtype=torch.float64) for v in ((1., 2., 3.), (0., 4., 1.), (5., -2., 7.)))
    score = lambda pa, pb: (m.rotate(q, pa) * m.rotate(k, pb).repeat_interleave(2, dim=0)).sum(-1)
    torch.testing.assert_close(score(a, b), score(a + shift, b + shift))
    assert not torch.allclose(score(a, b), (q * k.repeat_interleave(2, dim=0)).sum(-1))
