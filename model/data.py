"""Procedural "moving shapes": NÜWA's training and evaluation data, made on the fly.

A sample is one to ``max_objects`` coloured shapes on a plain black background,
each moving in one direction by a fixed number of pixels per frame. Everything
is deterministic for ``(seed, index)`` (numpy ``default_rng([seed, index])``),
so rank ``r`` of a distributed run and a single process that reads the same
indices see identical samples, and no files are needed.

What a sample carries:

* ``video``: (T, 3, H, W) float32 in [0, 1]; images are 1-frame videos.
* ``sketch``: (T, H, W) long class map, 0 = background, ``1 + SHAPES.index(s)``
  where shape ``s`` is drawn (a sketch fixes layout and shape, not colour).
* ``caption``: "a red circle moves left" (videos), "a red circle" (images);
  several objects are joined with " and ".
* ``objects``: the ground-truth ``ShapeParams`` (colour, shape, direction,
  radius, integer centre per frame).

Manipulation pairs (``make_edit_pair``, model/edits.py, re-exported here)
change ONE attribute of one object and keep everything else.

Held-out compositions (model/holdout.py): ``DataConfig.exclude`` redraws every
sample holding one of its combinations; ``DataConfig.only`` makes the first
object one of them. Without either, every stream is exactly what it was.

Sizes (defaults for 32 x 32 px, scaled linearly with ``image_size``): radius
5-7 px, so the smallest shape still spans 2-3 tokens of a 4x-downsampling
tokenizer (8 x 8 tokens); 4 px per frame of motion - exactly one token of a
4x tokenizer, so a moving shape's tokens are the previous frame's shifted by
one (3 px, a sub-token shift, left the shipped model at 12-25% direction
accuracy after 5000 steps) - and 12 px over 4 frames, far above the oracle's
centroid noise. Big triangles (radius 7) do not fit a horizontal 12 px path
in 32 px frames and are then redrawn, so they only move vertically or stay.

Untested here: ``max_objects`` > 2 (placement may then fail to find room in
small frames and raises ValueError) and image sizes below 16 px.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

# Few, very distinct, saturated colours: the oracle assigns each pixel to the
# nearest of these, and a VQ tokenizer keeps them apart easily.
COLORS = {
    "red": (0.95, 0.15, 0.15),
    "green": (0.15, 0.85, 0.20),
    "blue": (0.20, 0.30, 1.00),
    "yellow": (0.95, 0.90, 0.15),
    "magenta": (0.90, 0.20, 0.90),
    "cyan": (0.15, 0.90, 0.90),
}
COLOR_NAMES: Tuple[str, ...] = tuple(COLORS)
BACKGROUND = (0.0, 0.0, 0.0)
SHAPES: Tuple[str, ...] = ("circle", "square", "triangle")
DIRECTIONS: Tuple[str, ...] = ("left", "right", "up", "down", "still")
DIAGONALS: Tuple[str, ...] = ("up-left", "up-right", "down-left", "down-right")
# (dx, dy) in pixels per unit of speed; y grows downwards (image rows).
DIRECTION_VECTORS = {
    "left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "still": (0, 0),
    "up-left": (-1, -1), "up-right": (1, -1), "down-left": (-1, 1), "down-right": (1, 1),
}
NUM_SKETCH_CLASSES = 1 + len(SHAPES)
EDIT_ATTRIBUTES: Tuple[str, ...] = ("color", "shape", "direction")


@dataclass(frozen=True)
class DataConfig:
    """Sizes of the generated data. ``radius`` and ``speed`` are in pixels at
    ``image_size`` = 32 and scale linearly with it."""
    image_size: int = 32
    frames: int = 4
    min_objects: int = 1
    max_objects: int = 1
    radius: Tuple[int, int] = (5, 7)
    speed: int = 4
    diagonals: bool = False
    # Held-out compositions (model/holdout.py): samples holding one of ``exclude`` are
    # redrawn; with ``only``, the first object is always one of them (evaluation).
    exclude: Tuple[Tuple[str, ...], ...] = ()
    only: Tuple[Tuple[str, ...], ...] = ()

    def __post_init__(self):
        for name in ("image_size", "frames", "min_objects", "max_objects", "speed"):
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"DataConfig.{name} must be a positive int, got {name}={val!r}")
        if self.image_size < 16:
            raise ValueError(f"DataConfig.image_size must be >= 16, got image_size={self.image_size}")
        if self.min_objects > self.max_objects:
            raise ValueError(f"min_objects > max_objects: {self.min_objects=}, {self.max_objects=}")
        if self.max_objects > len(COLORS):
            raise ValueError(f"max_objects must be <= {len(COLORS)} (objects get distinct colours), "
                             f"got max_objects={self.max_objects}")
        lo, hi = self.radius
        if not (1 <= lo <= hi):
            raise ValueError(f"radius must be (lo, hi) with 1 <= lo <= hi, got radius={self.radius}")
        for name in ("exclude", "only"):
            for combo in getattr(self, name):
                if not (isinstance(combo, tuple) and len(combo) in (2, 3) and combo[0] in COLORS
                        and combo[1] in SHAPES and (len(combo) == 2 or combo[2] in self.directions)):
                    raise ValueError(f"DataConfig.{name}: {combo!r} is not a (colour, shape[, direction]) "
                                     f"combination of this data")

    @property
    def directions(self) -> Tuple[str, ...]:
        return DIRECTIONS + (DIAGONALS if self.diagonals else ())

    @property
    def scale(self) -> float:
        return self.image_size / 32.0

    @property
    def px_speed(self) -> int:
        return max(1, round(self.speed * self.scale))

    @property
    def px_radius(self) -> Tuple[int, int]:
        lo, hi = self.radius
        return max(2, round(lo * self.scale)), max(2, round(hi * self.scale))

    @property
    def vocabulary(self) -> Tuple[str, ...]:
        """Every word a caption of this data can hold (a checkpoint's vocab.json)."""
        joined = ("and",) if self.max_objects > 1 else ()
        return tuple(sorted({"a", "moves", "stays", "still", *joined, *COLOR_NAMES, *SHAPES, *self.directions}))

    @classmethod
    def from_model_config(cls, config, **overrides) -> "DataConfig":
        """Sizes from a NuwaConfig-like object (``image_size``, ``frames``)."""
        kw = dict(image_size=int(config.image_size), frames=int(config.frames))
        kw.update(overrides)
        return cls(**kw)


@dataclass(frozen=True)
class ShapeParams:
    color: str
    shape: str
    direction: str
    radius: int
    positions: Tuple[Tuple[int, int], ...]   # integer (x, y) centre per frame

    @property
    def sketch_class(self) -> int:
        return 1 + SHAPES.index(self.shape)


@dataclass
class Sample:
    video: torch.Tensor          # (T, 3, H, W) float32 in [0, 1]
    sketch: torch.Tensor         # (T, H, W) long
    caption: str
    objects: Tuple[ShapeParams, ...]

    @property
    def frames(self) -> int:
        return self.video.shape[0]


# ----------------------------------------------------------------------------- rendering

def shape_mask(shape: str, cx: float, cy: float, r: float, size: int) -> np.ndarray:
    """Boolean (size, size) mask of one shape centred at pixel (cx, cy).

    Pixel centres are at integer + 0.5; all three shapes have their centroid at
    (cx + 0.5, cy + 0.5) in continuous coordinates, i.e. at pixel (cx, cy), so
    the oracle's centroid reads the stored position back directly.
    """
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
    dx, dy = xs - cx, ys - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r + 0.5 * r
    if shape == "square":
        # half side 0.85 r: area 2.9 r^2, close to the circle's 3.1 r^2.
        h = 0.85 * r
        return (np.abs(dx) <= h) & (np.abs(dy) <= h)
    if shape == "triangle":
        # Upward equilateral triangle with circumradius 1.35 r (area 2.4 r^2);
        # its centroid is the circumcentre (cx, cy).
        R = 1.35 * r
        top, base = -R, R / 2.0
        inside_y = (dy >= top) & (dy <= base)
        half_w = (dy - top) / (base - top) * (R * np.sqrt(3.0) / 2.0)
        return inside_y & (np.abs(dx) <= half_w)
    raise ValueError(f"unknown shape: {shape=}; expected one of {SHAPES}")


def shape_extent(shape: str, r: int) -> Tuple[int, int, int, int]:
    """How far (left, right, up, down) the shape reaches from its centre, in px."""
    if shape == "square":
        h = int(np.floor(0.85 * r))
        return h, h, h, h
    if shape == "triangle":
        R = 1.35 * r
        w = int(np.ceil(R * np.sqrt(3.0) / 2.0))
        return w, w, int(np.ceil(R)), int(np.ceil(R / 2.0))
    return r, r, r, r


def render(objects: Sequence[ShapeParams], size: int, frames: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Draw objects in order (later ones on top) -> (video (T,3,H,W), sketch (T,H,W))."""
    video = np.empty((frames, 3, size, size), dtype=np.float32)
    video[:] = np.asarray(BACKGROUND, dtype=np.float32)[None, :, None, None]
    sketch = np.zeros((frames, size, size), dtype=np.int64)
    for obj in objects:
        col = np.asarray(COLORS[obj.color], dtype=np.float32)
        for t in range(frames):
            cx, cy = obj.positions[t]
            m = shape_mask(obj.shape, cx, cy, obj.radius, size)
            video[t, :, m] = col[None, :]
            sketch[t, m] = obj.sketch_class
    return torch.from_numpy(video), torch.from_numpy(sketch)


def caption(objects: Sequence[ShapeParams], video: bool = True) -> str:
    parts = []
    for o in objects:
        text = f"a {o.color} {o.shape}"
        if video:
            text += " stays still" if o.direction == "still" else f" moves {o.direction}"
        parts.append(text)
    return " and ".join(parts)


def caption_variants(objects: Sequence[ShapeParams], attribute: str, values: Sequence[str],
                     video: bool = True) -> Tuple[List[str], int]:
    """Captions of ``objects`` with the first object's ``attribute`` set to each of
    ``values`` in turn, and the index of the true one: hard negatives that differ
    from the true caption in that word only (training's caption contrast)."""
    first = objects[0]
    true = getattr(first, attribute)
    if true not in values:
        raise ValueError(f"{attribute}={true!r} is not among {values=}")
    caps = [caption((replace(first, **{attribute: v}),) + tuple(objects[1:]), video) for v in values]
    return caps, list(values).index(true)


# ----------------------------------------------------------------------------- parameters

def _trajectory(start, direction, speed, frames):
    dx, dy = DIRECTION_VECTORS[direction]
    return tuple((start[0] + dx * speed * t, start[1] + dy * speed * t) for t in range(frames))


def _fits(shape, r, positions, size, margin=1) -> bool:
    left, right, up, down = shape_extent(shape, r)
    return all(x - left >= margin and x + right <= size - 1 - margin
               and y - up >= margin and y + down <= size - 1 - margin for x, y in positions)


def _start_range(shape, r, direction, speed, frames, size, margin=1):
    """Per axis, the inclusive range of start centres that keep every frame inside."""
    left, right, up, down = shape_extent(shape, r)
    dx, dy = DIRECTION_VECTORS[direction]
    span_x, span_y = dx * speed * (frames - 1), dy * speed * (frames - 1)
    x_lo, x_hi = margin + left - min(0, span_x), size - 1 - margin - right - max(0, span_x)
    y_lo, y_hi = margin + up - min(0, span_y), size - 1 - margin - down - max(0, span_y)
    return (x_lo, x_hi), (y_lo, y_hi)


def _box(o: ShapeParams, t: int):
    left, right, up, down = shape_extent(o.shape, o.radius)
    x, y = o.positions[t]
    return x - left, x + right, y - up, y + down


def _apart(a: ShapeParams, b: ShapeParams, gap: int = 1) -> bool:
    """Bounding boxes never touch in any frame (so each object stays fully visible)."""
    for t in range(len(a.positions)):
        al, ar, au, ad = _box(a, t)
        bl, br, bu, bd = _box(b, t)
        if al <= br + gap and bl <= ar + gap and au <= bd + gap and bu <= ad + gap:
            return False
    return True


def _sample_one(rng, cfg, frames, color, combo=None):
    """One object of ``color``; ``combo`` (colour, shape[, direction]) fixes its shape (and direction)."""
    lo, hi = cfg.px_radius
    for _ in range(100):
        shape = SHAPES[int(rng.integers(len(SHAPES)))] if combo is None else combo[1]
        if frames == 1:
            direction = "still"
        elif combo is not None and len(combo) == 3:
            direction = combo[2]
        else:
            direction = cfg.directions[int(rng.integers(len(cfg.directions)))]
        r = int(rng.integers(lo, hi + 1))
        (x_lo, x_hi), (y_lo, y_hi) = _start_range(shape, r, direction, cfg.px_speed, frames, cfg.image_size)
        if x_lo <= x_hi and y_lo <= y_hi:
            start = (int(rng.integers(x_lo, x_hi + 1)), int(rng.integers(y_lo, y_hi + 1)))
            return ShapeParams(color, shape, direction, r, _trajectory(start, direction, cfg.px_speed, frames))
    raise ValueError(f"no shape fits in {cfg.image_size}px frames with {cfg.radius=}, {cfg.speed=}")


def _held_out(objects, cfg: DataConfig, frames: int) -> bool:
    from nuwa3dna.model.holdout import any_match
    return bool(cfg.exclude) and any_match(objects, cfg.exclude, frames > 1)


def sample_objects(rng: np.random.Generator, cfg: DataConfig, frames: int) -> Tuple[ShapeParams, ...]:
    """Objects of one sample; without ``cfg.exclude``/``cfg.only`` the stream is as it always was."""
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    colors = [COLOR_NAMES[int(c)] for c in rng.permutation(len(COLOR_NAMES))[:n]]
    combo = None
    if cfg.only:
        combos = [c for c in cfg.only if frames > 1 or len(c) == 2]
        if not combos:
            raise ValueError(f"DataConfig.only holds no combination for images (pairs): {cfg.only}")
        combo = combos[int(rng.integers(len(combos)))]
        colors = [combo[0]] + [c for c in colors if c != combo[0]][:n - 1]
    # Whole-layout retries: a bad first object can leave no room for the rest.
    for _ in range(200):
        objects = []
        for k, c in enumerate(colors):
            obj = _sample_one(rng, cfg, frames, c, combo if k == 0 else None)
            if not all(_apart(obj, o) for o in objects):
                break
            objects.append(obj)
        else:
            if _held_out(objects, cfg, frames):
                continue
            return tuple(objects)
    raise ValueError(f"could not place {n} objects in {cfg.image_size}px frames; "
                     f"lower max_objects ({cfg.max_objects=}) or radius ({cfg.radius=})")


def _rng(seed: int, index: int) -> np.random.Generator:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed=}")
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
        raise ValueError(f"index must be an int >= 0, got {index=}")
    return np.random.default_rng([int(seed), int(index)])


def sample_from_objects(objects: Sequence[ShapeParams], cfg: DataConfig, frames: int) -> Sample:
    video, sketch = render(objects, cfg.image_size, frames)
    return Sample(video, sketch, caption(objects, video=frames > 1), tuple(objects))


def make_sample(seed: int, index: int = 0, cfg: DataConfig = DataConfig(),
                frames: Optional[int] = None) -> Sample:
    """Sample ``index`` of the stream ``seed``; ``frames=1`` gives an image."""
    frames = cfg.frames if frames is None else frames
    objects = sample_objects(_rng(seed, index), cfg, frames)
    return sample_from_objects(objects, cfg, frames)


# ----------------------------------------------------------------------------- batches

def make_batch(batch_size: int, seed: int, start: int = 0, cfg: DataConfig = DataConfig(),
               frames: Optional[int] = None) -> dict:
    """Samples ``start .. start+batch_size-1`` of stream ``seed``, stacked:
    ``video`` (B,T,3,H,W) float, ``sketch`` (B,T,H,W) long, ``text`` list[str],
    ``samples`` (the Sample objects, for ground truth)."""
    samples = [make_sample(seed, start + i, cfg, frames) for i in range(batch_size)]
    return dict(video=torch.stack([s.video for s in samples]),
                sketch=torch.stack([s.sketch for s in samples]),
                text=[s.caption for s in samples], samples=samples)


# Manipulation pairs live in model/edits.py; imported here (at the end: edits imports this module)
# so ``data.make_edit_pair`` and friends keep working.
from nuwa3dna.model.edits import EditPair, edit_objects, make_edit_batch, make_edit_pair  # noqa: E402,F401
