"""Evaluate a NÜWA checkpoint on all eight tasks with the pixel oracle (model/oracle.py).

    python -m nuwa3dna.evaluate [--checkpoint DIR] [--samples 16]

Inputs come from a separate stream of the procedural data (seed 10007; the
training streams use seeds 0-2, the sampling settings were chosen on seed 777)
and are generated as one batch per task, sampled with generate's per-task
defaults (``TASK_SAMPLING``) unless --temperature/--top-k/--top-p/--cond-scale
are given. The figures (markdown table, one row per metric):

* t2i / t2v caption accuracy: the oracle's colour, shape (and for videos
  direction) of the output equal the caption's.
* s2i / s2v sketch agreement: mean IoU between the input sketch and the class
  map the oracle reads from the output (background included).
* i2i masked-region error: mean absolute pixel error (0..1) over the hidden
  bottom rows against the true image, next to the same error of the
  tokenizer's own reconstruction (the floor) and of leaving them black.
* v2v position error: centroid distance in px over the predicted frames
  (``image_size`` px where the object is missing).
* ti2i / tv2v edit success: the edited attribute reads as the target's value;
  preservation: every other attribute reads unchanged AND the mean centroid
  error against the target is <= 2 px.
* tokenizer reconstruction PSNR (dB) and sketch tokenizer pixel accuracy.
* "oracle on ground truth": the same oracle on the real targets (should be
  100% / 1.0 / 0 px), so a figure can be read against the oracle's own ceiling.

Untested: checkpoints with several objects per sample (the metrics handle
them by colour matching, but the shipped model has one).
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Dict, List

import numpy as np

EVAL_SEED = 10007
TARGETS = {"caption": 0.90, "miou": 0.80, "v2v_px": 2.0, "edit": 0.80}


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def evaluate(pipe, samples: int = 16, seed: int = EVAL_SEED, sampling: Dict = None,
             tasks=None, progress: bool = False) -> List[Dict]:
    """-> rows {task, metric, value (str), target (str), ok (bool|None), raw (float)}."""
    import torch
    from .model import data, oracle
    from .model.tasks import IMAGE_TASKS, TASKS

    cfg = pipe.config
    dcfg = data.DataConfig.from_model_config(cfg)
    from .generate import sampling_for
    sampling = sampling or {}
    tasks = TASKS if tasks is None else tasks
    rows = []

    def row(task, metric, raw, fmt, target=None, better="high"):
        ok = None if target is None else bool(raw >= target if better == "high" else raw <= target)
        tgt = "" if target is None else (f">= {fmt(target)}" if better == "high" else f"<= {fmt(target)}")
        rows.append(dict(task=task, metric=metric, value=fmt(raw), target=tgt, ok=ok, raw=float(raw)))

    def gen(task, **inputs):
        return pipe.generate(task, **inputs, num_samples=samples, seed=seed, progress=progress,
                             **sampling_for(task, **sampling))

    for task in tasks:
        frames = 1 if task in IMAGE_TASKS else cfg.frames
        stream = seed * 10 + TASKS.index(task)
        if task in ("ti2i", "tv2v"):
            b = data.make_edit_batch(samples, stream, 0, dcfg, frames)
            out = gen(task, text=b["text"], source=b["source"])
            succ, pres = [], []
            for i, p in enumerate(b["pairs"]):
                (r,) = oracle.match(oracle.read_video(out[i], dcfg), p.target.objects)[:1] or [None]
                tgt = p.target.objects[0]
                keys = ("color", "shape") + (("direction",) if frames > 1 else ())
                if r is None:
                    succ.append(0.0)
                    pres.append(0.0)
                    continue
                succ.append(float(getattr(r, p.attribute) == getattr(tgt, p.attribute)))
                same = all(getattr(r, k) == getattr(tgt, k) for k in keys if k != p.attribute)
                err = np.mean(oracle.position_errors(r, tgt, range(frames), cfg.image_size))
                pres.append(float(same and err <= 2.0))
            row(task, "edit success", np.mean(succ), _pct, TARGETS["edit"])
            row(task, "preservation (other attributes, position <= 2 px)", np.mean(pres), _pct)
            gt = [oracle.attribute_scores(p.target.video, p.target.objects, dcfg)[p.attribute] for p in b["pairs"]]
            row(task, "oracle on ground truth (edit success)", np.mean(gt), _pct)
            continue
        b = data.make_batch(samples, stream, 0, dcfg, frames)
        if task in ("t2i", "t2v"):
            out = gen(task, text=b["text"])
            keys = ("color", "shape") + (("direction",) if frames > 1 else ())
            sc = [oracle.attribute_scores(out[i], s.objects, dcfg) for i, s in enumerate(b["samples"])]
            allk = np.mean([float(all(x[k] == 1.0 for k in keys)) for x in sc])
            for k in keys:
                row(task, f"caption accuracy: {k}", np.mean([x[k] for x in sc]), _pct, TARGETS["caption"])
            row(task, "caption accuracy: all attributes", allk, _pct)
            gt = [oracle.attribute_scores(s.video, s.objects, dcfg) for s in b["samples"]]
            row(task, "oracle on ground truth (all attributes)",
                np.mean([float(all(x[k] == 1.0 for k in keys)) for x in gt]), _pct)
        elif task in ("s2i", "s2v"):
            out = gen(task, sketch=b["sketch"])
            ious = [oracle.mean_iou(oracle.class_map(out[i], dcfg), b["sketch"][i]) for i in range(samples)]
            row(task, "sketch agreement (mIoU)", np.mean(ious), lambda v: f"{v:.3f}", TARGETS["miou"])
            gt = [oracle.mean_iou(oracle.class_map(s.video, dcfg), s.sketch) for s in b["samples"]]
            row(task, "oracle on ground truth (mIoU)", np.mean(gt), lambda v: f"{v:.3f}")
        elif task == "i2i":
            out = gen(task, image=b["video"])
            r0 = cfg.i2i_given_rows * cfg.vq_downsample
            truth = b["video"][:, :, :, r0:]
            err = (out[:, :, :, r0:] - truth).abs().mean()
            recon = pipe.tokenizer.decode(pipe.tokenizer.encode(b["video"].to(out.device))).cpu()
            row(task, f"masked-region error (mean |dpixel|, rows >= {r0})", float(err), lambda v: f"{v:.4f}")
            row(task, "  floor: tokenizer reconstruction error there",
                float((recon[:, :, :, r0:] - truth).abs().mean()), lambda v: f"{v:.4f}")
            row(task, "  reference: error of a black fill", float(truth.abs().mean()), lambda v: f"{v:.4f}")
            sc = [oracle.attribute_scores(out[i], s.objects, dcfg) for i, s in enumerate(b["samples"])]
            row(task, "completed shape read correctly", np.mean([x["shape"] for x in sc]), _pct)
        elif task == "v2v":
            out = gen(task, video=b["video"])
            given = cfg.v2v_given_frames
            errs = []
            for i, s in enumerate(b["samples"]):
                (r,) = oracle.match(oracle.read_video(out[i], dcfg), s.objects)[:1] or [None]
                errs += oracle.position_errors(r, s.objects[0], range(given, frames), cfg.image_size)
            row(task, f"position error, frames {given}..{frames - 1} (px)", np.mean(errs),
                lambda v: f"{v:.2f}", TARGETS["v2v_px"], better="low")
            sc = [oracle.attribute_scores(out[i], s.objects, dcfg) for i, s in enumerate(b["samples"])]
            row(task, "direction read correctly", np.mean([x["direction"] for x in sc]), _pct)

    # Tokenizers.
    b = data.make_batch(samples, seed * 10 + 9, 0, dcfg)
    vid = b["video"].to(next(pipe.parameters()).device)
    with torch.no_grad():
        rec = pipe.tokenizer.decode(pipe.tokenizer.encode(vid)).cpu()
        mse = float(((rec - b["video"]) ** 2).mean())
        sk = b["sketch"].to(vid.device)
        sk_rec = pipe.sketch_tokenizer.decode(pipe.sketch_tokenizer.encode(sk)).cpu()
    row("tokenizer", "reconstruction PSNR (dB)", 10 * np.log10(1.0 / max(mse, 1e-12)), lambda v: f"{v:.2f}")
    row("tokenizer", "sketch tokenizer pixel accuracy", float((sk_rec == b["sketch"]).float().mean()), _pct)
    return rows


def markdown(rows: List[Dict]) -> str:
    lines = ["| task | metric | value | target | met |", "|---|---|---|---|---|"]
    for r in rows:
        met = "" if r["ok"] is None else ("yes" if r["ok"] else "**no**")
        lines.append(f"| {r['task']} | {r['metric']} | {r['value']} | {r['target']} | {met} |")
    return "\n".join(lines)


def build_parser():
    from .generate import DEFAULT_CHECKPOINT, TASK_CHOICES, _OneLineParser
    p = _OneLineParser(prog="python -m nuwa3dna.evaluate", description="Oracle evaluation of all eight tasks.")
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT)
    p.add_argument("--samples", type=int, default=16, help="examples per task")
    p.add_argument("--seed", type=int, default=EVAL_SEED)
    p.add_argument("--tasks", default=None, help="comma-separated subset")
    p.add_argument("--temperature", type=float, default=None, help="default: generate's per-task settings")
    p.add_argument("--top-k", type=int, default=None, help="0 = off")
    p.add_argument("--top-p", type=float, default=None, help="1 = off")
    p.add_argument("--cond-scale", type=float, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--progress", action="store_true")
    p.choices = TASK_CHOICES
    return p


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    try:
        import torch
        from .generate import load_pipeline
        if args.threads:
            torch.set_num_threads(args.threads)
        if args.samples < 1:
            raise ValueError(f"--samples must be >= 1, got {args.samples}")
        tasks = None
        if args.tasks:
            tasks = tuple(t.strip() for t in args.tasks.split(","))
            bad = [t for t in tasks if t not in p.choices]
            if bad:
                raise ValueError(f"unknown task(s) {bad}; choose from {p.choices}")
        t0 = time.time()
        pipe = load_pipeline(args.checkpoint, args.device).eval()
        rows = evaluate(pipe, args.samples, args.seed, dict(temperature=args.temperature, top_k=args.top_k,
                                                             top_p=args.top_p, cond_scale=args.cond_scale),
                        tasks=tasks, progress=args.progress)
    except (ValueError, TypeError, FileNotFoundError, OSError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(markdown(rows))
    from .generate import sampling_for
    used = "; ".join(f"{t}: " + ", ".join(f"{k}={v}" for k, v in sampling_for(
        t, args.temperature, args.top_k, args.top_p, args.cond_scale).items()) for t in (tasks or p.choices))
    print(f"\n{args.samples} samples per task (seed {args.seed}), checkpoint {args.checkpoint}, "
          f"{time.time() - t0:.0f}s. Sampling: {used}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
