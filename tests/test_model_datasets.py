"""Training on your own files (model/datasets.py): the example folder of scripts/make_example_dataset.py,
read, trained on for a few steps by the documented command, and bad folders refused in one line."""
import json
import os
import subprocess
import sys

import pytest
import torch

from nuwa3dna.model.cli import train
from nuwa3dna.model.config import NuwaConfig
from nuwa3dna.model.data import DataConfig, make_batch
from nuwa3dna.model.datasets import FolderData, ProceduralData

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(dim=32, enc_depth=1, dec_depth=1, heads=2, dim_head=16, vq_hidden=8, vq_codebook_size=16,
            vq_codebook_dim=8, sketch_hidden=8, sketch_codebook_size=8, sketch_codebook_dim=4, v2v_given_frames=2)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("data") / "shapes"
    res = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "make_example_dataset.py"), str(d),
                          "--images", "5", "--videos", "4", "--seed", "3"],
                         capture_output=True, text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stderr
    return str(d)


def test_folder_is_read_with_its_tasks_and_words(folder):
    with pytest.warns(UserWarning, match=r"10 file\(s\) are not square and were letterboxed"):
        ds = FolderData(folder, NuwaConfig())
    assert ds.tasks == ("t2i", "s2i", "i2i", "t2v", "s2v", "v2v")
    caps = [json.loads(ln)["caption"] for ln in open(os.path.join(folder, "captions.jsonl"))]
    assert len(caps) == 9 and set(ds.vocabulary) == {w for c in caps for w in c.split()}
    b = ds.task_inputs("s2v", 3, 7, 0, "cpu")
    assert b["target"].shape == (3, 4, 3, 32, 32) and b["sketch"].shape == (3, 4, 32, 32)
    assert len(ds.pools["s2v"]) == 2                     # half the videos have a sketch
    b = ds.task_inputs("t2i", 4, 7, 8, "cpu")
    assert b["target"].shape == (4, 1, 3, 32, 32) and all(t in caps for t in b["text"])
    again = ds.task_inputs("t2i", 4, 7, 8, "cpu")           # a pure function of (stream, start)
    assert torch.equal(b["target"], again["target"]) and b["text"] == again["text"]
    assert ds.tokenizer_batch("video", 6, 1, 0, "cpu").shape == (6, 1, 3, 32, 32)
    sk = ds.tokenizer_batch("sketch", 6, 1, 0, "cpu")
    assert sk.shape == (6, 1, 32, 32) and int(sk.max()) <= 3 and int(sk.max()) >= 1
    with pytest.raises(ValueError, match="cannot train task 'tv2v'"):
        ds.task_inputs("tv2v", 1, 0, 0, "cpu")


def test_procedural_data_is_the_generator():
    cfg = DataConfig()
    got = ProceduralData(cfg).task_inputs("t2v", 2, 1004, 6, "cpu")
    want = make_batch(2, 1004, 6, cfg, 4)
    assert torch.equal(got["target"], want["video"]) and got["text"] == want["text"]


def test_train_on_the_folder_then_generate(folder, tmp_path, one_thread):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(TINY))
    run = str(tmp_path / "run")
    common = ["--data", folder, "--config", str(cfg), "--out", run, "--batch-size", "2", "--no-progress"]
    assert train.main(["tokenizer", "--steps", "2"] + common) == 0
    assert train.main(["sketch-tokenizer", "--steps", "2"] + common) == 0
    assert train.main(["nuwa", "--steps", "4", "--seed", "1"] + common) == 0
    from nuwa3dna.model.pipeline import NuwaPipeline
    pipe = NuwaPipeline.load(run)
    with pytest.warns(UserWarning, match="letterboxed"):
        assert pipe.vocabulary == FolderData(folder, pipe.config).vocabulary
    caps = [json.loads(ln)["caption"] for ln in open(os.path.join(folder, "captions.jsonl"))]
    out = pipe.generate("t2v", text=caps[-1], progress=False)
    assert out.shape == (1, 4, 3, 32, 32)


@pytest.mark.parametrize("case", ["no-folder", "no-captions", "bad-json", "missing-file", "edit-task",
                                  "contrast"])
def test_bad_folders_are_one_line(case, folder, tmp_path, capsys):
    d = tmp_path / "d"
    d.mkdir()
    argv = ["nuwa", "--steps", "1", "--out", str(tmp_path / "run"), "--no-progress", "--data", str(d)]
    expect = {"no-folder": "no such folder", "no-captions": "has no captions.jsonl", "bad-json": ":2 is not JSON",
              "missing-file": "no such file", "edit-task": "cannot train task(s) ['ti2i']",
              "contrast": "--caption-contrast needs the procedural data"}[case]
    if case == "no-folder":
        argv[-1] = str(tmp_path / "nope")
    elif case == "bad-json":
        from PIL import Image
        Image.new("RGB", (32, 32)).save(d / "a.png")
        (d / "captions.jsonl").write_text('{"file": "a.png"}\n{not json\n')
    elif case == "missing-file":
        (d / "captions.jsonl").write_text('{"file": "a.png", "caption": "x"}\n')
    elif case in ("edit-task", "contrast"):
        argv[-1] = folder
        argv += ["--tasks", "t2i,ti2i"] if case == "edit-task" else ["--caption-contrast", "1"]
    argv += ["--init", os.path.join(REPO, "model", "checkpoints", "default")]
    assert train.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error:") and expect in err[-1], err
