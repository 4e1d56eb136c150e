"""What the three command lines share: the one-line argument parser, the error wrapper,
the checkpoint loader and the task table.

Promise of every command: a usage error or an expected failure (a bad file, a
bad value) ends the program with exit code 2 and ONE line ``error: ...`` on
stderr, never a usage block or a traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Callable, Dict, NamedTuple, Optional, Tuple

import nuwa3dna.model
from nuwa3dna.model.tasks import TASKS

# model/ is the package nuwa3dna.model (setup.py package_dir), so the shipped
# weights live next to its __init__, wherever the package is installed.
DEFAULT_CHECKPOINT = os.path.join(os.path.dirname(os.path.abspath(nuwa3dna.model.__file__)),
                                  "checkpoints", "default")
EXPECTED_ERRORS = (ValueError, TypeError, OSError, FloatingPointError)   # FileNotFoundError is an OSError


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is ONE line on stderr (exit 2), not usage + message."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def _one_line(text) -> str:
    return " ".join(str(text).split())


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {_one_line(message)}", file=sys.stderr)


def run_cli(fn: Callable, args) -> int:
    """``fn(args)``; an expected failure becomes one line ``error: ...`` on stderr and exit code 2;
    a warning (an unknown word in a prompt, a letterboxed file) one line ``warning: ...`` (exit 0)."""
    with warnings.catch_warnings():
        warnings.simplefilter("default", UserWarning)
        warnings.showwarning = _show_warning
        try:
            fn(args)
        except EXPECTED_ERRORS as e:
            print(f"error: {_one_line(e)}", file=sys.stderr)
            return 2
    return 0


def check_device(device: str) -> str:
    """ValueError in one line for a device string torch does not know or a device this machine lacks."""
    import torch
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"--device {device!r} is not a device torch knows ({_one_line(e)}); "
                         f"use cpu or cuda") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: no CUDA device on this machine (torch "
                             f"{torch.__version__} sees none); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {device}: MPS is not available here; use --device cpu")
    return device


def load_pipeline(checkpoint: str, device: str):
    from nuwa3dna.model.pipeline import NuwaPipeline
    check_device(device)
    if not os.path.isdir(checkpoint):
        raise FileNotFoundError(f"no checkpoint directory {checkpoint!r}; train one with "
                                f"`python -m nuwa3dna.train` or pass --checkpoint DIR")
    return NuwaPipeline.load(checkpoint, map_location=device)


def set_threads(threads: Optional[int]) -> None:
    if threads:
        import torch
        torch.set_num_threads(threads)


def check_positive(**values: int) -> None:
    """ValueError naming the option (``num_samples`` -> ``--num-samples``) of the first value < 1."""
    for name, val in values.items():
        if val < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {val}")


# ----------------------------------------------------------------------------- the task table

class TaskEntry(NamedTuple):
    options: Tuple[str, ...]     # generate's user-input options the task takes
    sampling: Dict               # sampling defaults (generate and evaluate)


def _sampling(temperature: float, cond_scale: float) -> Dict:
    return dict(temperature=temperature, top_k=None, top_p=None, cond_scale=cond_scale)


# Sampling defaults, chosen with the oracle on a validation stream (seed 777;
# t2v also 778), not on evaluate's seed: guidance 2 lifts t2i shape accuracy
# 87.5% -> 93.8%; t2i needs T = 1 (colder, the background, likeliest
# everywhere, blanks it out); t2v at T = 0.5 draws the caption's direction in
# 92.7% against 86.5% at T = 0.8 (once frame 0 is drawn the rest of a video is
# nearly determined). The search: model/checkpoints/TRAINING.md, "Sampling defaults".
TASK_TABLE: Dict[str, TaskEntry] = {
    "t2i": TaskEntry(("prompt", "prompt_file"), _sampling(1.0, 2.0)),
    "s2i": TaskEntry(("sketch",), _sampling(0.5, 2.0)),
    "i2i": TaskEntry(("image", "mask"), _sampling(0.5, 1.0)),
    "ti2i": TaskEntry(("prompt", "prompt_file", "image"), _sampling(1.0, 1.0)),
    "t2v": TaskEntry(("prompt", "prompt_file"), _sampling(0.5, 2.0)),
    "s2v": TaskEntry(("sketch",), _sampling(0.8, 2.0)),
    "v2v": TaskEntry(("video", "given_frames"), _sampling(0.8, 1.0)),
    "tv2v": TaskEntry(("prompt", "prompt_file", "video"), _sampling(0.5, 2.0)),
}
TASK_SAMPLING = {task: entry.sampling for task, entry in TASK_TABLE.items()}


def tasks_taking(option: str) -> Tuple[str, ...]:
    """The tasks whose generate run takes ``--option`` (in ``TASKS`` order)."""
    return tuple(t for t, e in TASK_TABLE.items() if option in e.options)


def parse_tasks(text: Optional[str], option: str = "--tasks") -> Tuple[str, ...]:
    """A comma-separated task list (None: all tasks), checked against the table."""
    if text is None:
        return TASKS
    tasks = tuple(t.strip() for t in text.split(","))
    bad = [t for t in tasks if t not in TASK_TABLE]
    if bad:
        raise ValueError(f"unknown task(s) in {option}: {bad}; choose from {TASKS}")
    return tasks


def sampling_for(task: str, temperature=None, top_k=None, top_p=None, cond_scale=None) -> dict:
    """The task's default sampling settings with the given ones in place;
    top_k=0 and top_p=1 switch those filters off explicitly."""
    s = dict(TASK_SAMPLING[task])
    for key, val in (("temperature", temperature), ("top_k", top_k), ("top_p", top_p), ("cond_scale", cond_scale)):
        if val is not None:
            s[key] = val
    if s["top_k"] == 0:
        s["top_k"] = None
    if s["top_p"] is not None and s["top_p"] == 1.0:
        s["top_p"] = None
    return s


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    """--temperature/--top-k/--top-p/--cond-scale, each defaulting to the task's (``TASK_SAMPLING``)."""
    p.add_argument("--temperature", type=float, default=None, help="default: the task's (TASK_SAMPLING)")
    p.add_argument("--top-k", type=int, default=None, help="0 = off; default: the task's")
    p.add_argument("--top-p", type=float, default=None, help="1 = off; default: the task's")
    p.add_argument("--cond-scale", type=float, default=None,
                   help="classifier-free guidance scale (1 = off); default: the task's")


def sampling_args(args) -> Dict:
    return dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, cond_scale=args.cond_scale)


def add_run_args(p: argparse.ArgumentParser, checkpoint_help: str = "directory from NuwaPipeline.save") -> None:
    """--checkpoint, --device and --threads (generate and evaluate)."""
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help=checkpoint_help)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")

