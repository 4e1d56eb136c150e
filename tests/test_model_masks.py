"""What a task hides stays hidden (model/masks.py): i2i user masks, v2v given frames, no leak."""
import numpy as np
import pytest
import torch

from nuwa3dna.model.config import tiny_config
from nuwa3dna.model.masks import blank, default_hidden, pixels_of, random_layout, token_hidden
from nuwa3dna.model.pipeline import NuwaPipeline

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    return NuwaPipeline(config=tiny_config()).eval()


def _gen(pipe, task, **kw):
    return pipe.generate(task, **kw, num_samples=2, temperature=1.0, seed=5, progress=False)


def test_token_mask_covers_the_pixel_mask(gen):
    c = tiny_config()                       # 16 px, 4x4 tokens of 4x4 px
    m = torch.zeros(16, 16)
    m[5, 9] = 0.7                           # one pixel in token (1, 2)
    hid = token_hidden(m, c)
    assert hid.sum() == 1 and bool(hid[1, 2])
    r = torch.rand(16, 16, generator=gen) > 0.8
    px = pixels_of(token_hidden(r, c), c)
    assert bool(px[r].all())                # every hidden pixel lies in a hidden token
    assert torch.equal(pixels_of(default_hidden(c), c)[:, 0], torch.arange(16) >= 4 * c.i2i_given_rows)
    with pytest.raises(ValueError, match="hides nothing"):
        token_hidden(torch.zeros(16, 16), c)
    with pytest.raises(ValueError, match=r"shape \(16, 16\)"):
        token_hidden(torch.ones(8, 8), c)


@pytest.mark.parametrize("user_mask", [False, True], ids=["default-rows", "user-mask"])
def test_i2i_hidden_pixels_cannot_reach_the_output(pipe, gen, user_mask):
    """Two images that differ only in the hidden region give identical outputs for one seed."""
    c = pipe.config
    S = c.image_size
    mask = None
    hidden = default_hidden(c)
    if user_mask:
        mask = torch.zeros(S, S)
        mask[2:7, 3:13] = 1                 # a box in the top half, not token-aligned
        hidden = token_hidden(mask, c)
    a = torch.rand(1, 1, 3, S, S, generator=gen)
    b = torch.where(pixels_of(hidden, c), torch.rand(1, 1, 3, S, S, generator=gen), a)
    assert not torch.equal(a, b)
    assert torch.equal(_gen(pipe, "i2i", image=a, mask=mask), _gen(pipe, "i2i", image=b, mask=mask))
    # ... while changing the visible pixels does reach it (the test can fail).
    d = torch.where(pixels_of(hidden, c), a, torch.rand(1, 1, 3, S, S, generator=gen))
    assert not torch.equal(_gen(pipe, "i2i", image=a, mask=mask), _gen(pipe, "i2i", image=d, mask=mask))


def test_i2i_forces_the_blanked_codes_outside_the_mask(pipe, gen):
    from nuwa3dna.model.sampling import sample_tokens
    from nuwa3dna.model.tasks import form
    c = pipe.config
    S = c.image_size
    img = torch.rand(1, 1, 3, S, S, generator=gen)
    mask = torch.zeros(S, S)
    mask[4:12, 0:8] = 1                     # tokens (1..2, 0..1) hidden: given tokens follow them
    hidden = token_hidden(mask, c)
    codes = pipe.tokenizer.encode(blank(img, hidden, c))
    f = form("i2i", c, batch=1, given=codes, hidden=hidden)
    assert torch.equal(f.given_mask[0], ~hidden)
    toks = sample_tokens(pipe.nuwa, f, generator=torch.Generator().manual_seed(0))
    assert torch.equal(toks[0, 0][~hidden], codes[0, 0][~hidden])
    # The pipeline's loss with a user mask is finite and scores the hidden tokens only.
    loss = pipe.training_loss("i2i", {"target": img, "mask": mask})
    assert torch.isfinite(loss)


def test_v2v_given_frames_and_later_frames_stay_hidden(pipe, gen):
    c = pipe.config                         # 3 frames
    S = c.image_size
    vid = torch.rand(1, c.frames, 3, S, S, generator=gen)
    for g in range(1, c.frames):
        other = vid.clone()
        other[:, g:] = torch.rand(1, c.frames - g, 3, S, S, generator=gen)
        out = _gen(pipe, "v2v", video=vid, given_frames=g)
        assert out.shape == (2, c.frames, 3, S, S)
        assert torch.equal(out, _gen(pipe, "v2v", video=other, given_frames=g)), g
        # The given frames decode from the video's own codes.
        rec = pipe.tokenizer.decode(pipe.tokenizer.encode(vid[:, :g]))
        assert torch.allclose(out[:1, :g], rec, atol=1e-6)
    assert _gen(pipe, "v2v", video=vid[:, :1], given_frames=1).shape[1] == c.frames
    with pytest.raises(ValueError, match="given_frames must be an int in"):
        _gen(pipe, "v2v", video=vid, given_frames=c.frames)
    with pytest.raises(ValueError, match="at least 2 frame"):
        _gen(pipe, "v2v", video=vid[:, :1], given_frames=2)
    with pytest.raises(ValueError, match="given_frames is a v2v input"):
        _gen(pipe, "t2v", text="a", given_frames=1)
    with pytest.raises(ValueError, match="mask is an i2i input"):
        _gen(pipe, "t2i", text="a", mask=torch.ones(S, S))


def test_random_layouts_train(pipe, gen):
    c = pipe.config
    rng = np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=gen)))
    seen = set()
    for _ in range(20):
        lay = random_layout("i2i", c, rng)
        hid = token_hidden(lay["mask"], c)
        assert 0 < int(hid.sum()) < hid.numel()
        seen.add(int(random_layout("v2v", c, rng)["given_frames"]))
    assert seen == set(range(1, c.frames))
    assert random_layout("t2i", c, rng) == {}
    S = c.image_size
    img = torch.rand(2, 1, 3, S, S, generator=gen)
    assert torch.isfinite(pipe.training_loss("i2i", {"target": img, **random_layout("i2i", c, rng)}))
    vid = torch.rand(2, c.frames, 3, S, S, generator=gen)
    assert torch.isfinite(pipe.training_loss("v2v", {"target": vid, "given_frames": 1}))
