"""NuwaPipeline: training loss for all eight tasks, generation, input errors, checkpoints, config JSON."""
import json
import os

import pytest
import torch

from nuwa3dna.model.config import NuwaConfig, tiny_config
from nuwa3dna.model.pipeline import CONFIG_FILE, WEIGHTS_FILE, NuwaPipeline
from nuwa3dna.model.tasks import TASKS


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    return NuwaPipeline(config=tiny_config())


def make_inputs(task, B, g, c=None):
    c = c or tiny_config()
    frames = 1 if task in ("t2i", "s2i", "i2i", "ti2i") else c.frames
    S = c.image_size
    px = lambda: torch.rand(B, frames, 3, S, S, generator=g)
    inp = {"target": px()}
    if task in ("t2i", "ti2i", "t2v", "tv2v"):
        inp["text"] = ["a red"] * B
    if task in ("s2i", "s2v"):
        inp["sketch"] = torch.randint(0, c.sketch_classes, (B, frames, S, S), generator=g)
    if task in ("ti2i", "tv2v"):
        inp["source"] = px()
    return inp


@pytest.mark.parametrize("task", TASKS)
def test_training_loss_every_task(pipe, task, gen):
    pipe.train()
    pipe.zero_grad()
    loss = pipe.training_loss(task, make_inputs(task, 2, gen))
    assert loss.dim() == 0 and torch.isfinite(loss)
    # Untrained, the loss is near log(K) (uniform guess over 16 codes = 2.77).
    assert 1.5 < float(loss.detach()) < 5.0
    loss.backward()
    assert pipe.nuwa.head.weight.grad.abs().sum() > 0
    assert pipe.nuwa.layers[0].self_attn.to_q.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in pipe.tokenizer.parameters())        # tokenizers frozen


def test_training_loss_ignores_given_tokens(pipe, gen):
    """i2i's loss covers only the rows the model must complete; the given rows are read as the
    codes of the image with the hidden rows blanked (no leak), the others as the target's codes."""
    pipe.eval()
    c = pipe.config
    inp = make_inputs("i2i", 1, gen)
    codes = pipe.tokenizer.encode(inp["target"])
    from nuwa3dna.model.masks import blank, default_hidden
    from nuwa3dna.model.tasks import form
    given = pipe.tokenizer.encode(blank(inp["target"], default_hidden(c), c))
    f = form("i2i", c, batch=1, given=given)
    logits = pipe.nuwa(f, torch.where(f.given_mask, given, codes))
    keep = ~f.given_mask
    expect = torch.nn.functional.cross_entropy(logits[0][keep], codes[0][keep])
    torch.testing.assert_close(pipe.training_loss("i2i", inp), expect)


def test_target_alias_and_errors(pipe, gen):
    pipe.eval()
    img = torch.rand(1, 1, 3, 16, 16, generator=gen)
    assert torch.isfinite(pipe.training_loss("t2i", {"text": ["x"], "image": img}))
    with pytest.raises(ValueError, match="unknown task.*t2x"):
        pipe.training_loss("t2x", {"text": ["x"], "target": img})
    with pytest.raises(ValueError, match=r"missing \['text'\]"):
        pipe.training_loss("t2i", {"target": img})
    with pytest.raises(ValueError, match=r"missing \['source'\]"):
        pipe.training_loss("ti2i", {"text": ["x"], "target": img})
    with pytest.raises(ValueError, match="target.shape"):
        pipe.training_loss("t2i", {"text": ["x"], "target": torch.rand(1, 1, 3, 8, 8)})
    with pytest.raises(ValueError, match="3 frame"):
        pipe.training_loss("t2v", {"text": ["x"], "target": torch.rand(1, 2, 3, 16, 16)})
    with pytest.raises(TypeError, match="text must be a str or a list of str"):
        pipe.training_loss("t2i", {"text": 3, "target": img})
    with pytest.raises(TypeError, match=r"text\[0\] must be a str"):
        pipe.training_loss("t2i", {"text": [b"x"], "target": img})
    with pytest.raises(TypeError, match="sketch.dtype"):
        pipe.training_loss("s2i", {"sketch": torch.rand(1, 1, 16, 16), "target": img})
    with pytest.raises(ValueError, match="sketch.shape"):
        pipe.training_loss("s2i", {"sketch": torch.zeros(1, 1, 8, 8, dtype=torch.long), "target": img})
    with pytest.raises(ValueError, match="batch size"):
        pipe.training_loss("t2i", {"text": ["a", "b"], "target": img})
    with pytest.raises(ValueError, match="unused inputs"):
        pipe.generate("t2i", text="x", sketch=torch.zeros(1, 1, 16, 16, dtype=torch.long), progress=False)
    with pytest.raises(ValueError, match="num_samples"):
        pipe.generate("t2i", text="x", num_samples=0, progress=False)
    with pytest.raises(ValueError, match="top_p"):
        pipe.generate("t2i", text="x", top_p=1.5, progress=False)
    with pytest.raises(ValueError, match="unknown task"):
        pipe.required_inputs("video")
    assert pipe.required_inputs("tv2v") == ("text", "source")
    assert pipe.required_inputs("v2v") == ("video",)


def test_generate_every_task(pipe, gen):
    c = pipe.config
    S = c.image_size
    inputs = {
        "t2i": dict(text="red"), "t2v": dict(text=["left"]),
        "s2i": dict(sketch=torch.randint(0, c.sketch_classes, (1, 1, S, S), generator=gen)),
        "s2v": dict(sketch=torch.randint(0, c.sketch_classes, (1, c.frames, S, S), generator=gen)),
        "i2i": dict(image=torch.rand(1, 1, 3, S, S, generator=gen)),
        "v2v": dict(video=torch.rand(1, 1, 3, S, S, generator=gen)),
        "ti2i": dict(text="blue", source=torch.rand(1, 1, 3, S, S, generator=gen)),
        "tv2v": dict(text="blue", source=torch.rand(1, c.frames, 3, S, S, generator=gen)),
    }
    for task, kw in inputs.items():
        out = pipe.generate(task, **kw, num_samples=2, top_k=8, top_p=0.9, cond_scale=2.0, seed=3, progress=False)
        frames = 1 if task in ("t2i", "s2i", "i2i", "ti2i") else c.frames
        assert out.shape == (2, frames, 3, S, S), task
        assert float(out.min()) >= 0 and float(out.max()) <= 1
        if task in ("t2i", "v2v"):
            again = pipe.generate(task, **kw, num_samples=2, top_k=8, top_p=0.9, cond_scale=2.0, seed=3,
                                  progress=False)
            assert torch.equal(out, again), task                # same seed, same pixels
    # Given tokens are forced: i2i's sampled tokens keep the input's top token rows.
    img = inputs["i2i"]["image"]
    from nuwa3dna.model.sampling import sample_tokens
    from nuwa3dna.model.tasks import form
    codes = pipe.tokenizer.encode(img)
    f = form("i2i", c, batch=1, given=codes)
    toks = sample_tokens(pipe.nuwa, f, generator=torch.Generator().manual_seed(0))
    assert torch.equal(toks[:, :, :c.i2i_given_rows], codes[:, :, :c.i2i_given_rows])


def test_save_load_round_trip(pipe, tmp_path, gen):
    pipe.save(tmp_path)
    assert sorted(os.listdir(tmp_path)) == sorted([CONFIG_FILE, WEIGHTS_FILE])
    back = NuwaPipeline.load(tmp_path)
    assert back.config == pipe.config
    sd, sd2 = pipe.state_dict(), back.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    a = pipe.generate("t2i", text="x", seed=1, progress=False)
    b = back.generate("t2i", text="x", seed=1, progress=False)
    assert torch.equal(a, b)


def test_load_errors_name_the_file(pipe, tmp_path):
    pipe.save(tmp_path)
    w = tmp_path / WEIGHTS_FILE
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2])                           # truncated
    with pytest.raises(ValueError, match=WEIGHTS_FILE):
        NuwaPipeline.load(tmp_path)
    w.write_bytes(b"\x00garbage" * 10)                              # corrupt
    with pytest.raises(ValueError, match=WEIGHTS_FILE):
        NuwaPipeline.load(tmp_path)
    w.write_bytes(data)
    cfg = json.loads((tmp_path / CONFIG_FILE).read_text())
    cfg["dim"] = 48                                                  # mismatched shapes
    (tmp_path / CONFIG_FILE).write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="does not match"):
        NuwaPipeline.load(tmp_path)
    cfg["dim"], cfg["colour"] = 32, 1                                # unknown key
    (tmp_path / CONFIG_FILE).write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="colour"):
        NuwaPipeline.load(tmp_path)
    (tmp_path / CONFIG_FILE).write_text("{not json")
    with pytest.raises(ValueError, match=CONFIG_FILE):
        NuwaPipeline.load(tmp_path)
    os.remove(tmp_path / CONFIG_FILE)
    with pytest.raises(ValueError, match=CONFIG_FILE):
        NuwaPipeline.load(tmp_path)


def test_config_json_and_validation():
    c = NuwaConfig()
    assert NuwaConfig.from_dict(json.loads(c.to_json())) == c
    assert c.token_grid == (4, 8, 8)
    with pytest.raises(TypeError):
        NuwaConfig(32)                                                # keyword-only
    with pytest.raises(ValueError, match="unknown NuwaConfig keys: \\['depth'\\]"):
        NuwaConfig.from_dict({"depth": 3})
    with pytest.raises(ValueError, match="vq_downsample"):
        NuwaConfig(vq_downsample=3)
    with pytest.raises(ValueError, match="video_extent"):
        NuwaConfig(video_extent=(1, 2))
    with pytest.raises(ValueError, match="backend"):
        NuwaConfig(backend="cuda")
    with pytest.raises(ValueError, match="v2v_given_frames"):
        NuwaConfig(v2v_given_frames=4)
    with pytest.raises(ValueError, match="motion_weight=0.5"):
        NuwaConfig(motion_weight=0.5)


def test_motion_weight_scores_changed_tokens(gen):
    """The video loss weights a token ``motion_weight`` times when its code differs from the
    previous frame's at the same place (frame 0 and unchanged tokens keep weight 1)."""
    torch.manual_seed(0)
    c = tiny_config(cond_drop=0.0, motion_weight=5.0)
    pipe = NuwaPipeline(config=c).eval()
    inp = make_inputs("t2v", 2, gen)
    codes = pipe.tokenizer.encode(inp["target"])
    codes[:, 2] = codes[:, 1]                                      # frame 2 repeats frame 1 exactly
    from nuwa3dna.model.tasks import form
    f = form("t2v", c, batch=2, text=pipe._text(inp["text"]))
    ce = torch.nn.functional.cross_entropy(pipe.nuwa(f, codes).flatten(0, 3), codes.flatten(), reduction="none")
    changed = torch.zeros_like(codes, dtype=torch.bool)
    changed[:, 1:] = codes[:, 1:] != codes[:, :-1]
    assert changed[:, 1].any() and not changed[:, 2].any() and not changed[:, 0].any()
    w = 1.0 + 4.0 * changed.flatten().float()
    pipe.tokenizer.encode = lambda x: codes                         # score exactly these codes
    try:
        torch.testing.assert_close(pipe.training_loss("t2v", inp), (w * ce).sum() / w.sum())
        pipe.config.motion_weight = 1.0
        torch.testing.assert_close(pipe.training_loss("t2v", inp), ce.mean())
    finally:
        del pipe.tokenizer.encode


def test_training_reduces_the_loss(gen):
    """40 Adam steps on one fixed s2v batch (cond_drop 0) cut the loss well below log(16) = 2.77."""
    torch.manual_seed(0)
    pipe = NuwaPipeline(config=tiny_config(cond_drop=0.0)).train()
    inp = make_inputs("s2v", 2, gen)
    opt = torch.optim.Adam(pipe.nuwa.parameters(), lr=3e-3)
    first = None
    for _ in range(40):
        loss = pipe.training_loss("s2v", inp)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = float(loss.detach()) if first is None else first
    assert float(loss.detach()) < 0.5 * first


@pytest.mark.parametrize("task", ["t2v", "ti2i"])
def test_caption_contrast_is_the_model_posterior_over_captions(task, gen):
    """caption_contrast_loss == cross-entropy of log-likelihoods computed one caption and one
    sample at a time (so the batching of B samples x V captions pairs them right), for a
    video task and for an editing task (the source repeats with its sample)."""
    torch.manual_seed(1)
    c = tiny_config(cond_drop=0.5)               # dropout must NOT apply to the contrast
    pipe = NuwaPipeline(config=c).train()
    inp = make_inputs(task, 2, gen)
    variants = [["red", "blue", "green"], ["up", "left", "still"]]     # tiny text_len: 6 bytes
    labels = torch.tensor([2, 0])
    from nuwa3dna.model.tasks import form
    ll = torch.zeros(2, 3)
    with torch.no_grad():
        for i in range(2):
            codes = pipe.tokenizer.encode(inp["target"][i:i + 1])
            kw = {}
            if "source" in inp:
                kw["source"] = pipe.tokenizer.encode(inp["source"][i:i + 1])
            for k, cap in enumerate(variants[i]):
                f = form(task, c, batch=1, text=pipe._text(cap), **kw)
                ll[i, k] = pipe.nuwa(f, codes).log_softmax(-1).gather(-1, codes[..., None]).sum()
    expect = torch.nn.functional.cross_entropy(ll, labels)
    got = pipe.caption_contrast_loss(task, inp, variants, labels)
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-4)
    got.backward()
    assert pipe.nuwa.text_emb.weight.grad.abs().sum() > 0     # it reaches the text side


def test_caption_contrast_errors(pipe, gen):
    inp = make_inputs("t2v", 2, gen)
    with pytest.raises(ValueError, match="text task"):
        pipe.caption_contrast_loss("s2v", make_inputs("s2v", 2, gen), [["a"], ["b"]], torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="same number of caption variants"):
        pipe.caption_contrast_loss("t2v", inp, [["a", "b"], ["c"]], torch.tensor([0, 0]))
