"""DistributedDataParallel training (model/cli/train.py) equals one process on the combined batch.

Two CPU processes (torchrun, gloo) with batch 2 each must end with the same
parameters as one process with batch 4: rank r reads samples
[step*4 + 2r, step*4 + 2r + 2), the single process reads [step*4, step*4 + 4),
and DDP averages the two halves' gradients, which is the full batch's mean.
SGD with condition dropout off keeps the comparison exact up to float32
summation order (observed differences ~1e-8; tolerance 1e-5).
"""
import os
import socket
import subprocess
import sys

import pytest
import torch

from nuwa3dna.model.cli.train import build_parser, train
from nuwa3dna.model.pipeline import NuwaPipeline

DDP_OVERRIDES = dict(text_len=32, cond_drop=0.0)    # on top of conftest's app_config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, app_config):
    from nuwa3dna.model.cli.train_stages import SKETCH_TOKENIZER_FILE, TOKENIZER_FILE
    from nuwa3dna.model.vq import SketchTokenizer, VQTokenizer
    from nuwa3dna.model.weights import save_module
    d = tmp_path_factory.mktemp("ddp")
    cfg = app_config(**DDP_OVERRIDES)
    (d / "config.json").write_text(cfg.to_json())
    torch.manual_seed(0)
    save_module(VQTokenizer.from_config(cfg), str(d / TOKENIZER_FILE))
    save_module(SketchTokenizer.from_config(cfg), str(d / SKETCH_TOKENIZER_FILE))
    return d


def _args(d, out, batch):
    return ["nuwa", "--config", str(d / "config.json"), "--out", str(out), "--tokenizers", str(d),
            "--steps", "3", "--batch-size", str(batch), "--optimizer", "sgd", "--lr", "0.5", "--warmup", "1",
            "--weight-decay", "0", "--ckpt-every", "100", "--no-progress", "--threads", "1",
            "--tasks", "t2v,s2i,tv2v"]


def test_two_processes_match_one(tiny_run, app_config):
    """Also with the caption-contrast loss on the t2v steps: a per-sample mean, so the two
    ranks' halves average to the whole batch's as well."""
    from safetensors.torch import load_file
    d = tiny_run
    contrast = ["--caption-contrast", "0.5"]
    single = train(build_parser().parse_args(_args(d, d / "single", 4) + contrast))
    assert "contrast" in single["per_task"]        # a t2v step ran with it
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           "-m", "nuwa3dna.train", *_args(d, d / "ddp", 2), *contrast]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "on 2 process(es)" in res.stdout
    a = load_file(str(d / "single" / "model.safetensors"))
    b = load_file(str(d / "ddp" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        if not a[k].is_floating_point():
            continue
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
    # The runs did train: the decoder's parameters left their initialisation.
    torch.manual_seed(0)
    fresh = NuwaPipeline(config=app_config(**DDP_OVERRIDES)).state_dict()
    moved = sum(int(not torch.equal(fresh[k], a[k])) for k in a if k.startswith("nuwa."))
    assert moved > 10
    assert single["steps"] == 3 and single["world_size"] == 1


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_resume_continues_the_same_run(tiny_run, tmp_path, optimizer):
    """3 steps in one go == 1 step (stopped by --time-limit 0), then --resume to 3:
    data and schedule are functions of the step, optimiser state is restored."""
    from safetensors.torch import load_file
    d = tiny_run
    full = _args(d, tmp_path / "full", 2) + ["--optimizer", optimizer]
    train(build_parser().parse_args(full))
    part = _args(d, tmp_path / "part", 2) + ["--optimizer", optimizer]
    first = train(build_parser().parse_args(part + ["--time-limit", "0"]))
    assert first["steps"] == 1 and first["stopped_early"]
    train(build_parser().parse_args(part + ["--resume"]))
    a = load_file(str(tmp_path / "full" / "model.safetensors"))
    b = load_file(str(tmp_path / "part" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6)


def test_init_fine_tunes_a_saved_pipeline(tiny_run, tmp_path, app_config):
    """--init starts from a NuwaPipeline checkpoint: the decoder moves, the frozen tokenizers do not."""
    from safetensors.torch import load_file
    torch.manual_seed(3)
    NuwaPipeline(config=app_config(**DDP_OVERRIDES)).save(str(tmp_path / "start"))
    argv = _args(tiny_run, tmp_path / "ft", 2) + ["--init", str(tmp_path / "start"), "--steps", "2"]
    assert train(build_parser().parse_args(argv))["steps"] == 2
    a = load_file(str(tmp_path / "start" / "model.safetensors"))
    b = load_file(str(tmp_path / "ft" / "model.safetensors"))
    for k in a:
        if k.startswith(("tokenizer.", "sketch_tokenizer.")):
            assert torch.equal(a[k], b[k]), k
    assert any(not torch.equal(a[k], b[k]) for k in a if k.startswith("nuwa."))


def test_init_add_rotary_keeps_the_weights(tiny_run, tmp_path, app_config):
    """--add-rotary: the fine-tune's checkpoint has rotary self-attention (config and frequencies);
    at step 0 (lr 0) every old weight is unchanged, and --add-rotary without --init is refused."""
    from safetensors.torch import load_file
    torch.manual_seed(4)
    NuwaPipeline(config=app_config(**DDP_OVERRIDES, rotary=False)).save(str(tmp_path / "start"))
    argv = _args(tiny_run, tmp_path / "ft", 2) + ["--init", str(tmp_path / "start"), "--add-rotary",
                                                  "--steps", "1", "--lr", "0", "--min-lr-ratio", "0"]
    train(build_parser().parse_args(argv))
    a = load_file(str(tmp_path / "start" / "model.safetensors"))
    b = load_file(str(tmp_path / "ft" / "model.safetensors"))
    assert NuwaPipeline.load(str(tmp_path / "ft")).config.rotary
    new = sorted(set(b) - set(a))
    assert new and all(k.endswith("rotary_freqs") for k in new)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    with pytest.raises(ValueError, match="--add-rotary needs --init"):
        train(build_parser().parse_args(_args(tiny_run, tmp_path / "x", 2) + ["--add-rotary"]))
