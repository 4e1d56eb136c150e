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
the video to change). Files are resized to the model's frame size. Sampling
defaults per task: ``TASK_TABLE`` in model/cli/common.py.

Every error in the arguments or input files ends the program with exit code 2
and one line on stderr ("error: ..."), never a traceback. Untested: --device
cuda (the same code; the pipeline moves there) and non-square user files
(they are stretched to a square).
"""
from __future__ import annotations

import os
import time
from typing import Dict, List, Tuple

from nuwa3dna.model.cli.common import (TASK_TABLE, OneLineParser, add_run_args, add_sampling_args,
                                       check_positive, load_pipeline, run_cli, sampling_args, sampling_for,
                                       set_threads, tasks_taking)

EXAMPLE_SEED = 2024
FILE_OPTIONS = ("sketch", "image", "video")


def build_parser() -> OneLineParser:
    p = OneLineParser(prog="python -m nuwa3dna.generate",
                      description="Run one of NÜWA's eight tasks on the shipped (or a given) checkpoint.")
    p.add_argument("--task", required=True, choices=tuple(TASK_TABLE))
    p.add_argument("--prompt", default=None, help="text condition (t2i, ti2i, t2v, tv2v)")
    p.add_argument("--sketch", default=None, help="sketch PNG/GIF (s2i, s2v)")
    p.add_argument("--image", default=None, help="image PNG (i2i, ti2i)")
    p.add_argument("--video", default=None, help="video GIF (v2v, tv2v)")
    add_run_args(p)
    p.add_argument("--out", default="nuwa3dna_out", help="output directory (created)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--example-seed", type=int, default=EXAMPLE_SEED, help="seed of the built-in example input")
    add_sampling_args(p)
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--scale", type=int, default=4, help="nearest upscaling of the written files")
    p.add_argument("--no-progress", action="store_true")
    return p


def _frames(task: str, config) -> int:
    from nuwa3dna.model.tasks import IMAGE_TASKS
    return 1 if task in IMAGE_TASKS else config.frames


def example_inputs(task: str, config, seed: int = EXAMPLE_SEED) -> Tuple[Dict, object]:
    """The built-in example for ``task``: (generate kwargs, ground-truth Sample or EditPair)."""
    from nuwa3dna.model import data
    cfg = data.DataConfig.from_model_config(config)
    frames = _frames(task, config)
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


def _check_options(args, task: str) -> None:
    """ValueError for an option the task does not take, or an empty prompt."""
    if args.prompt is not None and task not in tasks_taking("prompt"):
        raise ValueError(f"task {task} takes no --prompt (text tasks: {', '.join(tasks_taking('prompt'))})")
    if args.prompt is not None and not args.prompt.strip():
        raise ValueError("--prompt is empty")
    for opt in FILE_OPTIONS:
        if getattr(args, opt) is not None and task not in tasks_taking(opt):
            raise ValueError(f"task {task} takes no --{opt} (only {', '.join(tasks_taking(opt))})")


def user_inputs(args, task: str, config) -> Dict:
    """Inputs from --prompt/--sketch/--image/--video; errors for options the task does not take."""
    from nuwa3dna.model import imageio
    _check_options(args, task)
    frames = _frames(task, config)
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
    from nuwa3dna.model import imageio
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
    from nuwa3dna.model import imageio
    from nuwa3dna.model.tasks import IMAGE_TASKS
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
    set_threads(args.threads)
    check_positive(num_samples=args.num_samples, scale=args.scale)
    for opt in FILE_OPTIONS:     # fail on a bad file before loading the model
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
    outputs = pipe.generate(args.task, **inputs, num_samples=args.num_samples, seed=args.seed,
                            progress=not args.no_progress, **sampling_for(args.task, **sampling_args(args)))
    paths = write_outputs(args.task, outputs, inputs, config, args.out, args.scale)
    cond = f" for {inputs['text']!r}" if "text" in inputs else ""
    print(f"{args.task}{cond}: wrote {', '.join(paths)} in {time.time() - t0:.1f}s")
    return paths


def main(argv=None) -> int:
    return run_cli(run, build_parser().parse_args(argv))
