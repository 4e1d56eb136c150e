"""The parts of ``python -m nuwa3dna.train`` (model/cli/train.py): the config, the
processes (DDP), each stage's model, data and outputs, and the resumable training state.

Weights and state are written with model/weights.py (safetensors + JSON,
atomic, never pickle).
"""
from __future__ import annotations

import json
import os
from typing import Dict, Optional, Tuple

import numpy as np
import torch
from torch import nn

from nuwa3dna.model.cli.common import check_device, parse_tasks
from nuwa3dna.model.weights import load_module, load_tensors, module_tensors, save_json, save_module, save_tensors

STATE_FILE = "train_state_{stage}.safetensors"   # one per stage: stages may share --out
STATE_JSON = "train_state_{stage}.json"
TOKENIZER_FILE = "tokenizer.safetensors"
SKETCH_TOKENIZER_FILE = "sketch_tokenizer.safetensors"


def load_config(path: Optional[str]):
    from nuwa3dna.model.config import NuwaConfig
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


class Dist:
    """Rank, world size and device of this process; DDP set up when WORLD_SIZE > 1."""

    def __init__(self, device: Optional[str]):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device is None:
            device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(check_device(device))
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


def direction_variants(objects, data_cfg):
    """(B lists of caption variants over ``data_cfg.directions``, (B,) long true index)."""
    from nuwa3dna.model.data import caption_variants
    pairs = [caption_variants(objs, "direction", data_cfg.directions) for objs in objects]
    return [p[0] for p in pairs], torch.tensor([p[1] for p in pairs], dtype=torch.long)


def task_schedule(tasks_text: Optional[str], weights_text: Optional[str], available=None):
    """(tasks, probabilities) from --tasks and --task-weights (default: every task ``available``)."""
    tasks = parse_tasks(tasks_text)
    if available is not None:
        bad = [t for t in tasks if t not in available]
        if tasks_text is None:
            tasks = tuple(t for t in tasks if t in available)
        elif bad:
            raise ValueError(f"--data cannot train task(s) {bad}; it can train {', '.join(available)}")
    if weights_text is None:
        w = np.ones(len(tasks))
    else:
        w = np.asarray([float(x) for x in weights_text.split(",")])
        if len(w) != len(tasks) or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"--task-weights needs {len(tasks)} non-negative weights, got {weights_text!r}")
    return tasks, w / w.sum()


def build_stage(args, config, dist: Dist):
    """-> (trainable module, loss module, batch_fn(step) -> batch, save_fn(final: bool))."""
    from nuwa3dna.model.data import DataConfig
    from nuwa3dna.model.datasets import make_dataset
    from nuwa3dna.model.tasks import TASKS
    from nuwa3dna.model.holdout import holdout_combos
    data_cfg = DataConfig.from_model_config(config, max_objects=args.max_objects,
                                            exclude=holdout_combos(config.holdout))
    B = args.batch_size
    if args.data not in (None, "procedural") and not os.path.isdir(args.data):
        raise FileNotFoundError(f"--data: no such folder {args.data!r} (a folder with captions.jsonl, "
                                f"or 'procedural')")

    def start_of(step):
        return step * B * dist.world + dist.rank * B

    if args.stage in ("tokenizer", "sketch-tokenizer"):
        from nuwa3dna.model.vq import SketchTokenizer, VQTokenizer
        dataset = make_dataset(args.data, config, data_cfg)
        if args.stage == "tokenizer":
            tok, key, fname, stream = VQTokenizer.from_config(config), "video", TOKENIZER_FILE, 900
        else:
            tok, key, fname, stream = SketchTokenizer.from_config(config), "sketch", SKETCH_TOKENIZER_FILE, 901
        stream += args.seed * 1000
        tok.to(dist.device)

        def batch_fn(step):
            return {key: dataset.tokenizer_batch(key, B, stream, start_of(step), dist.device)}

        def save_fn(final):
            save_module(tok, os.path.join(args.out, fname), {"config": config.to_dict()})
        return tok, _TokenizerLoss(tok, key), batch_fn, save_fn

    from nuwa3dna.model.masks import random_layout
    from nuwa3dna.model.pipeline import NuwaPipeline
    from nuwa3dna.model.vq import SketchTokenizer, VQTokenizer
    if args.data is not None and args.caption_contrast > 0:
        raise ValueError("--caption-contrast needs the procedural data (its captions' direction variants)")
    parse_tasks(args.tasks)                  # names checked before any loading
    if args.init is not None:
        pipe = NuwaPipeline.load(args.init, map_location=str(dist.device))
        if pipe.config.holdout != config.holdout:
            raise ValueError(f"--init {args.init!r} was trained with held-out set {pipe.config.holdout!r}, "
                             f"this run asks for {config.holdout!r}: a fine-tune cannot un-see combinations; "
                             f"train every stage from scratch with --holdout")
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
        for mod, fname in ((tok, TOKENIZER_FILE), (sk, SKETCH_TOKENIZER_FILE)):
            load_module(mod, os.path.join(tok_dir, fname))
            seen = _trained_holdout(os.path.join(tok_dir, fname))
            if seen != config.holdout:
                raise ValueError(f"{fname} in {tok_dir!r} was trained with held-out set {seen!r}, this run "
                                 f"asks for {config.holdout!r}: train the tokenizers with the same --holdout")
        pipe = NuwaPipeline(config=config, tokenizer=tok, sketch_tokenizer=sk).to(dist.device)
    pipe.tokenizer.requires_grad_(False).eval()
    pipe.sketch_tokenizer.requires_grad_(False).eval()
    dataset = make_dataset(args.data, pipe.config, data_cfg)
    tasks, weights = task_schedule(args.tasks, args.task_weights, dataset.tasks)
    # What the model has now seen: the words of its earlier data (--init) and of this one.
    pipe.vocabulary = tuple(sorted(set(pipe.vocabulary or ()) | set(dataset.vocabulary)))

    def batch_fn(step):
        # Same task on every rank: drawn from (seed, step) only.
        task = tasks[int(np.random.default_rng([args.seed, step, 7]).choice(len(tasks), p=weights))]
        stream = args.seed * 1000 + TASKS.index(task)
        inputs = dataset.task_inputs(task, B, stream, start_of(step), dist.device)
        objects = inputs.pop("objects", None)          # ground truth, not a model input
        rng = np.random.default_rng([args.seed, step, 11])
        if args.random_masks > 0 and task in ("i2i", "v2v") and rng.random() < args.random_masks:
            inputs.update(random_layout(task, pipe.config, rng))
        out = {"task": task, "inputs": inputs}
        if args.caption_contrast > 0 and task == "t2v":
            out["variants"], out["labels"] = direction_variants(objects, data_cfg)
        return out

    def save_fn(final):
        pipe.save(args.out)
    return pipe.nuwa, _NuwaLoss(pipe, args.caption_contrast), batch_fn, save_fn


def _trained_holdout(path: str) -> str:
    """The held-out set recorded in a tokenizer file's config metadata ('' if none)."""
    from safetensors import safe_open
    with safe_open(path, "pt") as fh:
        meta = fh.metadata() or {}
    try:
        return json.loads(meta.get("config", "{}")).get("holdout", "")
    except (ValueError, AttributeError):
        return ""


# ----------------------------------------------------------------------------- training state

def _state_paths(out: str, stage: str) -> Tuple[str, str]:
    return (os.path.join(out, STATE_FILE.format(stage=stage)), os.path.join(out, STATE_JSON.format(stage=stage)))


def save_state(out: str, stage: str, model: nn.Module, opt: torch.optim.Optimizer, step: int, extra: dict) -> None:
    """Model and optimiser tensors to STATE_FILE, step, param groups and ``extra`` to STATE_JSON."""
    tensors = module_tensors(model, prefix="model.")
    sd = opt.state_dict()
    for pid, st in sd["state"].items():
        for name, val in st.items():
            t = val if isinstance(val, torch.Tensor) else torch.tensor(val)
            tensors[f"opt.{pid}.{name}"] = t.detach().cpu().contiguous().clone()
    groups = [dict(g) for g in sd["param_groups"]]
    path, jpath = _state_paths(out, stage)
    save_tensors(path, tensors)
    save_json(jpath, {"step": step, "param_groups": groups, **extra})
def load_state(out: str, stage: str, model: nn.Module, opt: torch.optim.Optimizer, device) -> dict:
    path, jpath = _state_paths(out, stage)
    if not (os.path.isfile(path) and os.path.isfile(jpath)):
        raise FileNotFoundError(f"--resume: no {stage} checkpoint in {out!r} ({path}, {jpath})")
    try:
        tensors = load_tensors(path, device)
        with open(jpath) as fh:
            meta = json.load(fh)
    except (ValueError, OSError) as e:
        raise ValueError(f"--resume: corrupt checkpoint in {out!r}: {e}") from None
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    state: Dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, pid, name = k.split(".", 2)
            state.setdefault(int(pid), {})[name] = v.cpu() if name == "step" else v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return meta

