"""Run one of NÜWA's eight tasks from the command line.

    python -m nuwa3dna.generate --task t2v
    python -m nuwa3dna.generate --task t2i --prompt "a blue square"
    python -m nuwa3dna.generate --task s2i --sketch my_sketch.png --num-samples 4

With only ``--task``, the shipped checkpoint (model/checkpoints/default) runs
on a built-in example input: a sample of the procedural data (model/data.py)
with a fixed seed (``--example-seed``). Results go to ``--out`` (default
./nuwa3dna_out/): ``TASK.png`` for images, ``TASK.gif`` for videos (``TASK_i``
with several samples), plus ``TASK_sheet.png``, a contact sheet with the
condition and the outputs side by side (time runs down; nearest-upscaled).

User inputs: ``--prompt`` (t2i, ti2i, t2v, tv2v), ``--sketch`` PNG/GIF (s2i,
s2v; colours of model/imageio.SKETCH_PALETTE or a greyscale class-index PNG),
``--image`` PNG (i2i: its top half is kept; ti2i: the image to change),
``--video`` GIF (v2v: its first ``v2v_given_frames`` frames are kept; tv2v:
the video to change). Files are resized to the model's frame size.

Every error in the arguments or input files ends the program with exit code 2
and one line on stderr ("error: ..."), never a traceback. Untested: --device
cuda (the same code; the pipeline moves there) and non-square user files
(they are stretched to a square).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Dict, List, Tuple

from . import model as _model_pkg   # light: the package's __init__ imports nothing

# model/ is the package nuwa3dna.model (setup.py package_dir), so the shipped
# weights live next to its __init__, wherever the package is installed.
DEFAULT_CHECKPOINT = os.path.join(os.path.dirname(os.path.abspath(_model_pkg.__file__)), "checkpoints", "default")
TASK_CHOICES = ("t2i", "s2i", "i2i", "ti2i", "t2v", "s2v", "v2v", "tv2v")   # == model.tasks.TASKS
TEXT_OPTION_TASKS = ("t2i", "ti2i", "t2v", "tv2v")
FILE_OPTIONS = {"sketch": ("s2i", "s2v"), "image": ("i2i", "ti2i"), "video": ("v2v", "tv2v")}
EXAMPLE_SEED = 2024

# Sampling defaults per task, used for any option not given on the command
# line (and by nuwa3dna.evaluate). Chosen for the shipped checkpoint with the
# oracle on a validation stream (evaluate --samples 16 --seed 777, settings
# T in {1.0, 0.8, 0.5} x cond_scale in {1, 2}), not on the reported seed.
# E.g. t2i shape accuracy 87.5% -> 93.8% with guidance 2; s2v mIoU 0.78 ->
# 0.89 at T=0.8 with guidance 2; lower temperatures blank out t2i (the
# background is the likeliest token everywhere). t2v: after the caption-contrast
# fine-tune (TRAINING.md stage 8), T=0.5 puts 92.7% of 96 validation samples
# (seeds 777, 778) on the caption's direction against 86.5% at T=0.8 (guidance
# 3: 76%), colour and shape staying at 98-100%: once frame 0 is drawn, the
# rest of a video is nearly determined, and a hotter draw there only adds slips.
TASK_SAMPLING = {
    "t2i": dict(temperature=1.0, top_k=None, top_p=None, cond_scale=2.0),
    "s2i": dict(temperature=0.5, top_k=None, top_p=None, cond_scale=2.0),
    "i2i": dict(temperature=0.5, top_k=None, top_p=None, cond_scale=1.0),
    "ti2i": dict(temperature=1.0, top_k=None, top_p=None, cond_scale=1.0),
    "t2v": dict(temperature=0.5, top_k=None, top_p=None, cond_scale=2.0),
    "s2v": dict(temperature=0.8, top_k=None, top_p=None, cond_scale=2.0),
    "v2v": dict(temperature=0.8, top_k=None, top_p=None, cond_scale=1.0),
    "tv2v": dict(temperature=0.5, top_k=None, top_p=None, cond_scale=2.0),
}


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


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is ONE line on stderr (exit 2), not usage + message."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _OneLineParser(prog="python -m nuwa3dna.generate",
                       description="Run one of NÜWA's eight tasks on the shipped (or a given) checkpoint.")
    p.add_argument("--task", required=True, choices=TASK_CHOICES)
    p.add_argument("--prompt", default=None, help="text condition (t2i, ti2i, t2v, tv2v)")
    p.add_argument("--sketch", default=None, help="sketch PNG/GIF (s2i, s2v)")
    p.add_argument("--image", default=None, help="image PNG (i2i, ti2i)")
    p.add_argument("--video", default=None, help="video GIF (v2v, tv2v)")
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="directory from NuwaPipeline.save")
    p.add_argument("--out", default="nuwa3dna_out", help="output directory (created)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--example-seed", type=int, default=EXAMPLE_SEED, help="seed of the built-in example input")
    p.add_argument("--temperature", type=float, default=None, help="default: the task's (TASK_SAMPLING)")
    p.add_argument("--top-k", type=int, default=None, help="0 = off; default: the task's")
    p.add_argument("--top-p", type=float, default=None, help="1 = off; default: the task's")
    p.add_argument("--cond-scale", type=float, default=None,
                   help="classifier-free guidance scale (1 = off); default: the task's")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--scale", type=int, default=4, help="nearest upscaling of the written files")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--no-progress", action="store_true")
    return p


def load_pipeline(checkpoint: str, device: str):
    from .model.pipeline import NuwaPipeline
    if not os.path.isdir(checkpoint):
        raise FileNotFoundError(f"no checkpoint directory {checkpoint!r}; train one with "
                                f"`python -m nuwa3dna.train` or pass --checkpoint DIR")
    return NuwaPipeline.load(checkpoint, map_location=device)


def example_inputs(task: str, config, seed: int = EXAMPLE_SEED) -> Tuple[Dict, object]:
    """The built-in example for ``task``: (generate kwargs, ground-truth Sample or EditPair)."""
    from .model import data
    from .model.tasks import IMAGE_TASKS
    cfg = data.DataConfig.from_model_config(config)
    frames = 1 if task in IMAGE_TASKS else config.frames
    if task in ("ti2i", "tv2v"):
        pair = data.make_edit_pair(seed, 0, cfg, frames)
        return dict(text=pair.text, source=pair.source.video[None]), pair
    s = data.make_sample(seed, 0, cfg, frames)
    if task in ("t2i", "t2v"):
        return dict(text=s.caption), s
    if task in ("s2i", "s2v"):
        return dict(sketch=s.sketch[None]), s
    if task == "i2i":
        return dict(image=s.video[None]), s
    return dict(video=s.video[None]), s      # v2v


def user_inputs(args, task: str, config) -> Dict:
    """Inputs from --prompt/--sketch/--image/--video; errors for options the task does not take."""
    from .model import imageio
    from .model.tasks import IMAGE_TASKS
    if args.prompt is not None and task not in TEXT_OPTION_TASKS:
        raise ValueError(f"task {task} takes no --prompt (text tasks: {', '.join(TEXT_OPTION_TASKS)})")
    if args.prompt is not None and not args.prompt.strip():
        raise ValueError("--prompt is empty")
    for opt, tasks in FILE_OPTIONS.items():
        if getattr(args, opt) is not None and task not in tasks:
            raise ValueError(f"task {task} takes no --{opt} (only {', '.join(tasks)})")
    frames = 1 if task in IMAGE_TASKS else config.frames
    size = config.image_size
    out = {}
    if args.prompt is not None:
        out["text"] = args.prompt
    if args.sketch is not None:
        sk = imageio.read_sketch(args.sketch, size, config.sketch_classes, max_frames=frames)
        if sk.shape[1] < frames:
            raise ValueError(f"--sketch {args.sketch!r} has {sk.shape[1]} frame(s); {task} needs {frames}")
        out["sketch"] = sk
    if args.image is not None:
        out["image" if task == "i2i" else "source"] = imageio.read_image(args.image, size)
    if args.video is not None:
        need = config.v2v_given_frames if task == "v2v" else frames
        vid = imageio.read_video(args.video, size, max_frames=frames)
        if vid.shape[1] < need:
            raise ValueError(f"--video {args.video!r} has {vid.shape[1]} frame(s); {task} needs at least {need}")
        out["video" if task == "v2v" else "source"] = vid
    return out


def condition_panels(task: str, inputs: Dict, config) -> Tuple[List, str]:
    """(label, pixels) panels showing what the model was given, and a title line."""
    import torch
    from .model import imageio
    panels, title = [], inputs.get("text")
    if "sketch" in inputs:
        panels.append(("sketch", imageio.sketch_to_rgb(inputs["sketch"][0])))
    if "source" in inputs:
        panels.append(("source", inputs["source"][0]))
    if "image" in inputs:       # i2i: the kept top rows, the rest greyed out
        img = inputs["image"][0].clone()
        img[:, :, config.i2i_given_rows * config.vq_downsample:] = 0.25
        panels.append(("given", img))
    if "video" in inputs:       # v2v: the kept first frames, the rest greyed out
        vid = inputs["video"][0][:config.frames].clone()
        if vid.shape[0] < config.frames:
            vid = torch.cat([vid, vid.new_zeros(config.frames - vid.shape[0], *vid.shape[1:])])
        vid[config.v2v_given_frames:] = 0.25
        panels.append(("given", vid))
    return panels, title


def write_outputs(task: str, outputs, inputs: Dict, config, out_dir: str, scale: int) -> List[str]:
    from .model import imageio
    from .model.tasks import IMAGE_TASKS
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    n = outputs.shape[0]
    for i in range(n):
        stem = os.path.join(out_dir, task if n == 1 else f"{task}_{i}")
        if task in IMAGE_TASKS:
            paths.append(imageio.save_png(outputs[i, 0], stem + ".png", scale))
        else:
            paths.append(imageio.save_gif(outputs[i], stem + ".gif", scale))
    panels, title = condition_panels(task, inputs, config)
    panels += [("output" if n == 1 else f"out {i}", outputs[i]) for i in range(n)]
    sheet = os.path.join(out_dir, f"{task}_sheet.png")
    imageio.contact_sheet(panels, scale=scale, title=title).save(sheet)
    paths.append(sheet)
    return paths


def run(args) -> List[str]:
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.num_samples < 1:
        raise ValueError(f"--num-samples must be >= 1, got {args.num_samples}")
    if args.scale < 1:
        raise ValueError(f"--scale must be >= 1, got {args.scale}")
    for opt in ("sketch", "image", "video"):     # fail on a bad file before loading the model
        path = getattr(args, opt)
        if path is not None and not os.path.isfile(path):
            raise FileNotFoundError(f"--{opt} file not found: {path!r}")
    t0 = time.time()
    pipe = load_pipeline(args.checkpoint, args.device)
    config = pipe.config
    inputs = user_inputs(args, args.task, config)
    example, _ = example_inputs(args.task, config, args.example_seed)
    for key in pipe.required_inputs(args.task):
        if key not in inputs:
            inputs[key] = example[key]
    sampling = sampling_for(args.task, args.temperature, args.top_k, args.top_p, args.cond_scale)
    outputs = pipe.generate(args.task, **inputs, num_samples=args.num_samples, seed=args.seed,
                            progress=not args.no_progress, **sampling)
    paths = write_outputs(args.task, outputs, inputs, config, args.out, args.scale)
    cond = f" for {inputs['text']!r}" if "text" in inputs else ""
    print(f"{args.task}{cond}: wrote {', '.join(paths)} in {time.time() - t0:.1f}s")
    return paths


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (ValueError, TypeError, FileNotFoundError, OSError) as e:
        msg = " ".join(str(e).split())          # one line, whatever the message held
        print(f"error: {msg}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
