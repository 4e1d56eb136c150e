"""Sampling: the KV cache reproduces the full forward pass step by step; given tokens are forced;
sampling with and without the cache agrees; top-k/top-p filters; the none condition's invariance."""
import pytest
import torch

from nuwa3dna.model.cache import window_index
from nuwa3dna.model.config import tiny_config
from nuwa3dna.model.nuwa import Nuwa
from nuwa3dna.model.sampling import filter_logits, incremental_logits, sample_tokens
from nuwa3dna.model.tasks import form, null_condition, random_formation
from nuwa3dna.reference import nearby_mask


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def nuwa():
    torch.manual_seed(0)
    return Nuwa(config=tiny_config(backend="torch")).eval()


@pytest.mark.parametrize("task", ["t2v", "s2v", "v2v", "i2i"])
def test_cached_steps_match_full_forward(nuwa, task, gen):
    """t2v: a causal video grid; s2v: rescaled cross windows (2x2 sketch -> 4x4); v2v / i2i: given tokens."""
    f, target = random_formation(task, nuwa.config, 2, gen)
    full = nuwa(f, target)
    inc = incremental_logits(nuwa, f, target)
    torch.testing.assert_close(inc, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("grid,extent", [((3, 4, 5), (1, 1, 2)), ((1, 5, 3), (0, 0, 0)),
                                         ((4, 2, 3), (3, 1, 2)), ((2, 3, 1), (1, 2, 0))])
def test_window_index_is_the_causal_mask_row(grid, extent):
    """The cache gathers exactly the keys of the dense reference's causal mask row (extents resolved)."""
    mask = nearby_mask(grid, grid, extent, causal=True)
    for p in range(grid[0] * grid[1] * grid[2]):
        assert window_index(p, grid, extent).tolist() == mask[p].nonzero().flatten().tolist()


@pytest.mark.parametrize("task", ["t2v", "v2v", "tv2v", "ti2i"])
def test_cache_and_recompute_sample_the_same_tokens(nuwa, task, gen):
    f, target = random_formation(task, nuwa.config, 2, gen)
    kw = dict(temperature=0.9, top_k=6, top_p=0.95, cond_scale=2.5)
    a = sample_tokens(nuwa, f, generator=torch.Generator().manual_seed(7), **kw)
    b = sample_tokens(nuwa, f, generator=torch.Generator().manual_seed(7), use_cache=False, **kw)
    assert torch.equal(a, b)
    m = f.given_mask.expand_as(a)
    assert torch.equal(a[m], target[m])                 # forced tokens copied (v2v: frame 0)
    c = sample_tokens(nuwa, f, generator=torch.Generator().manual_seed(8), **kw)
    assert not torch.equal(a, c)                         # another seed, other tokens
    g = sample_tokens(nuwa, f, temperature=0)            # greedy needs no generator
    assert torch.equal(g, sample_tokens(nuwa, f, temperature=0))


def test_none_condition_of_any_shape_is_the_unit_none_grid(nuwa, gen):
    """A NONE-filled condition grid (condition dropout) gives the same logits as the (1, 1, 1) none grid."""
    f, target = random_formation("s2v", nuwa.config, 1, gen)
    null = null_condition(f, nuwa.config)
    unit = form("v2v", nuwa.config, batch=1, given=target)
    unit = type(unit)("s2v", unit.text_ids, unit.vis_ids, f.out_grid, f.given, f.given_mask)
    assert null.vis_ids.shape != unit.vis_ids.shape
    torch.testing.assert_close(nuwa(null, target), nuwa(unit, target), rtol=1e-5, atol=1e-5)


def test_filter_logits():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0, -1.0]])
    k2 = filter_logits(logits, 2, None)
    assert torch.isfinite(k2).tolist() == [[False, True, False, True, False]]
    probs = torch.softmax(logits, -1)[0]                 # sorted: 3.0 (.64), 2.0 (.24), 1.0 (.09) ...
    p = filter_logits(logits, None, float(probs[1] + probs[3]) - 1e-4)
    assert torch.isfinite(p).tolist() == [[False, True, False, True, False]]
    top1 = filter_logits(logits, None, 0.01)             # the top token always survives
    assert torch.isfinite(top1).sum() == 1 and torch.isfinite(top1[0, 1])
    assert torch.equal(filter_logits(logits, None, 1.0), logits)


def test_sampling_argument_errors(nuwa, gen):
    f, _ = random_formation("t2i", nuwa.config, 1, gen)
    for kw, what in ((dict(temperature=-1.0), "temperature"), (dict(top_k=0), "top_k"),
                     (dict(top_p=0.0), "top_p"), (dict(cond_scale="2"), "cond_scale")):
        with pytest.raises(ValueError, match=what):
            sample_tokens(nuwa, f, **kw)
    with pytest.raises(TypeError, match="generator"):
        sample_tokens(nuwa, f, generator=0)


def test_classifier_free_guidance_mixes_cond_and_null(nuwa, gen):
    """Greedy guided sampling == a hand-written loop over full forward passes of the conditional and
    the null-condition formation with logits null + s * (cond - null)."""
    f, _ = random_formation("s2i", nuwa.config, 2, gen)
    null = null_condition(f, nuwa.config)
    s = 3.0
    got = sample_tokens(nuwa, f, temperature=0, cond_scale=s)
    tokens = torch.zeros_like(got).reshape(2, -1)
    with torch.no_grad():
        for p in range(tokens.shape[1]):
            grid = tokens.reshape(got.shape)
            cond, unc = nuwa(f, grid).reshape(2, -1, 16)[:, p], nuwa(null, grid).reshape(2, -1, 16)[:, p]
            tokens[:, p] = (unc + s * (cond - unc)).argmax(-1)
    assert torch.equal(got, tokens.reshape(got.shape))
    assert not torch.equal(got, sample_tokens(nuwa, f, temperature=0))     # guidance changed something
    # Conditionless tasks have nothing to guide: cond_scale is ignored.
    v, _ = random_formation("v2v", nuwa.config, 1, gen)
    assert torch.equal(sample_tokens(nuwa, v, temperature=0, cond_scale=5.0), sample_tokens(nuwa, v, temperature=0))


def test_cache_steps_must_come_in_order(nuwa, gen):
    from nuwa3dna.model.cache import DecoderCache
    f, _ = random_formation("t2i", nuwa.config, 1, gen)
    with torch.no_grad():
        cache = DecoderCache(nuwa, f, *nuwa.encode(f))
        x = torch.zeros(1, nuwa.config.dim)
        assert cache.step(x, 0).shape == (1, nuwa.config.vq_codebook_size)
        with pytest.raises(ValueError, match="expected position 1, got p=2"):
            cache.step(x, 2)
