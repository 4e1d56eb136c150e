"""Tokenizers: shapes round-trip, straight-through gradients, EMA/dead-code upkeep, text bytes, errors."""
import warnings

import pytest
import torch

from nuwa3dna.model.config import tiny_config
from nuwa3dna.model.tokenizers import ByteTextTokenizer, SketchTokenizer, VQTokenizer


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def vq():
    torch.manual_seed(0)
    return VQTokenizer.from_config(tiny_config())


def test_vq_round_trip_shapes(vq, gen):
    video = torch.rand(2, 3, 3, 16, 16, generator=gen)
    codes = vq.encode(video)
    assert codes.shape == (2, 3, 4, 4) and codes.dtype == torch.long
    assert 0 <= int(codes.min()) and int(codes.max()) < vq.codebook_size
    out = vq.decode(codes)
    assert out.shape == video.shape and float(out.min()) >= 0 and float(out.max()) <= 1
    recon, losses = vq(video)
    assert recon.shape == video.shape
    assert {"recon", "commit", "total"} <= set(losses)
    assert torch.allclose(losses["total"], losses["recon"] + losses["commit"])
    # An image is a 1-frame video.
    assert vq.encode(video[:, :1]).shape == (2, 1, 4, 4)


def test_vq_eval_forward_matches_encode_decode(vq, gen):
    """In eval mode forward quantizes to exactly the codes ``encode`` returns."""
    vq.eval()
    video = torch.rand(1, 2, 3, 16, 16, generator=gen)
    recon, _ = vq(video)
    torch.testing.assert_close(recon, vq.decode(vq.encode(video)), rtol=1e-5, atol=1e-5)


def test_straight_through_gradient_reaches_encoder(vq, gen):
    video = torch.rand(2, 1, 3, 16, 16, generator=gen)
    _, losses = vq(video)
    # Only the reconstruction loss: its gradient can reach the encoder only through the quantizer's STE.
    losses["recon"].backward()
    g = vq.encoder.net[0].weight.grad
    assert g is not None and g.abs().sum() > 0
    assert vq.decoder.net[0].weight.grad.abs().sum() > 0


def test_ema_updates_codebook_and_restarts_dead_codes(vq, gen):
    video = torch.rand(4, 2, 3, 16, 16, generator=gen)
    q = vq.quantizer
    vq.train()
    vq(video)                                     # data init + one EMA step
    before = q.embed.clone()
    q.cluster_size[3] = 0.0                       # kill code 3
    vq(video)
    assert not torch.equal(before, q.embed)      # EMA moved the codebook
    # Every code is alive afterwards: dead ones were restarted at encoder outputs with usage 1.
    assert bool((q.cluster_size >= q.restart_threshold - 1e-6).all())
    z = vq.encoder((video * 2 - 1).flatten(0, 1)).permute(0, 2, 3, 1).reshape(-1, q.dim)
    assert (z - q.embed[3]).norm(dim=1).min() < 1e-5
    vq.eval()
    frozen = q.embed.clone()
    vq(video)
    assert torch.equal(frozen, q.embed)           # no EMA in eval mode


def test_sketch_tokenizer_round_trip(gen):
    torch.manual_seed(0)
    c = tiny_config()
    sk = SketchTokenizer.from_config(c)
    sketch = torch.randint(0, c.sketch_classes, (2, 3, 16, 16), generator=gen)
    codes = sk.encode(sketch)
    assert codes.shape == (2, 3, 2, 2) and codes.dtype == torch.long
    out = sk.decode(codes)
    assert out.shape == sketch.shape and out.dtype == torch.long
    assert 0 <= int(out.min()) and int(out.max()) < c.sketch_classes
    logits, losses = sk(sketch)
    assert logits.shape == (2, 3, c.sketch_classes, 16, 16)
    losses["recon"].backward()
    assert sk.encoder.net[0].weight.grad.abs().sum() > 0


def test_tokenizer_errors(vq):
    with pytest.raises(ValueError, match="video.shape"):
        vq.encode(torch.rand(2, 3, 16, 16))
    with pytest.raises(ValueError, match="divisible"):
        vq.encode(torch.rand(1, 1, 3, 18, 18))
    with pytest.raises(TypeError, match="dtype"):
        vq.encode(torch.zeros(1, 1, 3, 16, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="tokens must lie"):
        vq.decode(torch.full((1, 1, 4, 4), 99))
    sk = SketchTokenizer.from_config(tiny_config())
    with pytest.raises(ValueError, match="sketch classes"):
        sk.encode(torch.full((1, 1, 16, 16), 7))
    with pytest.raises(TypeError, match="sketch.dtype"):
        sk.encode(torch.rand(1, 1, 16, 16))


def test_text_tokenizer():
    tok = ByteTextTokenizer(8)
    ids = tok.encode(["ab", "", "héé"])
    assert ids.shape == (3, 8) and ids.dtype == torch.long
    assert ids[0].tolist() == [98, 99, 0, 0, 0, 0, 0, 0]
    assert ids[1].tolist() == [0] * 8
    assert tok.decode(ids) == ["ab", "", "héé"]
    assert tok.encode("ab").tolist() == ids[:1].tolist()       # a bare str is a batch of one
    odd = ["\x00\n🙂", "\ufffd"]
    assert tok.decode(tok.encode(odd)) == odd                  # any string: NUL, emoji, replacement char
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tok.encode(["12345678"])                                # exactly max_len: no warning
    with pytest.warns(UserWarning, match="truncated"):
        long = tok.encode(["0123456789"])
    assert tok.decode(long) == ["01234567"]
    with pytest.raises(TypeError, match=r"text\[1\] must be a str"):
        tok.encode(["ok", 5])
    with pytest.raises(TypeError, match="bytes"):
        tok.encode(b"raw")
    with pytest.raises(ValueError, match="max_len"):
        ByteTextTokenizer(0)
