"""``NuwaConfig``: every size of the small NÜWA in one keyword-only dataclass.

The defaults are the shipped model: 32 x 32 px frames, 4 frames, a 4x
downsampling VQ tokenizer (8 x 8 tokens per frame, 256 codes), dim 128, 2+2
encoder layers (text, visual) and 4 decoder layers. That trains on 2 CPU cores
in tens of minutes and samples a 256-token video in a few seconds.

Extents are per modality and per axis (t, h, w), radii as in docs/design.md
(None = the whole axis). An extent on an axis of size 1 (an image's time axis,
text's t and h axes) is capped to 0 by 3DNA itself, so image and video targets
share the decoder's self-attention extent's meaning.

Untested: configs whose token grids exceed ~64 x 64 (only memory grows).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Optional, Tuple

from nuwa3dna.checks import BACKENDS, check_extent

Extent3 = Tuple[Optional[int], Optional[int], Optional[int]]


def _default_sketch_classes() -> int:
    """The data module's class count (background + shapes); 8 if it is absent.

    Imported lazily, at instantiation, so config.py and data.py never import
    each other at module load time.
    """
    try:
        from nuwa3dna.model.data import NUM_SKETCH_CLASSES
        return int(NUM_SKETCH_CLASSES)
    except ImportError:
        return 8


EXTENT_FIELDS = ("text_extent", "sketch_extent", "source_extent", "image_extent", "video_extent",
                 "cross_text_extent", "cross_sketch_extent", "cross_source_extent")


@dataclass(kw_only=True)
class NuwaConfig:
    # ---- pixels -------------------------------------------------------------------
    image_size: int = 32          # frames are image_size x image_size RGB, values in [0, 1]
    frames: int = 4               # frames of a video task's output
    # ---- visual VQ tokenizer (per frame) -------------------------------------------
    vq_downsample: int = 4        # power of 2; token grid = image_size / vq_downsample per side
    vq_hidden: int = 64           # conv channels
    vq_codebook_size: int = 256
    vq_codebook_dim: int = 32
    vq_beta: float = 0.25         # commitment weight (VQ-VAE paper value)
    vq_ema_decay: float = 0.99
    vq_restart_threshold: float = 1.0   # EMA usage (vectors/step) below which a code is restarted
    # ---- sketch tokenizer (class maps) ---------------------------------------------
    sketch_classes: int = field(default_factory=_default_sketch_classes)
    sketch_downsample: int = 4
    sketch_hidden: int = 32
    sketch_codebook_size: int = 64
    sketch_codebook_dim: int = 16
    # ---- text ---------------------------------------------------------------------
    text_len: int = 40            # bytes: the longest caption ("a magenta triangle moves down-right") is 35
    # ---- transformer --------------------------------------------------------------
    dim: int = 128
    enc_depth: int = 2            # layers of EACH encoder (text, visual condition)
    dec_depth: int = 4
    heads: int = 4
    dim_head: int = 32
    # Grouped kv heads of every attention (None: heads; 1 is MQA): a KV cache 1/(heads/kv_heads) the size.
    kv_heads: Optional[int] = None
    # The decoder's text cross-attention folded into its self-attention: the text memory as
    # global tokens of the self-attention's softmax (docs/design.md section 8), one call fewer per layer.
    text_global: bool = False
    ff_mult: int = 4
    backend: str = "auto"         # nearby_attention backend of every 3DNA layer
    rotary: bool = True           # learned 3D rotary positions in every self-attention (nuwa3dna.rotary);
                                  # without them v2v position error was 2.3 px, with them 0.85 px (TRAINING.md)
    # ---- extents (radius per axis t, h, w) ------------------------------------------
    text_extent: Extent3 = (0, 0, None)          # encoder self-attention over text (1, 1, L)
    sketch_extent: Extent3 = (1, 2, 2)           # encoder self-attention over sketch tokens
    source_extent: Extent3 = (1, 3, 3)           # encoder self-attention over source image/video tokens
    image_extent: Extent3 = (0, 3, 3)            # decoder causal self-attention, image targets
    video_extent: Extent3 = (1, 3, 3)            # decoder causal self-attention, video targets
    cross_text_extent: Extent3 = (0, 0, None)    # decoder -> text: the whole text
    cross_sketch_extent: Extent3 = (1, 2, 2)     # decoder -> sketch (rescaled centres)
    cross_source_extent: Extent3 = (1, 2, 2)     # decoder -> source image/video (ti2i, tv2v)
    # ---- tasks / training -----------------------------------------------------------
    i2i_given_rows: int = 4       # i2i: token rows kept from the top (4 of 8 = top 16 px)
    v2v_given_frames: int = 1     # v2v: frames given, the rest predicted
    cond_drop: float = 0.1        # train-time condition dropout (classifier-free guidance)
    # Video targets: cross-entropy weight of a token whose code differs from the
    # same position one frame earlier (the moving edges). Direction lives only
    # there: a few of a 4 x 8 x 8 video's 256 tokens, at most log 5 = 1.6 nats of a
    # ~95-nat video; before rotary+weighting, swapping the caption's direction
    # moved the loss by 0.2 nats (measured, TRAINING.md).
    motion_weight: float = 1.0
    # Named set of colour-shape(-direction) combinations kept out of all training
    # (model/holdout.py; "" = none); evaluate scores them as "held-out combinations".
    holdout: str = ""

    def __post_init__(self):
        for name in EXTENT_FIELDS:
            v = getattr(self, name)
            if isinstance(v, list):          # from JSON
                v = tuple(v)
                setattr(self, name, v)
            if not isinstance(v, tuple):
                raise ValueError(f"{name} must be a 3-tuple (t, h, w) of int >= 0 or None, got {name}={v!r}")
            try:
                check_extent(v)
            except (TypeError, ValueError) as e:
                raise type(e)(f"{name}: {e}") from None
        ints_pos = ("image_size", "frames", "vq_downsample", "vq_hidden", "vq_codebook_size",
                    "vq_codebook_dim", "sketch_downsample", "sketch_hidden", "sketch_codebook_size",
                    "sketch_codebook_dim", "text_len", "dim", "dec_depth", "heads", "dim_head",
                    "ff_mult", "enc_depth", "v2v_given_frames")
        for name in ints_pos:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {name}={v!r}")
        if isinstance(self.sketch_classes, bool) or not isinstance(self.sketch_classes, int) \
                or self.sketch_classes < 2:
            raise ValueError(f"sketch_classes must be an int >= 2, got {self.sketch_classes=}")
        for name in ("vq_downsample", "sketch_downsample"):
            d = getattr(self, name)
            if d & (d - 1):
                raise ValueError(f"{name} must be a power of 2, got {name}={d}")
            if self.image_size % d:
                raise ValueError(f"image_size must be divisible by {name}, got {self.image_size=}, {name}={d}")
        if not isinstance(self.rotary, bool):
            raise ValueError(f"rotary must be a bool, got {self.rotary=}")
        if not isinstance(self.text_global, bool):
            raise ValueError(f"text_global must be a bool, got {self.text_global=}")
        if self.kv_heads is not None and (isinstance(self.kv_heads, bool) or not isinstance(self.kv_heads, int)
                                          or self.kv_heads < 1 or self.heads % self.kv_heads):
            raise ValueError(f"kv_heads must be None or a positive divisor of heads={self.heads}, "
                             f"got {self.kv_heads=}")
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend: {self.backend=}; choose one of {BACKENDS}")
        if not 0.0 <= float(self.cond_drop) < 1.0:
            raise ValueError(f"cond_drop must be in [0, 1), got {self.cond_drop=}")
        if isinstance(self.motion_weight, bool) or not isinstance(self.motion_weight, (int, float)) \
                or not self.motion_weight >= 1.0:
            raise ValueError(f"motion_weight must be a number >= 1, got {self.motion_weight=}")
        from nuwa3dna.model.holdout import holdout_combos
        holdout_combos(self.holdout)          # ValueError for an unknown set
        if not 0.0 < float(self.vq_ema_decay) < 1.0:
            raise ValueError(f"vq_ema_decay must be in (0, 1), got {self.vq_ema_decay=}")
        if not (isinstance(self.i2i_given_rows, int) and 0 <= self.i2i_given_rows < self.token_grid[1]):
            raise ValueError(f"i2i_given_rows must be in [0, {self.token_grid[1]}), got {self.i2i_given_rows=}")
        if self.v2v_given_frames >= self.frames:
            raise ValueError(f"v2v_given_frames must be < frames, got {self.v2v_given_frames=}, {self.frames=}")

    # ---- derived sizes ---------------------------------------------------------------
    @property
    def token_grid(self) -> Tuple[int, int, int]:
        """(frames, h, w) token grid of a video; an image is (1, h, w)."""
        s = self.image_size // self.vq_downsample
        return (self.frames, s, s)

    @property
    def sketch_grid(self) -> Tuple[int, int, int]:
        s = self.image_size // self.sketch_downsample
        return (self.frames, s, s)

    # ---- JSON ----------------------------------------------------------------------
    def to_dict(self) -> dict:
        """JSON-safe dict (tuples become lists)."""
        d = asdict(self)
        for k in EXTENT_FIELDS:
            d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "NuwaConfig":
        if not isinstance(d, dict):
            raise TypeError(f"NuwaConfig.from_dict needs a dict, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown NuwaConfig keys: {unknown}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def tiny_config(**overrides) -> NuwaConfig:
    """A very small config for tests and benchmarks: 16 px, 3 frames -> (3, 4, 4) tokens, dim 32.

    Extents are smaller than the grid on every axis, so windows are really
    clipped and rescaled (e.g. 4 x 4 targets see 2 x 2 sketch grids).
    """
    base = dict(image_size=16, frames=3, vq_downsample=4, vq_hidden=8, vq_codebook_size=16, vq_codebook_dim=8,
                sketch_classes=4, sketch_downsample=8, sketch_hidden=8, sketch_codebook_size=8,
                sketch_codebook_dim=4, text_len=6, dim=32, enc_depth=1, dec_depth=2, heads=2, dim_head=16,
                ff_mult=2, text_extent=(0, 0, 2), sketch_extent=(0, 1, 0), source_extent=(1, 1, 1),
                image_extent=(0, 1, 2), video_extent=(1, 1, 2), cross_text_extent=(0, 0, None),
                cross_sketch_extent=(1, 0, 1), cross_source_extent=(0, 1, 1), i2i_given_rows=2,
                v2v_given_frames=1)
    base.update(overrides)
    return NuwaConfig(**base)

