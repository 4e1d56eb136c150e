"""The eight NÜWA tasks as input formations (the task table of docs/design.md).

Every task is run by the same network with the same two condition streams:

* a text stream, the grid (1, 1, L) of byte ids, encoded by 3DNA with extent
  (0, 0, None) (the whole text);
* a visual stream: the sketch's VQ codes (s2i, s2v) or the SOURCE image/video's
  VQ codes (ti2i, tv2v), encoded by 3DNA with the sketch/source extent.

A task without a stream gets the learned "none" condition there: the grid
(1, 1, 1) holding the NONE id. NONE tokens get no position embedding, so a grid
of any shape filled with NONE encodes to the same vector everywhere and is,
for cross-attention, exactly the (1, 1, 1) none grid; condition dropout and
classifier-free guidance therefore just overwrite ids with NONE in place.

Editing (ti2i, tv2v): the encoder sees the text AND the source tokens, and
the decoder's cross-attention to the source is centred on the same (t, h, w)
(source and target grids have one shape, so centres are the identity) with
the window ``cross_source_extent`` -- every target token reaches the source
tokens around its own position, which is what an edit keeps or changes. The
alternative (source frames as forced decoder tokens before the edited frames)
would need a time radius >= the number of frames to reach the source and
doubles the decoded sequence; it was not chosen.

Given (forced) decoder tokens: i2i keeps the top ``i2i_given_rows`` token rows
of the image, or every token outside a user mask (model/masks.py); v2v keeps
the first ``v2v_given_frames`` frames (or ``given_frames``). They are
teacher-forced inputs in training (and excluded from the loss) and forced,
never sampled, in generation.

Untested: batches mixing tasks (a batch is one task by design).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

TASKS = ("t2i", "s2i", "i2i", "ti2i", "t2v", "s2v", "v2v", "tv2v")
IMAGE_TASKS = ("t2i", "s2i", "i2i", "ti2i")
TEXT_TASKS = ("t2i", "ti2i", "t2v", "tv2v")
SKETCH_TASKS = ("s2i", "s2v")
SOURCE_TASKS = ("ti2i", "tv2v")
CONDITIONLESS_TASKS = ("i2i", "v2v")

# What ``generate`` needs per task; training needs the same minus i2i's image and
# v2v's video (their given tokens come from the target), plus "target".
GENERATE_INPUTS: Dict[str, Tuple[str, ...]] = {
    "t2i": ("text",), "s2i": ("sketch",), "i2i": ("image",), "ti2i": ("text", "source"),
    "t2v": ("text",), "s2v": ("sketch",), "v2v": ("video",), "tv2v": ("text", "source"),
}
TRAIN_INPUTS: Dict[str, Tuple[str, ...]] = {
    "t2i": ("text", "target"), "s2i": ("sketch", "target"), "i2i": ("target",),
    "ti2i": ("text", "source", "target"), "t2v": ("text", "target"), "s2v": ("sketch", "target"),
    "v2v": ("target",), "tv2v": ("text", "source", "target"),
}


def check_task(task) -> str:
    if not isinstance(task, str) or task not in TASKS:
        raise ValueError(f"unknown task: {task=}; choose one of {TASKS}")
    return task


def task_index(task: str) -> int:
    return TASKS.index(check_task(task))


def visual_kind(task: str) -> str:
    """'sketch', 'source' or 'none': what the visual condition stream holds."""
    return "sketch" if task in SKETCH_TASKS else "source" if task in SOURCE_TASKS else "none"


def output_grid(task: str, config) -> Tuple[int, int, int]:
    T, h, w = config.token_grid
    return (1, h, w) if check_task(task) in IMAGE_TASKS else (T, h, w)


def given_mask(task: str, config, hidden: Optional[torch.Tensor] = None,
               given_frames: Optional[int] = None) -> torch.Tensor:
    """(T, h, w) bool: True where the decoder's token is given by the task (forced).

    i2i: everything but ``hidden`` ((h, w) bool token mask, default the rows
    from ``config.i2i_given_rows`` on); v2v: the first ``given_frames``
    frames (default ``config.v2v_given_frames``)."""
    grid = output_grid(task, config)
    m = torch.zeros(grid, dtype=torch.bool)
    if task == "i2i":
        if hidden is None:
            m[:, :config.i2i_given_rows] = True
        else:
            m[:] = ~hidden.to(torch.bool).cpu()
    elif task == "v2v":
        m[:config.v2v_given_frames if given_frames is None else given_frames] = True
    return m


@dataclass
class Formation:
    """One task's inputs as the network consumes them (all ids long, batch B).

    text_ids: (B, 1, 1, L) text ids or the (B, 1, 1, 1) NONE grid.
    vis_ids: (B, T', h', w') ids of the visual-condition vocabulary (image codes
        0..K-1, sketch codes K..K+Ks-1, NONE = K+Ks) or the (B, 1, 1, 1) NONE grid.
    given: (B, T, h, w) tokens at the forced positions (other entries unused).
    given_mask: (T, h, w) bool.
    """
    task: str
    text_ids: torch.Tensor
    vis_ids: torch.Tensor
    out_grid: Tuple[int, int, int]
    given: torch.Tensor
    given_mask: torch.Tensor

    @property
    def batch(self) -> int:
        return self.text_ids.shape[0]

    @property
    def has_condition(self) -> bool:
        return self.task not in CONDITIONLESS_TASKS


def none_ids(config) -> Tuple[int, int]:
    """(text NONE id, visual NONE id)."""
    from nuwa3dna.model.text import NONE_ID
    return NONE_ID, config.vq_codebook_size + config.sketch_codebook_size


def form(task: str, config, *, batch: int, text: Optional[torch.Tensor] = None,
         sketch: Optional[torch.Tensor] = None, source: Optional[torch.Tensor] = None,
         given: Optional[torch.Tensor] = None, device=None, hidden: Optional[torch.Tensor] = None,
         given_frames: Optional[int] = None) -> Formation:
    """Map a task and its TOKENIZED inputs to encoder input, forced tokens and output grid.

    text: (B, L) byte ids; sketch: (B, T', h', w') sketch codes; source:
    (B, T, h, w) visual codes; given: (B, T, h, w) visual codes holding the
    forced tokens (i2i, v2v); hidden / given_frames: see ``given_mask``.
    Inputs a task does not use must be None.
    """
    check_task(task)
    t_none, v_none = none_ids(config)
    grid = output_grid(task, config)
    if task in TEXT_TASKS:
        text_ids = text.reshape(batch, 1, 1, -1).long()
        device = text_ids.device
    else:
        text_ids = None
    if task in SKETCH_TASKS:
        vis_ids = sketch.long() + config.vq_codebook_size
    elif task in SOURCE_TASKS:
        vis_ids = source.long()
    else:
        vis_ids = None
    if vis_ids is not None:
        device = vis_ids.device
    if given is not None:
        device = given.device
    if text_ids is None:
        text_ids = torch.full((batch, 1, 1, 1), t_none, dtype=torch.long, device=device)
    if vis_ids is None:
        vis_ids = torch.full((batch, 1, 1, 1), v_none, dtype=torch.long, device=device)
    mask = given_mask(task, config, hidden, given_frames).to(device)
    g = torch.zeros((batch, *grid), dtype=torch.long, device=device) if given is None else given.long()
    return Formation(task, text_ids, vis_ids, grid, g, mask)


def drop_condition(f: Formation, drop: torch.Tensor, config) -> Formation:
    """Replace the condition of the samples where ``drop`` (B,) is True by NONE (CFG training)."""
    t_none, v_none = none_ids(config)
    d = drop.view(-1, 1, 1, 1)
    return Formation(f.task, torch.where(d, t_none, f.text_ids), torch.where(d, v_none, f.vis_ids),
                     f.out_grid, f.given, f.given_mask)


def null_condition(f: Formation, config) -> Formation:
    """The same formation with every condition id replaced by NONE (guidance's unconditional branch)."""
    return drop_condition(f, torch.ones(f.batch, dtype=torch.bool, device=f.text_ids.device), config)


def random_formation(task: str, config, batch: int, generator: Optional[torch.Generator] = None):
    """(formation, target tokens) of random ids for ``task`` at ``config``'s sizes: tests and benchmarks."""
    from nuwa3dna.model.text import TEXT_VOCAB
    c, g = config, generator
    T, h, w = output_grid(task, c)
    Ts, hs, ws = (T, *c.sketch_grid[1:])
    target = torch.randint(0, c.vq_codebook_size, (batch, T, h, w), generator=g)
    kw = {}
    if task in TEXT_TASKS:
        kw["text"] = torch.randint(0, TEXT_VOCAB - 1, (batch, c.text_len), generator=g)
    if task in SKETCH_TASKS:
        kw["sketch"] = torch.randint(0, c.sketch_codebook_size, (batch, Ts, hs, ws), generator=g)
    if task in SOURCE_TASKS:
        kw["source"] = torch.randint(0, c.vq_codebook_size, (batch, T, h, w), generator=g)
    if task in CONDITIONLESS_TASKS:
        kw["given"] = target
    return form(task, c, batch=batch, **kw), target

