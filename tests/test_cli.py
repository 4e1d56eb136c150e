"""Command lines: generate (all tasks, user files, bad arguments), evaluate, train's usage errors, image I/O.

Most runs use a tiny randomly initialised pipeline saved to a temporary
directory (fast); one runs the shipped checkpoint if it exists. Bad-argument
cases run as subprocesses where the "one line, no traceback" promise covers
the whole program (argparse included).
"""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from nuwa3dna.model import imageio
from nuwa3dna.model.cli import common, evaluate, generate, train
from nuwa3dna.model.data import make_edit_pair, make_sample

TASKS = tuple(common.TASK_TABLE)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, app_config):
    from nuwa3dna.model.pipeline import NuwaPipeline
    d = tmp_path_factory.mktemp("tiny_ckpt")
    torch.manual_seed(0)
    NuwaPipeline(config=app_config()).save(str(d))
    return str(d)


def _run(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=env, timeout=120)


def test_task_list_matches_model():
    from nuwa3dna.model.tasks import TASKS as MODEL_TASKS
    assert tuple(TASKS) == tuple(MODEL_TASKS)


@pytest.mark.parametrize("task", TASKS)
def test_generate_every_task_on_builtin_example(task, tiny_ckpt, tmp_path, capsys):
    rc = generate.main(["--task", task, "--checkpoint", tiny_ckpt, "--out", str(tmp_path), "--no-progress",
                        "--num-samples", "2", "--scale", "2"])
    assert rc == 0
    printed = capsys.readouterr().out
    image = task in ("t2i", "s2i", "i2i", "ti2i")
    for i in range(2):
        path = tmp_path / f"{task}_{i}.{'png' if image else 'gif'}"
        assert str(path) in printed
        with Image.open(path) as im:
            assert im.size == (64, 64)
            assert getattr(im, "n_frames", 1) == (1 if image else 4)
    sheet = Image.open(tmp_path / f"{task}_sheet.png")
    # condition panel(s) + 2 outputs, each 64 px wide + padding
    assert sheet.size[0] >= 3 * 64 if task not in ("t2i", "t2v") else sheet.size[0] >= 2 * 64


def test_generate_subprocess_with_progress_bar(tiny_ckpt, tmp_path):
    res = _run("nuwa3dna.generate", "--task", "t2v", "--checkpoint", tiny_ckpt, "--out", str(tmp_path),
               "--prompt", "a red square moves up", "--top-k", "5", "--temperature", "0.8")
    assert res.returncode == 0, res.stderr
    assert "t2v.gif" in res.stdout and "a red square moves up" in res.stdout
    assert "%|" in res.stderr                       # tqdm progress bar while sampling
    assert (tmp_path / "t2v_sheet.png").is_file()


def test_generate_reads_user_files(tiny_ckpt, tmp_path, app_config):
    s = make_sample(1, 0)
    imageio.save_gif(imageio.sketch_to_rgb(s.sketch), str(tmp_path / "sk.gif"), scale=3)
    imageio.save_png(s.video[0], str(tmp_path / "img.png"), scale=2)
    imageio.save_gif(make_edit_pair(1, 0).source.video, str(tmp_path / "vid.gif"))
    cases = [("s2v", "--sketch", "sk.gif"), ("s2i", "--sketch", "sk.gif"), ("i2i", "--image", "img.png"),
             ("ti2i", "--image", "img.png"), ("v2v", "--video", "vid.gif"), ("tv2v", "--video", "vid.gif")]
    for task, opt, name in cases:
        out = tmp_path / task
        rc = generate.main(["--task", task, opt, str(tmp_path / name), "--checkpoint", tiny_ckpt,
                            "--out", str(out), "--no-progress"])
        assert rc == 0, task
        assert (out / f"{task}_sheet.png").is_file()
    # What the model was given equals the file's content (read back exactly).
    from argparse import Namespace
    args = Namespace(prompt=None, sketch=str(tmp_path / "sk.gif"), image=None, video=None)
    got = generate.user_inputs(args, "s2v", app_config())
    assert torch.equal(got["sketch"][0], s.sketch)


BAD_CASES = {
    "unknown task": (["--task", "x2y"], "invalid choice"),
    "missing file": (["--task", "s2i", "--sketch", "/nonexistent/sk.png"], "not found"),
    "unreadable image": (["--task", "i2i", "--image", "{bad}"], "cannot read image"),
    "prompt for a sketch task": (["--task", "s2i", "--prompt", "a red circle"], "takes no --prompt"),
    "image for a text task": (["--task", "t2i", "--image", "{bad}"], "takes no --image"),
    "empty prompt": (["--task", "t2i", "--prompt", "  "], "empty"),
    "missing checkpoint": (["--task", "t2i", "--checkpoint", "/nonexistent/ckpt"], "no checkpoint"),
    "zero samples": (["--task", "t2i", "--num-samples", "0"], "num-samples"),
    "bad top-p": (["--task", "t2i", "--top-p", "1.5"], "top_p"),
}


@pytest.mark.parametrize("case", list(BAD_CASES), ids=lambda c: c.replace(" ", "-"))
def test_bad_arguments_one_line_no_traceback(case, tiny_ckpt, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    argv, expect = BAD_CASES[case]
    argv = [a.replace("{bad}", str(bad)) for a in argv]
    if "--checkpoint" not in argv:
        argv += ["--checkpoint", tiny_ckpt]
    argv += ["--out", str(tmp_path / "o"), "--no-progress"]
    try:
        rc = generate.main(argv)
    except SystemExit as e:          # argparse errors exit directly
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("error:"), err
    assert expect in err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


@pytest.mark.parametrize("argv", [["--task", "x2y"], ["--task", "i2i", "--image", "{bad}"],
                                  ["--task", "t2i", "--checkpoint", "/nonexistent"]],
                         ids=["argparse", "unreadable", "checkpoint"])
def test_bad_arguments_subprocess(argv, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    res = _run("nuwa3dna.generate", *[a.replace("{bad}", str(bad)) for a in argv], "--out", str(tmp_path))
    assert res.returncode != 0
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr


SHIPPED = common.DEFAULT_CHECKPOINT


@pytest.mark.skipif(not os.path.isfile(os.path.join(SHIPPED, "model.safetensors")), reason="no shipped checkpoint")
def test_shipped_checkpoint_t2i_draws_the_caption(tmp_path):
    """The shipped model draws the prompt: the oracle reads one green object in each of 4 samples
    (t2i colour accuracy is 99%) and a square in most (shape 94%). A blank image reads as nothing."""
    from nuwa3dna.model.oracle import read_video
    assert read_video(torch.zeros(1, 3, 32, 32)) == []
    rc = generate.main(["--task", "t2i", "--prompt", "a green square", "--num-samples", "4", "--out",
                        str(tmp_path), "--no-progress", "--scale", "1"])
    assert rc == 0
    shapes = []
    for i in range(4):
        img = imageio.read_image(str(tmp_path / f"t2i_{i}.png"), 32)[0]
        assert img.shape == (1, 3, 32, 32)
        readings = read_video(img)
        assert [r.color for r in readings] == ["green"], (i, readings)
        shapes.append(readings[0].shape)
    assert shapes.count("square") >= 3, shapes


def test_evaluate_oracle_sanity_and_table(tiny_ckpt):
    from nuwa3dna.model.pipeline import NuwaPipeline
    pipe = NuwaPipeline.load(tiny_ckpt).eval()
    rows = evaluate.evaluate(pipe, samples=2, tasks=("t2i", "s2i", "v2v", "tv2v"))
    by = {(r["task"], r["metric"]): r for r in rows}
    # The oracle reads the ground truth perfectly, so the model rows are meaningful.
    assert by[("t2i", "oracle on ground truth (all attributes)")]["raw"] == 1.0
    assert by[("s2i", "oracle on ground truth (mIoU)")]["raw"] == 1.0
    assert by[("tv2v", "oracle on ground truth (edit success)")]["raw"] == 1.0
    # An untrained model misses the targets.
    assert by[("t2i", "caption accuracy: color")]["ok"] is False
    assert 0.0 <= by[("tokenizer", "sketch tokenizer pixel accuracy")]["raw"] <= 1.0
    table = evaluate.markdown(rows)
    assert table.splitlines()[0].startswith("| task | metric |") and len(table.splitlines()) == len(rows) + 2


def test_evaluate_bad_checkpoint_one_line(capsys):
    assert evaluate.main(["--checkpoint", "/nonexistent/ckpt"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "no checkpoint" in err


def test_imageio_round_trips_and_errors(tmp_path):
    s = make_sample(4, 2)
    imageio.save_gif(s.video, str(tmp_path / "v.gif"), scale=4)
    back = imageio.read_video(str(tmp_path / "v.gif"), 32)
    assert back.shape == (1, 4, 3, 32, 32) and float((back[0] - s.video).abs().max()) < 2 / 255
    imageio.save_sketch_png(s.sketch[:1], str(tmp_path / "s.png"), scale=2)
    assert torch.equal(imageio.read_sketch(str(tmp_path / "s.png"), 32, 4)[0, 0], s.sketch[0])
    Image.fromarray(s.sketch[0].numpy().astype("uint8"), mode="L").save(tmp_path / "idx.png")
    assert torch.equal(imageio.read_sketch(str(tmp_path / "idx.png"), 32, 4)[0, 0], s.sketch[0])
    (tmp_path / "junk.gif").write_bytes(b"GIF89a-not-really")
    with pytest.raises(ValueError, match="cannot read image"):
        imageio.read_video(str(tmp_path / "junk.gif"), 32)
    with pytest.raises(FileNotFoundError):
        imageio.read_image(str(tmp_path / "nope.png"), 32)
    with pytest.raises(ValueError, match="directory"):
        imageio.read_image(str(tmp_path), 32)
    T = s.video.shape[0]
    sheet = imageio.contact_sheet([("a", s.video), ("b", s.video[0])], scale=2, title="t")
    assert sheet.size == (4 + T * (64 + 4), 16 + 2 * (12 + 64 + 4))            # a row per panel, time across
    row_b = np.asarray(sheet)[16 + 80 + 12:16 + 80 + 12 + 64]
    assert np.array_equal(row_b[:, 4:68], imageio._upscale(imageio.to_uint8(s.video[:1]), 2)[0])
    assert (row_b[:, 4 + 68:] == 40).all()                                  # a 1-frame panel fills one cell
    sheet = imageio.contact_sheet([("a", s.video[0]), ("b", s.video[1])], scale=2)
    assert sheet.size == (4 + 2 * (64 + 4), 2 + 12 + 64 + 4)                # images side by side


def test_package_entry_point_dispatches(tiny_ckpt, tmp_path, capsys):
    from nuwa3dna.__main__ import main
    assert main([]) == 2 and "expected a command" in capsys.readouterr().err
    assert main(["generate", "--task", "i2i", "--checkpoint", tiny_ckpt, "--out", str(tmp_path),
                 "--no-progress"]) == 0
    assert (tmp_path / "i2i.png").is_file()


def test_sampling_defaults_per_task_and_overrides():
    for task in TASKS:
        s = common.sampling_for(task)
        assert set(s) == {"temperature", "top_k", "top_p", "cond_scale"}
    s = common.sampling_for("t2v", temperature=0.5, top_k=0, top_p=1.0, cond_scale=2.0)
    assert s == dict(temperature=0.5, top_k=None, top_p=None, cond_scale=2.0)
    assert common.sampling_for("v2v", top_k=7)["top_k"] == 7


TRAIN_USAGE_ERRORS = {
    "no stage": ([], "required"),
    "unknown stage": (["decoder", "--out", "o", "--steps", "1"], "invalid choice"),
    "missing --steps": (["nuwa", "--out", "o"], "--steps"),
    "not a number": (["tokenizer", "--out", "o", "--steps", "ten"], "invalid int value"),
    "unknown option": (["tokenizer", "--out", "o", "--steps", "1", "--bogus"], "unrecognized arguments"),
}


@pytest.mark.parametrize("case", list(TRAIN_USAGE_ERRORS), ids=lambda c: c.replace(" ", "-"))
def test_train_usage_error_is_one_line(case, capsys):
    argv, expect = TRAIN_USAGE_ERRORS[case]
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    assert e.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1, captured.err
    assert captured.err.startswith("error:") and expect in captured.err and "usage:" not in captured.err


@pytest.mark.parametrize("argv", [["tokenizer", "--out", "{out}", "--steps", "0"],
                                  ["nuwa", "--out", "{out}", "--steps", "1", "--config", "/nonexistent.json"],
                                  ["nuwa", "--out", "{out}", "--steps", "1", "--tokenizers", "/nonexistent"]],
                         ids=["bad-value", "missing-config", "missing-tokenizers"])
def test_train_bad_values_subprocess(argv, tmp_path):
    res = _run("nuwa3dna.train", *[a.replace("{out}", str(tmp_path / "run")) for a in argv], "--no-progress")
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert res.stderr.startswith("error:")


def test_entry_shims_are_the_cli_mains():
    import nuwa3dna.evaluate
    import nuwa3dna.generate
    import nuwa3dna.train
    assert nuwa3dna.generate.main is generate.main and nuwa3dna.train.main is train.main
    assert nuwa3dna.evaluate.main is evaluate.main
