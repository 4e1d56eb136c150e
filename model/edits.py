"""Manipulation pairs of the procedural data (model/data.py): a source and a target that differ in ONE attribute.

``make_edit_pair`` changes one attribute of one object - colour, shape or
(videos only) direction - and keeps everything else (start position, size,
other objects). The edit text is the caption of the TARGET ("a blue circle
moves left" when the source was "a red circle moves left"): the model sees the
source pixels plus the description of the wanted result. Pairs whose source
or target holds a held-out combination (``DataConfig.exclude``) are redrawn.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Sequence, Tuple

import numpy as np
import torch

from nuwa3dna.model.data import (COLOR_NAMES, EDIT_ATTRIBUTES, SHAPES, DataConfig, Sample, ShapeParams, _apart,
                                 _fits, _held_out, _rng, _trajectory, sample_from_objects, sample_objects)


@dataclass
class EditPair:
    source: Sample
    target: Sample
    text: str                    # the target's caption
    attribute: str               # "color", "shape" or "direction"


def edit_objects(objects: Sequence[ShapeParams], attribute: str, rng: np.random.Generator,
                 cfg: DataConfig, frames: int) -> Optional[Tuple[ShapeParams, ...]]:
    """Change ``attribute`` of one object; None if no valid change exists."""
    i = int(rng.integers(len(objects)))
    obj = objects[i]
    others = objects[:i] + objects[i + 1:]
    if attribute == "color":
        used = {o.color for o in objects}
        choices = [c for c in COLOR_NAMES if c not in used]
        new = replace(obj, color=choices[int(rng.integers(len(choices)))]) if choices else None
    elif attribute == "shape":
        choices = [s for s in SHAPES if s != obj.shape
                   and _fits(s, obj.radius, obj.positions, cfg.image_size)]
        new = replace(obj, shape=choices[int(rng.integers(len(choices)))]) if choices else None
    elif attribute == "direction":
        if frames < 2:
            return None
        choices = []
        for d in cfg.directions:
            if d == obj.direction:
                continue
            cand = replace(obj, direction=d, positions=_trajectory(obj.positions[0], d, cfg.px_speed, frames))
            if _fits(cand.shape, cand.radius, cand.positions, cfg.image_size):
                choices.append(cand)
        new = choices[int(rng.integers(len(choices)))] if choices else None
    else:
        raise ValueError(f"unknown edit attribute: {attribute=}; expected one of {EDIT_ATTRIBUTES}")
    if new is None or not all(_apart(new, o) for o in others):
        return None
    out = objects[:i] + (new,) + objects[i + 1:]
    return None if _held_out(out, cfg, frames) else out


def make_edit_pair(seed: int, index: int = 0, cfg: DataConfig = DataConfig(),
                   frames: Optional[int] = None, attributes: Optional[Sequence[str]] = None) -> EditPair:
    """Source sample and a target differing in one attribute (direction only
    for videos); ``text`` is the target's caption."""
    frames = cfg.frames if frames is None else frames
    if attributes is None:
        attributes = EDIT_ATTRIBUTES if frames > 1 else ("color", "shape")
    for a in attributes:
        if a not in EDIT_ATTRIBUTES:
            raise ValueError(f"unknown edit attribute: {a=}; expected one of {EDIT_ATTRIBUTES}")
    rng = _rng(seed, index)
    objects = sample_objects(rng, cfg, frames)
    for _ in range(100):
        attribute = attributes[int(rng.integers(len(attributes)))]
        new = edit_objects(objects, attribute, rng, cfg, frames)
        if new is not None:
            break
        objects = sample_objects(rng, cfg, frames)
    else:
        raise ValueError(f"no valid edit of {attributes=} found for {seed=}, {index=}")
    source = sample_from_objects(objects, cfg, frames)
    target = sample_from_objects(new, cfg, frames)
    return EditPair(source, target, target.caption, attribute)


def held_out_edit_pair(seed: int, index: int, cfg: DataConfig, frames: Optional[int] = None,
                       attributes=None) -> EditPair:
    """An edit pair whose TARGET holds one of ``cfg.only`` (held-out combinations): the first
    pair of the stream (seed, index * 4096 + k), k = 0, 1, ..., that does."""
    from nuwa3dna.model.holdout import any_match
    frames = cfg.frames if frames is None else frames
    base = replace(cfg, only=())
    for k in range(4096):
        pair = make_edit_pair(seed, index * 4096 + k, base, frames, attributes)
        if any_match(pair.target.objects, cfg.only, frames > 1):
            return pair
    raise ValueError(f"no edit pair with a target in {cfg.only} found for {seed=}, {index=}")


def make_edit_batch(batch_size: int, seed: int, start: int = 0, cfg: DataConfig = DataConfig(),
                    frames: Optional[int] = None, attributes=None) -> dict:
    """Edit pairs stacked: ``source``/``target`` (B,T,3,H,W), ``text`` (target
    captions), ``pairs`` (the EditPair objects)."""
    make = held_out_edit_pair if cfg.only else make_edit_pair
    pairs = [make(seed, start + i, cfg, frames, attributes) for i in range(batch_size)]
    return dict(source=torch.stack([p.source.video for p in pairs]),
                target=torch.stack([p.target.video for p in pairs]),
                text=[p.text for p in pairs], pairs=pairs)
