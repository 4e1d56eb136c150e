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

User inputs: ``--prompt`` (t2i, ti2i, t2v, tv2v; case-insensitive, words
the model never saw get a ``warning:`` line naming them and the known
vocabulary), ``--prompt-file`` (one prompt per line, blank and ``#`` lines
skipped: one run per prompt, each with ``--seed``, so prompt k gives what
``--prompt`` would; files ``TASK_000...``, an index ``TASK_prompts.json``),
``--sketch`` PNG/GIF (s2i, s2v; colours of model/imageio.SKETCH_PALETTE or a
greyscale class-index PNG), ``--image`` PNG (i2i: the image to complete, its
top half kept unless ``--mask``; ti2i: the image to change), ``--mask`` PNG
(i2i: white = the region to generate, black = kept), ``--video`` GIF (v2v:
its first ``--given-frames`` frames are kept (default the checkpoint's
``v2v_given_frames``); tv2v: the video to change). Files are resized to the
model's frame size; non-square ones are letterboxed (with a warning). Sampling
defaults per task: ``TASK_TABLE`` in model/cli/common.py.

Every error in the arguments or input files ends the program with exit code 2
and one line on stderr ("error: ..."), never a traceback; warnings are one
``warning:`` line each (exit 0). Untested: --device cuda on a machine with
CUDA (the same code; the pipeline moves there; without CUDA it is an error).
"""
from __future__ import annotations

import json
import os
import time
from typing import Dict, List, Optional, Tuple

from nuwa3dna.model.cli.common import (TASK_TABLE, OneLineParser, add_run_args, add_sampling_args,
                                       check_positive, load_pipeline, run_cli, sampling_args, sampling_for,
                                       set_threads, tasks_taking)

EXAMPLE_SEED = 2024
FILE_OPTIONS = ("sketch", "image", "video", "mask", "prompt_file")


def build_parser() -> OneLineParser:
    p = OneLineParser(prog="python -m nuwa3dna.generate",
                      description="Run one of NÜWA's eight tasks on the shipped (or a given) checkpoint.")
    p.add_argument("--task", required=True, choices=tuple(TASK_TABLE))
    p.add_argument("--prompt", default=None, help="text condition (t2i, ti2i, t2v, tv2v)")
    p.add_argument("--prompt-file", default=None,
                   help="text file, one prompt per line (blank and # lines skipped): one run per prompt")
    p.add_argument("--sketch", default=None, help="sketch PNG/GIF (s2i, s2v)")
    p.add_argument("--image", default=None, help="image PNG (i2i, ti2i)")
    p.add_argument("--mask", default=None, help="i2i: mask PNG, white = region to generate, black = kept")
    p.add_argument("--video", default=None, help="video GIF (v2v, tv2v)")
    p.add_argument("--given-frames", type=int, default=None,
                   help="v2v: frames of --video kept (default: the checkpoint's v2v_given_frames)")
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
    if args.prompt is not None and getattr(args, "prompt_file", None) is not None:
        raise ValueError("give --prompt or --prompt-file, not both")
    for opt in FILE_OPTIONS + ("given_frames",):
        if getattr(args, opt, None) is not None and task not in tasks_taking(opt):
            raise ValueError(f"task {task} takes no --{opt.replace('_', '-')} "
                             f"(only {', '.join(tasks_taking(opt))})")


def read_prompts(path: str) -> List[str]:
    """The prompts of a --prompt-file: one per line; blank lines and lines starting with # skipped."""
    try:
        with open(path, encoding="utf-8") as fh:
            lines = fh.read().splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"--prompt-file {path!r} is not UTF-8 text: {e}") from None
    prompts = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
    if not prompts:
        raise ValueError(f"--prompt-file {path!r} holds no prompt (one per line; # starts a comment line)")
    return prompts


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
    if getattr(args, "mask", None) is not None:
        out["mask"] = imageio.read_mask(args.mask, size)
    if getattr(args, "given_frames", None) is not None:
        out["given_frames"] = args.given_frames
    if args.video is not None:
        need = out.get("given_frames", config.v2v_given_frames) if task == "v2v" else frames
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
    if "image" in inputs:       # i2i: the kept tokens' pixels, the hidden ones greyed out
        from nuwa3dna.model.masks import default_hidden, pixels_of, token_hidden
        m = inputs.get("mask")
        hidden = pixels_of(default_hidden(config) if m is None else token_hidden(m, config), config)
        img = inputs["image"][0].clone()
        img[:, :, hidden] = 0.25
        panels.append(("given", img))
    if "video" in inputs:       # v2v: the kept first frames, the rest greyed out
        vid = inputs["video"][0][:config.frames].clone()
        if vid.shape[0] < config.frames:
            vid = torch.cat([vid, vid.new_zeros(config.frames - vid.shape[0], *vid.shape[1:])])
        vid[inputs.get("given_frames", config.v2v_given_frames):] = 0.25
        panels.append(("given", vid))
    return panels, title


def write_outputs(task: str, outputs, inputs: Dict, config, out_dir: str, scale: int,
                  name: Optional[str] = None) -> List[str]:
    """Write ``NAME.png``/``.gif`` (``NAME_i`` with several samples) and ``NAME_sheet.png``; NAME = task."""
    from nuwa3dna.model import imageio
    from nuwa3dna.model.tasks import IMAGE_TASKS
    os.makedirs(out_dir, exist_ok=True)
    name = task if name is None else name
    paths = []
    n = outputs.shape[0]
    for i in range(n):
        stem = os.path.join(out_dir, name if n == 1 else f"{name}_{i}")
        if task in IMAGE_TASKS:
            paths.append(imageio.save_png(outputs[i, 0], stem + ".png", scale))
        else:
            paths.append(imageio.save_gif(outputs[i], stem + ".gif", scale))
    panels, title = condition_panels(task, inputs, config)
    panels += [("output" if n == 1 else f"out {i}", outputs[i]) for i in range(n)]
    sheet = os.path.join(out_dir, f"{name}_sheet.png")
    imageio.contact_sheet(panels, scale=scale, title=title).save(sheet)
    paths.append(sheet)
    return paths


def run(args) -> List[str]:
    set_threads(args.threads)
    check_positive(num_samples=args.num_samples, scale=args.scale)
    for opt in FILE_OPTIONS:     # fail on a bad file or option before loading the model
        path = getattr(args, opt)
        if path is not None and not os.path.isfile(path):
            raise FileNotFoundError(f"--{opt.replace('_', '-')} file not found: {path!r}")
    _check_options(args, args.task)
    prompts = read_prompts(args.prompt_file) if args.prompt_file is not None else [args.prompt]
    t0 = time.time()
    pipe = load_pipeline(args.checkpoint, args.device)
    config = pipe.config
    inputs = user_inputs(args, args.task, config)
    example, _ = example_inputs(args.task, config, args.example_seed)
    for key in pipe.required_inputs(args.task):
        if key not in inputs:
            inputs[key] = example[key]
    sampling = sampling_for(args.task, **sampling_args(args))
    paths, index = [], []
    for k, prompt in enumerate(prompts):
        if prompt is not None:
            inputs["text"] = prompt
        outputs = pipe.generate(args.task, **inputs, num_samples=args.num_samples, seed=args.seed,
                                progress=not args.no_progress, **sampling)
        name = None if args.prompt_file is None else f"{args.task}_{k:03d}"
        written = write_outputs(args.task, outputs, inputs, config, args.out, args.scale, name)
        cond = f" for {inputs['text']!r}" if "text" in inputs else ""
        print(f"{args.task}{cond}: wrote {', '.join(written)} in {time.time() - t0:.1f}s", flush=True)
        paths += written
        index.append({"prompt": prompt, "files": [os.path.basename(p) for p in written]})
    if args.prompt_file is not None:
        from nuwa3dna.model.weights import save_json
        idx = save_json(os.path.join(args.out, f"{args.task}_prompts.json"),
                        json.dumps({"seed": args.seed, "runs": index}, indent=1))
        print(f"{len(prompts)} prompts: index {idx}")
        paths.append(idx)
    return paths


def main(argv=None) -> int:
    return run_cli(run, build_parser().parse_args(argv))
