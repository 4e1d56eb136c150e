"""Evaluate a NÜWA checkpoint on all eight tasks with the pixel oracle (model/oracle.py).

    python -m nuwa3dna.evaluate [--checkpoint DIR] [--samples 16]

Inputs come from a separate stream of the procedural data (seed 10007; the
training streams use seeds 0-2, the sampling settings were chosen on seed 777)
and are generated as one batch per task, sampled with the per-task defaults
(``TASK_TABLE`` in common.py) unless --temperature/--top-k/--top-p/--cond-scale
are given. Each task has its metric function (``METRICS``); the figures
(markdown table, one row per metric):

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
  error against the target is <= 2 px; strict edit success: also the target's
  shape in every frame with a stable area and a mean area within 25% of the
  target's (model/oracle.py, ``shape_stable`` and ``area_close``).
* strict shape (videos): the caption's shape in EVERY frame and the area's
  largest / smallest frame ratio <= 1.5; "all attributes, strict shape" uses it.
* tokenizer reconstruction PSNR (dB) and sketch tokenizer pixel accuracy.
* "oracle on ground truth": the same oracle on the real targets (should be
  100% / 1.0 / 0 px), so a figure can be read against the oracle's own ceiling.

Untested: checkpoints with several objects per sample (the metrics handle
them by colour matching, but the shipped model has one).
"""
from __future__ import annotations

import time
from typing import Callable, Dict, List

import numpy as np

from nuwa3dna.model.cli.common import (OneLineParser, add_run_args, add_sampling_args, check_positive,
                                       load_pipeline, parse_tasks, run_cli, sampling_args, sampling_for,
                                       set_threads)

EVAL_SEED = 10007
TARGETS = {"caption": 0.90, "miou": 0.80, "v2v_px": 2.0, "edit": 0.80}


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _f3(x: float) -> str:
    return f"{x:.3f}"


def _f4(x: float) -> str:
    return f"{x:.4f}"


class Evaluation:
    """One checkpoint's evaluation: its inputs per task, its sampling and the rows so far."""

    def __init__(self, pipe, samples: int, seed: int, sampling: Dict, progress: bool, holdout: str = None):
        from nuwa3dna.model import data
        from nuwa3dna.model.holdout import holdout_combos
        self.pipe, self.cfg, self.samples, self.seed = pipe, pipe.config, samples, seed
        # In-distribution streams leave out the checkpoint's held-out set; the held-out
        # rows score ``holdout`` (default: that set).
        self.holdout = pipe.config.holdout if holdout is None else holdout
        self.dcfg = data.DataConfig.from_model_config(pipe.config, exclude=holdout_combos(pipe.config.holdout))
        self.held_cfg = data.DataConfig.from_model_config(pipe.config, only=holdout_combos(self.holdout)) \
            if self.holdout else None
        self.sampling, self.progress = sampling or {}, progress
        self.rows: List[Dict] = []

    def row(self, task, metric, raw, fmt, target=None, better="high"):
        ok = None if target is None else bool(raw >= target if better == "high" else raw <= target)
        tgt = "" if target is None else (f">= {fmt(target)}" if better == "high" else f"<= {fmt(target)}")
        self.rows.append(dict(task=task, metric=metric, value=fmt(raw), target=tgt, ok=ok, raw=float(raw)))

    def frames(self, task: str) -> int:
        from nuwa3dna.model.tasks import IMAGE_TASKS
        return 1 if task in IMAGE_TASKS else self.cfg.frames

    def batch(self, task: str) -> Dict:
        """The task's inputs: ``samples`` examples of its own data stream."""
        from nuwa3dna.model import data
        from nuwa3dna.model.tasks import SOURCE_TASKS, TASKS
        make = data.make_edit_batch if task in SOURCE_TASKS else data.make_batch
        return make(self.samples, self.seed * 10 + TASKS.index(task), 0, self.dcfg, self.frames(task))

    def generate(self, task: str, **inputs):
        return self.pipe.generate(task, **inputs, num_samples=self.samples, seed=self.seed,
                                  progress=self.progress, **sampling_for(task, **self.sampling))

    def attribute_keys(self, task: str):
        return ("color", "shape") + (("direction",) if self.frames(task) > 1 else ())


# ----------------------------------------------------------------------------- per-task metrics

def _caption(ev: Evaluation, task: str) -> None:
    """t2i, t2v: the oracle reads the caption's attributes from the output; videos also
    strictly (the caption's shape in every frame, area stable within ``MAX_AREA_RATIO``)."""
    b = ev.batch(task)
    out = ev.generate(task, text=b["text"])
    _caption_rows(ev, task, out, b["samples"], gt=True)


def _caption_rows(ev: Evaluation, task: str, out, samples, gt: bool, label: str = "") -> None:
    from nuwa3dna.model import oracle
    keys = ev.attribute_keys(task)
    video = ev.frames(task) > 1
    strict = tuple("shape_stable" if k == "shape" else k for k in keys)
    sc = [oracle.attribute_scores(out[i], s.objects, ev.dcfg) for i, s in enumerate(samples)]
    for k in keys:
        ev.row(task, f"{label}caption accuracy: {k}", np.mean([x[k] for x in sc]), _pct, TARGETS["caption"])
    if video:
        ev.row(task, f"{label}caption accuracy: shape in every frame, area within "
                     f"{oracle.MAX_AREA_RATIO}x", np.mean([x["shape_stable"] for x in sc]), _pct,
               TARGETS["caption"])
    use = strict if video else keys
    name = "all attributes, strict shape" if video else "all attributes"
    ev.row(task, f"{label}caption accuracy: {name}", np.mean([float(all(x[k] == 1.0 for k in use)) for x in sc]),
           _pct)
    if gt:
        g = [oracle.attribute_scores(s.video, s.objects, ev.dcfg) for s in samples]
        ev.row(task, f"{label}oracle on ground truth ({name})",
               np.mean([float(all(x[k] == 1.0 for k in use)) for x in g]), _pct)


HELD_OUT = "held-out combinations: "


HELD_OUT_TASKS = ("t2i", "ti2i", "t2v", "tv2v")


def _held_out(ev: Evaluation, task: str) -> None:
    """The caption tasks on the held-out set only (model/holdout.py): t2i/t2v captions, and
    ti2i/tv2v edits whose target holds a held-out combination; the same rows, labelled."""
    from nuwa3dna.model import data
    from nuwa3dna.model.tasks import SOURCE_TASKS, TASKS
    if ev.held_cfg is None or (ev.frames(task) == 1 and not any(len(c) == 2 for c in ev.held_cfg.only)):
        return
    stream = ev.seed * 10 + 100 + TASKS.index(task)
    label = HELD_OUT.replace(": ", " (SEEN in training): ") if ev.holdout != ev.cfg.holdout else HELD_OUT
    if task in SOURCE_TASKS:
        _edit_rows(ev, task, data.make_edit_batch(ev.samples, stream, 0, ev.held_cfg, ev.frames(task)), label)
        return
    b = data.make_batch(ev.samples, stream, 0, ev.held_cfg, ev.frames(task))
    out = ev.generate(task, text=b["text"])
    _caption_rows(ev, task, out, b["samples"], gt=True, label=label)


def _sketch(ev: Evaluation, task: str) -> None:
    """s2i, s2v: the class map read from the output against the input sketch."""
    from nuwa3dna.model import oracle
    b = ev.batch(task)
    out = ev.generate(task, sketch=b["sketch"])
    ious = [oracle.mean_iou(oracle.class_map(out[i], ev.dcfg), b["sketch"][i]) for i in range(ev.samples)]
    ev.row(task, "sketch agreement (mIoU)", np.mean(ious), _f3, TARGETS["miou"])
    gt = [oracle.mean_iou(oracle.class_map(s.video, ev.dcfg), s.sketch) for s in b["samples"]]
    ev.row(task, "oracle on ground truth (mIoU)", np.mean(gt), _f3)


def _completion(ev: Evaluation, task: str) -> None:
    """i2i: pixel error over the completed rows, against the tokenizer's floor and a black fill."""
    from nuwa3dna.model import oracle
    b = ev.batch(task)
    out = ev.generate(task, image=b["video"])
    r0 = ev.cfg.i2i_given_rows * ev.cfg.vq_downsample
    truth = b["video"][:, :, :, r0:]
    err = (out[:, :, :, r0:] - truth).abs().mean()
    tok = ev.pipe.tokenizer
    recon = tok.decode(tok.encode(b["video"].to(out.device))).cpu()
    ev.row(task, f"masked-region error (mean |dpixel|, rows >= {r0})", float(err), _f4)
    ev.row(task, "  floor: tokenizer reconstruction error there", float((recon[:, :, :, r0:] - truth).abs().mean()),
           _f4)
    ev.row(task, "  reference: error of a black fill", float(truth.abs().mean()), _f4)
    sc = [oracle.attribute_scores(out[i], s.objects, ev.dcfg) for i, s in enumerate(b["samples"])]
    ev.row(task, "completed shape read correctly", np.mean([x["shape"] for x in sc]), _pct)


def _first_reading(video, objects, dcfg):
    """The oracle's reading of the first ground-truth object in ``video``, or None."""
    from nuwa3dna.model import oracle
    (r,) = oracle.match(oracle.read_video(video, dcfg), objects)[:1] or [None]
    return r


def _prediction(ev: Evaluation, task: str) -> None:
    """v2v: the object's position over the predicted frames."""
    from nuwa3dna.model import oracle
    b = ev.batch(task)
    out = ev.generate(task, video=b["video"])
    given, frames = ev.cfg.v2v_given_frames, ev.frames(task)
    errs = []
    for i, s in enumerate(b["samples"]):
        r = _first_reading(out[i], s.objects, ev.dcfg)
        errs += oracle.position_errors(r, s.objects[0], range(given, frames), ev.cfg.image_size)
    ev.row(task, f"position error, frames {given}..{frames - 1} (px)", np.mean(errs),
           lambda v: f"{v:.2f}", TARGETS["v2v_px"], better="low")
    sc = [oracle.attribute_scores(out[i], s.objects, ev.dcfg) for i, s in enumerate(b["samples"])]
    ev.row(task, "direction read correctly", np.mean([x["direction"] for x in sc]), _pct)
    ev.row(task, f"shape in every frame, area within {oracle.MAX_AREA_RATIO}x",
           np.mean([x["shape_stable"] for x in sc]), _pct)


def _edit(ev: Evaluation, task: str) -> None:
    """ti2i, tv2v: the edited attribute changed, the others and the position kept; strictly
    also the target's shape in every frame (area stable) and its area within ``AREA_TOLERANCE``."""
    _edit_rows(ev, task, ev.batch(task))


def _edit_rows(ev: Evaluation, task: str, b, label: str = "") -> None:
    from nuwa3dna.model import oracle
    out = ev.generate(task, text=b["text"], source=b["source"])
    frames, keys = ev.frames(task), ev.attribute_keys(task)
    succ, strict, stable, pres, gt_strict = [], [], [], [], []
    for i, p in enumerate(b["pairs"]):
        r, tgt = _first_reading(out[i], p.target.objects, ev.dcfg), p.target.objects[0]
        truth = _first_reading(p.target.video, p.target.objects, ev.dcfg)
        ok_gt = oracle.shape_stable(truth, tgt.shape) and oracle.area_close(truth, truth)
        gt_strict.append(float(getattr(truth, p.attribute) == getattr(tgt, p.attribute) and ok_gt))
        if r is None:
            succ.append(0.0)
            strict.append(0.0)
            stable.append(0.0)
            pres.append(0.0)
            continue
        succ.append(float(getattr(r, p.attribute) == getattr(tgt, p.attribute)))
        stable.append(float(oracle.shape_stable(r, tgt.shape)))
        strict.append(float(succ[-1] and stable[-1] and oracle.area_close(r, truth)))
        same = all(getattr(r, k) == getattr(tgt, k) for k in keys if k != p.attribute)
        err = np.mean(oracle.position_errors(r, tgt, range(frames), ev.cfg.image_size))
        pres.append(float(same and err <= 2.0))
    ev.row(task, f"{label}edit success", np.mean(succ), _pct, TARGETS["edit"])
    ev.row(task, f"{label}preservation (other attributes, position <= 2 px)", np.mean(pres), _pct)
    if frames > 1:
        ev.row(task, f"{label}target's shape in every frame, area within {oracle.MAX_AREA_RATIO}x",
               np.mean(stable), _pct, TARGETS["caption"])
    ev.row(task, f"{label}edit success, strict (and shape{' in every frame' if frames > 1 else ''}, "
                 f"area within {100 * oracle.AREA_TOLERANCE:.0f}% of the target's)", np.mean(strict), _pct)
    gt = [oracle.attribute_scores(p.target.video, p.target.objects, ev.dcfg)[p.attribute] for p in b["pairs"]]
    ev.row(task, f"{label}oracle on ground truth (edit success)", np.mean(gt), _pct)
    ev.row(task, f"{label}oracle on ground truth (edit success, strict)", np.mean(gt_strict), _pct)


METRICS: Dict[str, Callable[[Evaluation, str], None]] = {
    "t2i": _caption, "s2i": _sketch, "i2i": _completion, "ti2i": _edit,
    "t2v": _caption, "s2v": _sketch, "v2v": _prediction, "tv2v": _edit,
}


def _tokenizers(ev: Evaluation) -> None:
    """Reconstruction PSNR of the visual tokenizer, pixel accuracy of the sketch tokenizer."""
    import torch
    from nuwa3dna.model import data
    b = data.make_batch(ev.samples, ev.seed * 10 + 9, 0, ev.dcfg)
    vid = b["video"].to(next(ev.pipe.parameters()).device)
    with torch.no_grad():
        rec = ev.pipe.tokenizer.decode(ev.pipe.tokenizer.encode(vid)).cpu()
        mse = float(((rec - b["video"]) ** 2).mean())
        sk = b["sketch"].to(vid.device)
        sk_rec = ev.pipe.sketch_tokenizer.decode(ev.pipe.sketch_tokenizer.encode(sk)).cpu()
    ev.row("tokenizer", "reconstruction PSNR (dB)", 10 * np.log10(1.0 / max(mse, 1e-12)), lambda v: f"{v:.2f}")
    ev.row("tokenizer", "sketch tokenizer pixel accuracy", float((sk_rec == b["sketch"]).float().mean()), _pct)


def evaluate(pipe, samples: int = 16, seed: int = EVAL_SEED, sampling: Dict = None,
             tasks=None, progress: bool = False, holdout: str = None) -> List[Dict]:
    """-> rows {task, metric, value (str), target (str), ok (bool|None), raw (float)}.

    With a held-out set (the checkpoint's ``config.holdout``, or ``holdout``),
    the caption tasks (t2i, ti2i, t2v, tv2v) also get rows on its combinations
    (metric prefixed ``HELD_OUT``)."""
    ev = Evaluation(pipe, samples, seed, sampling, progress, holdout)
    for task in parse_tasks(None) if tasks is None else tasks:
        METRICS[task](ev, task)
        if task in HELD_OUT_TASKS:
            _held_out(ev, task)
    _tokenizers(ev)
    return ev.rows


def held_out_table(rows: List[Dict]) -> str:
    """In-distribution and held-out values side by side, one line per metric that has both ('' if none)."""
    held = {(r["task"], r["metric"].split(": ", 1)[1]): r for r in rows if r["metric"].startswith("held-out")}
    if not held:
        return ""
    label = next(iter(held.values()))["metric"].split(": ", 1)[0]
    lines = [f"| task | metric | in-distribution | {label} |", "|---|---|---|---|"]
    for r in rows:
        h = held.get((r["task"], r["metric"]))
        if h is not None:
            lines.append(f"| {r['task']} | {r['metric']} | {r['value']} | {h['value']} |")
    return "\n".join(lines)


def markdown(rows: List[Dict]) -> str:
    lines = ["| task | metric | value | target | met |", "|---|---|---|---|---|"]
    for r in rows:
        met = "" if r["ok"] is None else ("yes" if r["ok"] else "**no**")
        lines.append(f"| {r['task']} | {r['metric']} | {r['value']} | {r['target']} | {met} |")
    return "\n".join(lines)


def build_parser() -> OneLineParser:
    p = OneLineParser(prog="python -m nuwa3dna.evaluate", description="Oracle evaluation of all eight tasks.")
    add_run_args(p)
    p.add_argument("--samples", type=int, default=16, help="examples per task")
    p.add_argument("--seed", type=int, default=EVAL_SEED)
    p.add_argument("--tasks", default=None, help="comma-separated subset")
    p.add_argument("--holdout", default=None,
                   help="held-out set to score (model/holdout.py; default: the checkpoint's config.holdout; "
                        "rows say SEEN in training when the checkpoint was trained on it)")
    add_sampling_args(p)
    p.add_argument("--progress", action="store_true")
    return p


def run(args) -> List[Dict]:
    set_threads(args.threads)
    check_positive(samples=args.samples)
    tasks = parse_tasks(args.tasks)
    t0 = time.time()
    pipe = load_pipeline(args.checkpoint, args.device).eval()
    if args.holdout is not None:
        from nuwa3dna.model.holdout import holdout_combos
        holdout_combos(args.holdout)          # an unknown name fails before any sampling
    rows = evaluate(pipe, args.samples, args.seed, sampling_args(args), tasks=tasks, progress=args.progress,
                    holdout=args.holdout)
    print(markdown(rows))
    side = held_out_table(rows)
    if side:
        print("\n" + side)
    used = "; ".join(f"{t}: " + ", ".join(f"{k}={v}" for k, v in sampling_for(t, **sampling_args(args)).items())
                     for t in tasks)
    print(f"\n{args.samples} samples per task (seed {args.seed}), checkpoint {args.checkpoint}, "
          f"{time.time() - t0:.0f}s. Sampling: {used}")
    return rows


def main(argv=None) -> int:
    return run_cli(run, build_parser().parse_args(argv))
