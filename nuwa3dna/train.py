"""Train the small NÜWA on procedural "moving shapes" (model/data.py), in three stages.

    python -m nuwa3dna.train tokenizer        --out RUN --steps 800
    python -m nuwa3dna.train sketch-tokenizer --out RUN --steps 400
    python -m nuwa3dna.train nuwa             --out RUN --steps 3000 --export model/checkpoints/default

(model/checkpoints/TRAINING.md has the exact recipe of the shipped checkpoint.)
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

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from typing import Callable, Dict, Optional

import numpy as np
import torch
from torch import nn

STAGES = ("tokenizer", "sketch-tokenizer", "nuwa")
STATE_FILE = "train_state_{stage}.safetensors"   # one per stage: stages may share --out
STATE_JSON = "train_state_{stage}.json"
TOKENIZER_FILE = "tokenizer.safetensors"
SKETCH_TOKENIZER_FILE = "sketch_tokenizer.safetensors"


# ----------------------------------------------------------------------------- arguments

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m nuwa3dna.train", description=__doc__.split("\n")[0])
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
    p.add_argument("--max-objects", type=int, default=1, help="shapes per sample (data)")
    p.add_argument("--cond-drop", type=float, default=None, help="override config.cond_drop")
    p.add_argument("--motion-weight", type=float, default=None, help="override config.motion_weight")
    p.add_argument("--caption-contrast", type=float, default=0.0,
                   help="nuwa stage: weight of the loss that picks a t2v video's caption among its five "
                        "direction variants by the model's likelihood (0 = off)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--time-limit", type=float, default=None, help="stop (with a checkpoint) after this many seconds")
    return p


# ----------------------------------------------------------------------------- helpers

def load_config(path: Optional[str]):
    from .model.config import NuwaConfig
    if path is None:
        return NuwaConfig()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path!r}")
    with open(path) as fh:
        try:
            d = json.load(fh)
        except json.JSONDecodeError as e:
            raise ValueError(f"config file {path!r} is not valid JSON: {e}") from None
    return NuwaConfig.from_dict(d)


def lr_at(step: int, total: int, peak: float, warmup: int, min_ratio: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine from ``peak`` to ``min_ratio*peak``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def save_module(module: nn.Module, path: str, meta: Optional[dict] = None) -> None:
    from safetensors.torch import save_file
    state = {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}
    tmp = path + ".tmp"
    save_file(state, tmp, metadata={k: json.dumps(v) for k, v in (meta or {}).items()})
    os.replace(tmp, path)


def load_module(module: nn.Module, path: str) -> None:
    from safetensors.torch import load_file
    if not os.path.isfile(path):
        raise FileNotFoundError(f"missing weights file {path!r} (train that stage first)")
    try:
        state = load_file(path)
    except Exception as e:
        raise ValueError(f"corrupt weights file {path!r}: {e}") from None
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"weights file {path!r} does not match the config: {str(e)[:300]}") from None


class Dist:
    """Rank, world size and device of this process; DDP set up when WORLD_SIZE > 1."""

    def __init__(self, device: Optional[str]):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device is None:
            device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.world > 1 and not torch.distributed.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            torch.distributed.init_process_group(backend=backend)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def wrap(self, module: nn.Module, find_unused: bool = False) -> nn.Module:
        if self.world == 1:
            return module
        from torch.nn.parallel import DistributedDataParallel as DDP
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DDP(module, device_ids=ids, find_unused_parameters=find_unused)

    def barrier(self):
        if self.world > 1:
            torch.distributed.barrier()

    def close(self):
        if self.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


# ----------------------------------------------------------------------------- stages

class _TokenizerLoss(nn.Module):
    """forward(batch) -> (loss, logs) for either tokenizer (DDP needs a forward)."""

    def __init__(self, tok: nn.Module, key: str):
        super().__init__()
        self.tok, self.key = tok, key

    def forward(self, batch: Dict):
        _, losses = self.tok(batch[self.key])
        return losses["total"], {"recon": float(losses["recon"].detach()), "ppl": float(losses["perplexity"])}


class _NuwaLoss(nn.Module):
    """Next-token loss, plus ``contrast`` x the caption-contrast loss on batches that carry
    caption variants (``--caption-contrast``)."""

    def __init__(self, pipe: nn.Module, contrast: float = 0.0):
        super().__init__()
        self.pipe, self.contrast = pipe, contrast

    def forward(self, batch: Dict):
        loss = self.pipe.training_loss(batch["task"], batch["inputs"])
        if self.contrast > 0 and "variants" in batch:
            c = self.pipe.caption_contrast_loss(batch["task"], batch["inputs"], batch["variants"], batch["labels"])
            return loss + self.contrast * c, {"contrast": float(c.detach())}
        return loss, {}


def task_inputs(task: str, batch_size: int, seed: int, start: int, data_cfg, device) -> Dict:
    """One task's training inputs (``TRAIN_INPUTS`` keys) from the data stream
    (seed, task) at sample indices ``start .. start + batch_size - 1``."""
    from .model import data
    from .model.tasks import IMAGE_TASKS, SOURCE_TASKS, TASKS
    frames = 1 if task in IMAGE_TASKS else data_cfg.frames
    stream = seed * 1000 + TASKS.index(task)
    if task in SOURCE_TASKS:
        b = data.make_edit_batch(batch_size, stream, start, data_cfg, frames)
        return dict(text=b["text"], source=b["source"].to(device), target=b["target"].to(device))
    b = data.make_batch(batch_size, stream, start, data_cfg, frames)
    out = dict(target=b["video"].to(device))
    if task in ("t2i", "t2v"):
        out["text"] = b["text"]
        out["objects"] = [smp.objects for smp in b["samples"]]
    if task in ("s2i", "s2v"):
        out["sketch"] = b["sketch"].to(device)
    return out


def direction_variants(objects, data_cfg):
    """(B lists of caption variants over ``data_cfg.directions``, (B,) long true index)."""
    from .model.data import caption_variants
    pairs = [caption_variants(objs, "direction", data_cfg.directions) for objs in objects]
    return [p[0] for p in pairs], torch.tensor([p[1] for p in pairs], dtype=torch.long)


def _task_schedule(args, tasks_all):
    tasks = tuple(tasks_all) if args.tasks is None else tuple(t.strip() for t in args.tasks.split(","))
    for t in tasks:
        if t not in tasks_all:
            raise ValueError(f"unknown task in --tasks: {t!r}; choose from {tasks_all}")
    if args.task_weights is None:
        w = np.ones(len(tasks))
    else:
        w = np.asarray([float(x) for x in args.task_weights.split(",")])
        if len(w) != len(tasks) or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"--task-weights needs {len(tasks)} non-negative weights, got {args.task_weights!r}")
    return tasks, w / w.sum()


def build_stage(args, config, dist: Dist):
    """-> (trainable module, loss module, batch_fn(step) -> batch, save_fn(final: bool))."""
    from .model.data import DataConfig
    data_cfg = DataConfig.from_model_config(config, max_objects=args.max_objects)
    B = args.batch_size

    def start_of(step):
        return step * B * dist.world + dist.rank * B

    if args.stage in ("tokenizer", "sketch-tokenizer"):
        from .model import data
        from .model.vq import SketchTokenizer, VQTokenizer
        if args.stage == "tokenizer":
            tok, key, fname, stream = VQTokenizer.from_config(config), "video", TOKENIZER_FILE, args.seed * 1000 + 900
        else:
            tok, key, fname, stream = SketchTokenizer.from_config(config), "sketch", SKETCH_TOKENIZER_FILE, args.seed * 1000 + 901
        tok.to(dist.device)

        def batch_fn(step):
            b = data.make_batch(B, stream, start_of(step), data_cfg)
            return {key: b[key].to(dist.device)}

        def save_fn(final):
            save_module(tok, os.path.join(args.out, fname), {"config": config.to_dict()})
        return tok, _TokenizerLoss(tok, key), batch_fn, save_fn

    from .model.pipeline import NuwaPipeline
    from .model.tasks import TASKS
    from .model.vq import SketchTokenizer, VQTokenizer
    if args.init is not None:
        pipe = NuwaPipeline.load(args.init, map_location=str(dist.device))
        if args.add_rotary:
            pipe = pipe.with_rotary()
        pipe.config.cond_drop = config.cond_drop
        if args.motion_weight is not None:
            pipe.config.motion_weight = config.motion_weight
    else:
        if args.add_rotary:
            raise ValueError("--add-rotary needs --init (a fresh model takes rotary from its --config)")
        tok_dir = args.tokenizers or args.out
        tok, sk = VQTokenizer.from_config(config), SketchTokenizer.from_config(config)
        load_module(tok, os.path.join(tok_dir, TOKENIZER_FILE))
        load_module(sk, os.path.join(tok_dir, SKETCH_TOKENIZER_FILE))
        pipe = NuwaPipeline(config=config, tokenizer=tok, sketch_tokenizer=sk).to(dist.device)
    pipe.tokenizer.requires_grad_(False).eval()
    pipe.sketch_tokenizer.requires_grad_(False).eval()
    tasks, weights = _task_schedule(args, TASKS)

    def batch_fn(step):
        # Same task on every rank: drawn from (seed, step) only.
        task = tasks[int(np.random.default_rng([args.seed, step, 7]).choice(len(tasks), p=weights))]
        inputs = task_inputs(task, B, args.seed, start_of(step), data_cfg, dist.device)
        objects = inputs.pop("objects", None)          # ground truth, not a model input
        out = {"task": task, "inputs": inputs}
        if args.caption_contrast > 0 and task == "t2v":
            out["variants"], out["labels"] = direction_variants(objects, data_cfg)
        return out

    def save_fn(final):
        pipe.save(args.out)
    return pipe.nuwa, _NuwaLoss(pipe, args.caption_contrast), batch_fn, save_fn


# ----------------------------------------------------------------------------- checkpoints

def _state_paths(out: str, stage: str):
    return (os.path.join(out, STATE_FILE.format(stage=stage)), os.path.join(out, STATE_JSON.format(stage=stage)))


def save_state(out: str, stage: str, model: nn.Module, opt: torch.optim.Optimizer, step: int, extra: dict) -> None:
    from safetensors.torch import save_file
    tensors = {f"model.{k}": v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    sd = opt.state_dict()
    for pid, st in sd["state"].items():
        for name, val in st.items():
            t = val if isinstance(val, torch.Tensor) else torch.tensor(val)
            tensors[f"opt.{pid}.{name}"] = t.detach().cpu().contiguous().clone()
    groups = [{k: v for k, v in g.items()} for g in sd["param_groups"]]
    path, jpath = _state_paths(out, stage)
    save_file(tensors, path + ".tmp")
    os.replace(path + ".tmp", path)
    with open(jpath + ".tmp", "w") as fh:
        json.dump({"step": step, "param_groups": groups, **extra}, fh, indent=1)
    os.replace(jpath + ".tmp", jpath)


def load_state(out: str, stage: str, model: nn.Module, opt: torch.optim.Optimizer, device) -> dict:
    from safetensors.torch import load_file
    path, jpath = _state_paths(out, stage)
    if not (os.path.isfile(path) and os.path.isfile(jpath)):
        raise FileNotFoundError(f"--resume: no {stage} checkpoint in {out!r} ({path}, {jpath})")
    try:
        tensors = load_file(path, device=str(device))
        with open(jpath) as fh:
            meta = json.load(fh)
    except Exception as e:
        raise ValueError(f"--resume: corrupt checkpoint in {out!r}: {e}") from None
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    state: Dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, pid, name = k.split(".", 2)
            state.setdefault(int(pid), {})[name] = v.cpu() if name == "step" else v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return meta


# ----------------------------------------------------------------------------- loop

def train(args) -> dict:
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.threads:
        torch.set_num_threads(args.threads)
    config = load_config(args.config)
    if args.cond_drop is not None:
        config.cond_drop = float(args.cond_drop)
    if args.motion_weight is not None:
        config = dataclasses.replace(config, motion_weight=float(args.motion_weight))   # validates it
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
    args = build_parser().parse_args(argv)
    try:
        train(args)
    except (ValueError, TypeError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
