"""Held-out compositions (model/holdout.py): kept out of every training stream, scored on their own."""
import json
import os

import numpy as np
import pytest
import torch

from nuwa3dna.model.cli import evaluate, train
from nuwa3dna.model.config import NuwaConfig
from nuwa3dna.model.data import DataConfig, make_edit_pair, make_sample
from nuwa3dna.model.holdout import HOLDOUT_SETS, any_match, holdout_combos

COMBOS = holdout_combos("combos-v1")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(dim=32, enc_depth=1, dec_depth=1, heads=2, dim_head=16, vq_hidden=8, vq_codebook_size=16,
            vq_codebook_dim=8, sketch_hidden=8, sketch_codebook_size=8, sketch_codebook_dim=4, v2v_given_frames=2)


def _seed(gen):
    return int(torch.randint(0, 10**6, (1,), generator=gen))


def test_excluded_combinations_never_appear(gen):
    seed = _seed(gen)
    excl = DataConfig(exclude=COMBOS)
    hits_default = hits = 0
    for i in range(150):
        for frames in (1, 4):
            video = frames > 1
            hits_default += any_match(make_sample(seed, i, DataConfig(), frames).objects, COMBOS, video)
            hits += any_match(make_sample(seed, i, excl, frames).objects, COMBOS, video)
        p = make_edit_pair(seed, i, excl)
        hits += any_match(p.source.objects, COMBOS, True) + any_match(p.target.objects, COMBOS, True)
    assert hits == 0 and hits_default > 10       # the default stream does hold them: the test can fail


def test_only_draws_the_held_out_set(gen):
    seed, only = _seed(gen), DataConfig(only=COMBOS)
    seen = set()
    for i in range(200):
        s = make_sample(seed, i, only)
        o = s.objects[0]
        match = [c for c in COMBOS if any_match((o,), (c,), True)]
        assert match, s.caption
        seen.update(match)
        img = make_sample(seed, i, only, frames=1).objects[0]
        assert (img.color, img.shape) in COMBOS             # images: the pairs only
    assert seen == set(COMBOS)
    with pytest.raises(ValueError, match="not a"):
        DataConfig(exclude=(("purple", "star"),))


def test_held_out_edit_pairs_have_held_out_targets(gen):
    from nuwa3dna.model.data import make_edit_batch
    seed, only = _seed(gen), DataConfig(only=COMBOS)
    for frames in (1, 4):
        b = make_edit_batch(6, seed, 0, only, frames)
        for p in b["pairs"]:
            assert any_match(p.target.objects, COMBOS, frames > 1), p.text
            assert p.text == p.target.caption and p.source.caption != p.target.caption


def test_config_names_the_set():
    assert "combos-v1" in HOLDOUT_SETS and HOLDOUT_SETS[""] == ()
    c = NuwaConfig(holdout="combos-v1")
    assert NuwaConfig.from_dict(json.loads(c.to_json())).holdout == "combos-v1"
    assert NuwaConfig.from_dict({}).holdout == ""           # older checkpoints: nothing held out
    with pytest.raises(ValueError, match="unknown held-out set"):
        NuwaConfig(holdout="nope")


def test_training_and_evaluation_with_a_held_out_set(tmp_path, one_thread, capsys):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(TINY))
    run = str(tmp_path / "run")
    common = ["--config", str(cfg), "--out", run, "--batch-size", "2", "--no-progress", "--holdout", "combos-v1"]
    assert train.main(["tokenizer", "--steps", "1"] + common) == 0
    assert train.main(["sketch-tokenizer", "--steps", "1"] + common) == 0
    # Tokenizers trained with the set cannot serve a run without it, and the reverse.
    assert train.main(["nuwa", "--steps", "1", "--config", str(cfg), "--out", run, "--no-progress"]) == 2
    assert "trained with held-out set 'combos-v1'" in capsys.readouterr().err
    assert train.main(["nuwa", "--steps", "2"] + common) == 0
    from nuwa3dna.model.pipeline import NuwaPipeline
    pipe = NuwaPipeline.load(run)
    assert pipe.config.holdout == "combos-v1"
    rows = evaluate.evaluate(pipe.eval(), samples=2, tasks=("t2i", "ti2i", "t2v", "tv2v", "s2i"))
    held = [r for r in rows if r["metric"].startswith(evaluate.HELD_OUT)]
    assert {r["task"] for r in held} == {"t2i", "ti2i", "t2v", "tv2v"}
    assert all(r["raw"] == 1.0 for r in held if "ground truth" in r["metric"])
    assert "in-distribution | held-out combinations |" in evaluate.held_out_table(rows)
    # A checkpoint trained on everything cannot be fine-tuned into a held-out claim.
    shipped = os.path.join(REPO, "model", "checkpoints", "default")
    assert train.main(["nuwa", "--steps", "1", "--init", shipped, "--out", str(tmp_path / "ft"), "--no-progress",
                       "--holdout", "combos-v1"]) == 2
    assert "cannot un-see" in capsys.readouterr().err


def test_evaluating_a_set_the_checkpoint_saw_says_so(tmp_path, app_config):
    from nuwa3dna.model.pipeline import NuwaPipeline
    torch.manual_seed(0)
    pipe = NuwaPipeline(config=app_config()).eval()
    rows = evaluate.evaluate(pipe, samples=1, tasks=("t2i",), holdout="combos-v1")
    assert any("(SEEN in training)" in r["metric"] for r in rows)
    assert not any(r["metric"].startswith("held-out") for r in evaluate.evaluate(pipe, samples=1, tasks=("t2i",)))
