"""Clear words on unfamiliar input (issue 15): case, unknown words, non-square files, devices,
the triton marker; many prompts per run (--prompt-file), user masks and given frames on the command line."""
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from nuwa3dna.model import imageio
from nuwa3dna.model.cli import generate
from nuwa3dna.model.data import DataConfig
from nuwa3dna.model.text import UnknownWordsWarning, normalize_text, unknown_words

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def vocab_ckpt(tmp_path_factory, app_config):
    from nuwa3dna.model.pipeline import NuwaPipeline
    d = tmp_path_factory.mktemp("vocab_ckpt")
    torch.manual_seed(0)
    pipe = NuwaPipeline(config=app_config())
    pipe.vocabulary = DataConfig().vocabulary
    pipe.save(str(d))
    return str(d)


def _main(argv, capsys):
    try:
        rc = generate.main(argv)
    except SystemExit as e:
        rc = e.code
    return rc, capsys.readouterr()


def test_captions_are_case_insensitive(vocab_ckpt):
    from nuwa3dna.model.pipeline import NuwaPipeline
    pipe = NuwaPipeline.load(vocab_ckpt)
    assert pipe.vocabulary == DataConfig().vocabulary
    assert torch.equal(pipe._text("A Green  Square Moves RIGHT"), pipe._text("a green square moves right"))
    assert normalize_text("  A\tRed ") == "a red"
    a = pipe.generate("t2i", text="A GREEN Square", seed=3, progress=False)
    assert torch.equal(a, pipe.generate("t2i", text="a green square", seed=3, progress=False))


def test_unknown_words_warn_with_the_vocabulary(vocab_ckpt):
    from nuwa3dna.model.pipeline import NuwaPipeline
    pipe = NuwaPipeline.load(vocab_ckpt)
    assert unknown_words("A purple STAR moves left, a star!", pipe.vocabulary) == ["purple", "star"]
    with pytest.warns(UnknownWordsWarning, match=r"purple, star; it knows: a blue circle"):
        pipe.generate("t2i", text="a purple star", progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # a known caption warns nothing
        pipe.generate("t2i", text=["A Red Circle", "a blue square"], num_samples=2, progress=False)
    pipe.vocabulary = None                      # unknown vocabulary: no check
    assert pipe.unknown_words("a purple star") == []


def test_cli_warns_on_stderr_and_exits_0(vocab_ckpt, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-m", "nuwa3dna.generate", "--task", "t2i", "--checkpoint", vocab_ckpt,
                          "--prompt", "A Purple Star", "--out", str(tmp_path), "--no-progress"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: ") and "purple, star" in lines[0], res.stderr
    assert "triangle" in lines[0] and "Traceback" not in res.stderr


def test_non_square_files_are_letterboxed(tmp_path, gen):
    h, w = 20, 40
    arr = (torch.rand(h, w, 3, generator=gen) * 200 + 55).to(torch.uint8).numpy()
    Image.fromarray(arr).save(tmp_path / "wide.png")
    with pytest.warns(UserWarning, match=r"40x20 px, not square: letterboxed to 40x40"):
        img = imageio.read_image(str(tmp_path / "wide.png"), 40)[0, 0]
    assert float(img[:, :10].abs().max()) == 0.0 and float(img[:, 30:].abs().max()) == 0.0   # black bands
    assert torch.allclose(img[:, 10:30], torch.from_numpy(arr).permute(2, 0, 1).float() / 255)
    sk = np.zeros((8, 16), dtype=np.uint8)
    sk[2:6, 4:12] = 2
    Image.fromarray(sk, mode="L").save(tmp_path / "sk.png")
    with pytest.warns(UserWarning, match="letterboxed"):
        cls = imageio.read_sketch(str(tmp_path / "sk.png"), 16, 4)[0, 0]
    assert int((cls == 2).sum()) == 32 and bool((cls[:4] == 0).all()) and bool((cls[12:] == 0).all())
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "square.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        imageio.read_image(str(tmp_path / "square.png"), 32)


@pytest.mark.parametrize("device, expect", [("cuda", "no CUDA device"), ("cuda:0", "no CUDA device"),
                                            ("toaster", "not a device torch knows")])
def test_missing_device_is_one_line(device, expect, vocab_ckpt, tmp_path, capsys):
    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    rc, cap = _main(["--task", "t2i", "--device", device, "--checkpoint", vocab_ckpt, "--out", str(tmp_path)],
                    capsys)
    assert rc == 2 and len(cap.err.strip().splitlines()) == 1 and cap.err.startswith("error:"), cap.err
    assert expect in cap.err and "weights" not in cap.err


def test_triton_is_required_only_where_it_installs():
    import ast
    from packaging.requirements import Requirement
    tree = ast.parse(open(os.path.join(REPO, "setup.py")).read())
    (reqs,) = [ast.literal_eval(k.value) for n in ast.walk(tree) if isinstance(n, ast.Call)
               for k in n.keywords if k.arg == "install_requires"]
    (req,) = [Requirement(r) for r in reqs if Requirement(r).name == "triton"]
    for system, machine, want in [("Linux", "x86_64", True), ("Linux", "aarch64", True), ("Darwin", "arm64", False),
                                  ("Darwin", "x86_64", False), ("Windows", "AMD64", False)]:
        assert req.marker.evaluate({"platform_system": system, "platform_machine": machine}) is want, system


def test_prompt_file_runs_each_prompt_as_its_own_run(vocab_ckpt, tmp_path, capsys):
    pf = tmp_path / "prompts.txt"
    pf.write_text("# my prompts\na red circle\n\n  A Blue Square  \n")
    rc, cap = _main(["--task", "t2i", "--prompt-file", str(pf), "--checkpoint", vocab_ckpt, "--out",
                     str(tmp_path / "many"), "--no-progress", "--seed", "4"], capsys)
    assert rc == 0, cap.err
    index = json.loads((tmp_path / "many" / "t2i_prompts.json").read_text())
    assert [r["prompt"] for r in index["runs"]] == ["a red circle", "A Blue Square"] and index["seed"] == 4
    assert index["runs"][1]["files"] == ["t2i_001.png", "t2i_001_sheet.png"]
    rc, cap = _main(["--task", "t2i", "--prompt", "A Blue Square", "--checkpoint", vocab_ckpt, "--out",
                     str(tmp_path / "one"), "--no-progress", "--seed", "4"], capsys)
    assert rc == 0
    same = np.asarray(Image.open(tmp_path / "many" / "t2i_001.png"))
    assert np.array_equal(same, np.asarray(Image.open(tmp_path / "one" / "t2i.png")))
    assert not np.array_equal(same, np.asarray(Image.open(tmp_path / "many" / "t2i_000.png")))


@pytest.mark.parametrize("argv, expect", [
    (["--task", "t2i", "--prompt-file", "{empty}"], "holds no prompt"),
    (["--task", "t2i", "--prompt-file", "{empty}", "--prompt", "a red circle"], "not both"),
    (["--task", "s2i", "--prompt-file", "{empty}"], "takes no --prompt-file"),
    (["--task", "t2v", "--given-frames", "1"], "takes no --given-frames"),
    (["--task", "v2v", "--given-frames", "4"], "given_frames must be an int in [1, 3]"),
    (["--task", "t2i", "--mask", "{mask}"], "takes no --mask"),
    (["--task", "i2i", "--mask", "{black}"], "mask hides nothing"),
], ids=["empty-file", "both", "not-a-text-task", "given-frames-t2v", "too-many-frames", "mask-t2i", "empty-mask"])
def test_new_options_errors_are_one_line(argv, expect, vocab_ckpt, tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    m = np.zeros((32, 32), np.uint8)
    Image.fromarray(m).save(tmp_path / "black.png")
    m[:, 16:] = 255
    Image.fromarray(m).save(tmp_path / "mask.png")
    argv = [a.format(empty=tmp_path / "empty.txt", mask=tmp_path / "mask.png", black=tmp_path / "black.png")
            for a in argv]
    rc, cap = _main(argv + ["--checkpoint", vocab_ckpt, "--out", str(tmp_path / "o"), "--no-progress"], capsys)
    assert rc == 2 and len(cap.err.strip().splitlines()) == 1 and expect in cap.err, cap.err


def test_cli_mask_and_given_frames(vocab_ckpt, tmp_path, capsys, gen):
    m = np.zeros((64, 64), np.uint8)
    m[8:40, 16:48] = 255                      # white = generate; any size, resized like the image
    Image.fromarray(m).save(tmp_path / "mask.png")
    img = (torch.rand(32, 32, 3, generator=gen) * 255).to(torch.uint8).numpy()
    Image.fromarray(img).save(tmp_path / "img.png")
    rc, cap = _main(["--task", "i2i", "--image", str(tmp_path / "img.png"), "--mask", str(tmp_path / "mask.png"),
                     "--checkpoint", vocab_ckpt, "--out", str(tmp_path / "i"), "--no-progress", "--scale", "1"],
                    capsys)
    assert rc == 0, cap.err
    sheet = np.asarray(Image.open(tmp_path / "i" / "i2i_sheet.png"))
    given = sheet[2 + 12:2 + 12 + 32, 4:36]   # the "given" panel: hidden tokens grey (0.25)
    assert (given[4:20, 8:24] == 64).all() and np.array_equal(given[24:], img[24:])
    rc, cap = _main(["--task", "v2v", "--given-frames", "1", "--checkpoint", vocab_ckpt, "--out",
                     str(tmp_path / "v"), "--no-progress"], capsys)
    assert rc == 0, cap.err
    with Image.open(tmp_path / "v" / "v2v.gif") as im:
        assert im.n_frames == 4
