"""Procedural moving-shapes data (model/data.py): determinism, formats, ground truth, edits."""
import numpy as np
import pytest
import torch

from nuwa3dna.model import data
from nuwa3dna.model.data import (COLORS, DIRECTION_VECTORS, NUM_SKETCH_CLASSES, SHAPES, DataConfig,
                                 make_batch, make_edit_batch, make_edit_pair, make_sample)


def test_deterministic_per_seed_and_index():
    a, b = make_sample(3, 5), make_sample(3, 5)
    assert torch.equal(a.video, b.video) and torch.equal(a.sketch, b.sketch) and a.caption == b.caption
    others = [make_sample(3, i).caption for i in range(6, 30)] + [make_sample(4, 5).caption]
    assert any(c != a.caption for c in others)


def test_batch_format_matches_pipeline_inputs():
    cfg = DataConfig()
    b = make_batch(6, seed=0, cfg=cfg)
    assert b["video"].shape == (6, cfg.frames, 3, 32, 32) and b["video"].dtype == torch.float32
    assert 0.0 <= float(b["video"].min()) and float(b["video"].max()) <= 1.0
    assert b["sketch"].shape == (6, cfg.frames, 32, 32) and b["sketch"].dtype == torch.long
    assert int(b["sketch"].max()) < NUM_SKETCH_CLASSES
    assert isinstance(b["text"], list) and all(isinstance(t, str) for t in b["text"])
    img = make_batch(3, seed=0, frames=1)
    assert img["video"].shape == (3, 1, 3, 32, 32)
    assert all("move" not in t and "still" not in t for t in img["text"])
    # A batch is the concatenation of its shards (what DDP ranks read).
    full, lo, hi = make_batch(4, 9, 10), make_batch(2, 9, 10), make_batch(2, 9, 12)
    assert torch.equal(full["video"], torch.cat([lo["video"], hi["video"]]))


def test_sketch_classes_match_config_default():
    from nuwa3dna.model.config import NuwaConfig
    assert NuwaConfig().sketch_classes == NUM_SKETCH_CLASSES == 1 + len(SHAPES)


@pytest.mark.parametrize("cfg", [DataConfig(), DataConfig(max_objects=2), DataConfig(diagonals=True, frames=3),
                                 DataConfig(image_size=48, frames=5)], ids=["default", "two", "diag", "48px"])
def test_ground_truth_agrees_with_pixels(cfg):
    speed = cfg.px_speed
    for i in range(25):
        s = make_sample(1, i, cfg)
        assert s.caption == data.caption(s.objects, video=True)
        assert len({o.color for o in s.objects}) == len(s.objects)          # distinct colours
        fg = (s.video.sum(1) > 0)
        assert torch.equal(fg, s.sketch > 0)                                  # sketch = drawn pixels
        for o in s.objects:
            assert f"a {o.color} {o.shape}" in s.caption
            dx, dy = DIRECTION_VECTORS[o.direction]
            for t, (x, y) in enumerate(o.positions):
                assert (x, y) == (o.positions[0][0] + dx * speed * t, o.positions[0][1] + dy * speed * t)
                # the object's colour sits at its centre pixel, with its class in the sketch
                assert np.allclose(s.video[t, :, y, x].numpy(), COLORS[o.color])
                assert int(s.sketch[t, y, x]) == o.sketch_class
        # every object is fully inside and untouched: its full mask area is visible
        for o in s.objects:
            for t in range(cfg.frames):
                m = data.shape_mask(o.shape, *o.positions[t], o.radius, cfg.image_size)
                assert int((s.sketch[t][torch.from_numpy(m)] == o.sketch_class).sum()) == int(m.sum())


def test_shapes_survive_tokenization():
    """The smallest shape spans at least a 2x2 block of 4 px tokens."""
    cfg = DataConfig()
    for shape in SHAPES:
        m = data.shape_mask(shape, 16, 16, cfg.px_radius[0], 32)
        ys, xs = np.nonzero(m)
        assert xs.max() - xs.min() + 1 >= 8 and ys.max() - ys.min() + 1 >= 8, shape


def test_edit_pairs_change_exactly_one_attribute():
    seen = set()
    for i in range(60):
        p = make_edit_pair(2, i)
        assert p.text == p.target.caption
        (a,), (b,) = p.source.objects, p.target.objects
        diff = {k for k in ("color", "shape", "direction") if getattr(a, k) != getattr(b, k)}
        assert diff == {p.attribute}
        seen.add(p.attribute)
        assert a.positions[0] == b.positions[0] and a.radius == b.radius
        if p.attribute != "direction":
            assert a.positions == b.positions
    assert seen == {"color", "shape", "direction"}
    for i in range(20):   # images: no direction edits
        p = make_edit_pair(2, i, frames=1)
        assert p.attribute in ("color", "shape") and "move" not in p.text
    eb = make_edit_batch(3, 0)
    assert eb["source"].shape == eb["target"].shape == (3, 4, 3, 32, 32) and len(eb["text"]) == 3


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="max_objects"):
        DataConfig(max_objects=7)
    with pytest.raises(ValueError, match="image_size"):
        DataConfig(image_size=8)
    with pytest.raises(ValueError, match="seed"):
        make_sample(-1)
    with pytest.raises(ValueError, match="attribute"):
        make_edit_pair(0, attributes=("size",))


def test_caption_variants_change_only_the_direction():
    cfg = data.DataConfig()
    s = data.make_sample(5, 3, cfg, 4)
    caps, label = data.caption_variants(s.objects, "direction", cfg.directions)
    assert caps[label] == s.caption and len(set(caps)) == len(cfg.directions)
    colour_shape = f"a {s.objects[0].color} {s.objects[0].shape} "
    assert all(c.startswith(colour_shape) for c in caps)
    assert caps[cfg.directions.index("still")].endswith("stays still")
    with pytest.raises(ValueError, match="direction="):
        data.caption_variants(s.objects, "direction", ("nowhere",))
