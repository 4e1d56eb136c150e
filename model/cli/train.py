"""Train the small NÜWA, in three stages, on procedural "moving shapes" (model/data.py) or a folder of your own.

    python -m nuwa3dna.train tokenizer        --out RUN --steps 800
    python -m nuwa3dna.train sketch-tokenizer --out RUN --steps 400
    python -m nuwa3dna.train nuwa             --out RUN --steps 3000 --export model/checkpoints/default
    python -m nuwa3dna.train nuwa --data my_data/ --out RUN --steps 3000      # your own files

``--data DIR``: a folder with ``captions.jsonl`` and PNG images / GIF videos
(optional sketch class maps), model/datasets.py; it trains the tasks its files
allow (t2i, i2i, s2i on images, t2v, v2v, s2v on videos). The saved pipeline
records its captions' words (vocab.json) for generate's unknown-word warning.

(model/checkpoints/TRAINING.md has the exact recipe of the shipped checkpoint;
the stages' parts are in model/cli/train_stages.py.)
``--config path.json`` is a NuwaConfig JSON (default: NuwaConfig()). The
tokenizer stages write ``RUN/tokenizer.safetensors`` and
``RUN/sketch_tokenizer.safetensors``; the nuwa stage reads them from
``--tokenizers DIR`` (default RUN), trains ``pipeline.nuwa`` with the
tokenizers frozen, sampling one of the eight tasks per step (the same task on
every rank), and writes the whole pipeline with ``NuwaPipeline.save`` to RUN
(and to ``--export`` whenever the smoothed loss improved since the last export).

Optimiser: AdamW, linear warm-up then cosine decay to 10% of ``--lr``, gradient
clipping at ``--clip``. Every ``--ckpt-every`` steps (and at the end) the model,
optimiser state and step go to ``RUN/train_state_STAGE.safetensors`` + ``.json``
(no pickle); ``--resume`` continues from there. Data are a pure function of
(seed, step, rank), so a resumed run sees exactly the samples it would have seen.

Scale-out: under ``torchrun --nproc_per_node N`` (WORLD_SIZE > 1) the model is
wrapped in DistributedDataParallel (gloo on CPU, nccl on CUDA); ``--batch-size``
is per process and rank r reads samples ``[step*B*N + r*B, step*B*N + (r+1)*B)``,
so N processes with batch B see exactly the samples of one process with batch
N*B (tests/test_ddp.py checks the parameters agree). Tokenizer EMA codebooks
are buffers: DDP broadcasts rank 0's each step, the other ranks' EMA updates
are discarded (untested beyond running). Condition dropout draws from each
rank's own RNG, so with cond_drop > 0 a DDP run is not bit-identical to a
single process (it is an equally valid sample of the same dropout).
"""
from __future__ import annotations

import dataclasses
import math
import os
import sys
import time

import torch

from nuwa3dna.model.cli.common import OneLineParser, check_positive, run_cli, set_threads
from nuwa3dna.model.cli.train_stages import Dist, build_stage, load_config, load_state, save_state

STAGES = ("tokenizer", "sketch-tokenizer", "nuwa")


def build_parser() -> OneLineParser:
    p = OneLineParser(prog="python -m nuwa3dna.train", description=__doc__.split("\n")[0])
    p.add_argument("stage", choices=STAGES)
    p.add_argument("--config", default=None, help="NuwaConfig JSON file (default: NuwaConfig())")
    p.add_argument("--out", required=True, help="run directory (checkpoints, stage outputs)")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--batch-size", type=int, default=16, help="per process")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default 1e-3 tokenizers, 5e-4 nuwa)")
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 5%% of --steps)")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--clip", type=float, default=1.0, help="gradient norm clipping (0 = off)")
    p.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw")
    p.add_argument("--ckpt-every", type=int, default=200)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK if available, else cpu")
    p.add_argument("--tokenizers", default=None, help="nuwa stage: dir with the tokenizer files (default --out)")
    p.add_argument("--export", default=None, help="nuwa stage: also save the pipeline here when it improved")
    p.add_argument("--init", default=None,
                   help="nuwa stage: start from this pipeline checkpoint (NuwaPipeline.save dir) instead of "
                        "fresh weights + --tokenizers (fine-tuning); its config is used")
    p.add_argument("--add-rotary", action="store_true",
                   help="nuwa stage with --init: give the loaded model's self-attention rotary positions "
                        "(new parameters at their standard init; every other weight kept)")
    p.add_argument("--tasks", default=None, help="nuwa stage: comma-separated subset of the tasks")
    p.add_argument("--task-weights", default=None, help="nuwa stage: comma-separated weights, one per task")
    p.add_argument("--data", default=None,
                   help="training data: a folder with captions.jsonl and images/GIF videos (model/datasets.py), "
                        "or 'procedural' (default: the moving-shapes generator, model/data.py)")
    p.add_argument("--max-objects", type=int, default=1, help="shapes per sample (procedural data)")
    p.add_argument("--holdout", default=None,
                   help="named set of colour-shape(-direction) combinations to keep out of all training "
                        "(model/holdout.py, e.g. combos-v1; recorded in the config; every stage must use it)")
    p.add_argument("--cond-drop", type=float, default=None, help="override config.cond_drop")
    p.add_argument("--motion-weight", type=float, default=None, help="override config.motion_weight")
    p.add_argument("--caption-contrast", type=float, default=0.0,
                   help="nuwa stage: weight of the loss that picks a t2v video's caption among its five "
                        "direction variants by the model's likelihood (0 = off)")
    p.add_argument("--random-masks", type=float, default=0.0,
                   help="nuwa stage: fraction of i2i steps with a random rectangular mask and of v2v steps "
                        "with a random number of given frames (default 0: the config's bottom half / frames)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--time-limit", type=float, default=None, help="stop (with a checkpoint) after this many seconds")
    return p


def lr_at(step: int, total: int, peak: float, warmup: int, min_ratio: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine from ``peak`` to ``min_ratio*peak``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


# ----------------------------------------------------------------------------- loop

def train(args) -> dict:
    check_positive(steps=args.steps, batch_size=args.batch_size)
    if not 0.0 <= args.random_masks <= 1.0:
        raise ValueError(f"--random-masks must be a fraction in [0, 1], got {args.random_masks}")
    set_threads(args.threads)
    config = load_config(args.config)
    if args.cond_drop is not None:
        config.cond_drop = float(args.cond_drop)
    if args.motion_weight is not None:
        config = dataclasses.replace(config, motion_weight=float(args.motion_weight))   # validates it
    if args.holdout is not None:
        config = dataclasses.replace(config, holdout=args.holdout)                      # validates it
    dist = Dist(args.device)
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(args.seed + 1000 * dist.rank)   # dropout / restarts: per-rank streams
    model, loss_mod, batch_fn, save_fn = build_stage(args, config, dist)
    params = [p for p in model.parameters() if p.requires_grad]
    peak = args.lr if args.lr is not None else (5e-4 if args.stage == "nuwa" else 1e-3)
    if args.optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=peak, betas=(0.9, 0.99), weight_decay=args.weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=peak, weight_decay=args.weight_decay)
    warmup = args.warmup if args.warmup is not None else max(1, args.steps // 20)
    step, ema, best_export = 0, None, float("inf")
    if args.resume:
        meta = load_state(args.out, args.stage, model, opt, dist.device)
        step, ema, best_export = meta["step"], meta.get("loss_ema"), meta.get("best_export", float("inf"))
    runner = dist.wrap(loss_mod, find_unused=args.stage == "nuwa")
    loss_mod.train()
    if args.stage == "nuwa":
        loss_mod.pipe.tokenizer.eval()
        loss_mod.pipe.sketch_tokenizer.eval()

    from tqdm import tqdm
    bar = tqdm(total=args.steps, initial=step, disable=args.no_progress or not dist.main,
               desc=args.stage, dynamic_ncols=True, file=sys.stderr)
    t0, first_loss, per_task = time.time(), None, {}

    def checkpoint(final=False):
        nonlocal best_export
        if dist.main:
            save_fn(final)
            if args.export and args.stage == "nuwa" and ema is not None and ema < best_export:
                loss_mod.pipe.save(args.export)
                best_export = ema
            save_state(args.out, args.stage, model, opt, step,
                       {"loss_ema": ema, "best_export": best_export, "stage": args.stage,
                        "config": config.to_dict()})
        dist.barrier()

    stopped_early = False
    while step < args.steps:
        lr = lr_at(step, args.steps, peak, warmup, args.min_lr_ratio)
        for g in opt.param_groups:
            g["lr"] = lr
        batch = batch_fn(step)
        loss, logs = runner(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if args.clip > 0:
            torch.nn.utils.clip_grad_norm_(params, args.clip)
        opt.step()
        step += 1
        val = float(loss.detach())
        if not math.isfinite(val):
            raise FloatingPointError(f"loss became {val} at step {step}; lower --lr")
        first_loss = val if first_loss is None else first_loss
        ema = val if ema is None else 0.98 * ema + 0.02 * val
        if "task" in batch:
            t = batch["task"]
            per_task[t] = val if t not in per_task else 0.9 * per_task[t] + 0.1 * val
        for k, v in logs.items():            # e.g. the caption-contrast loss, on the steps that have it
            per_task[k] = v if k not in per_task else 0.9 * per_task[k] + 0.1 * v
        bar.set_postfix(loss=f"{val:.4f}", ema=f"{ema:.4f}", lr=f"{lr:.2e}",
                        **{k: f"{v:.3g}" for k, v in logs.items()})
        bar.update(1)
        if step % args.ckpt_every == 0 or step == args.steps:
            checkpoint(final=step == args.steps)
            if dist.main:
                tasks_txt = " ".join(f"{k}={v:.3f}" for k, v in sorted(per_task.items()))
                bar.write(f"step {step}: loss={val:.4f} ema={ema:.4f} lr={lr:.2e} "
                          f"{time.time() - t0:.0f}s {tasks_txt}".rstrip())
        if args.time_limit is not None and time.time() - t0 > args.time_limit and step < args.steps:
            checkpoint()
            stopped_early = True
            break
    bar.close()
    elapsed = time.time() - t0
    summary = dict(stage=args.stage, steps=step, first_loss=first_loss, loss_ema=ema,
                   seconds=round(elapsed, 1), world_size=dist.world, out=args.out,
                   stopped_early=stopped_early, per_task=per_task)
    if dist.main:
        print(f"done: stage={args.stage} steps={step} loss {first_loss if first_loss is None else round(first_loss, 4)}"
              f" -> {ema if ema is None else round(ema, 4)} (smoothed) in {elapsed:.0f}s on {dist.world} process(es)"
              f"{' (time limit)' if stopped_early else ''}; saved to {args.out}", flush=True)
    dist.close()
    return summary


def main(argv=None) -> int:
    return run_cli(train, build_parser().parse_args(argv))
