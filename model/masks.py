"""What a task hides: i2i's hidden region and v2v's given frames, as token masks and blanked pixels.

A user mask is a pixel map (H, W) whose nonzero (True) pixels are HIDDEN (to
be generated) and zero pixels visible (kept), as in inpainting tools. The
decoder works on tokens, so a token is hidden when ANY pixel of its
``vq_downsample`` x ``vq_downsample`` patch is hidden (the hidden token region
covers the pixel mask).

No leak: the given tokens are the tokenizer's codes of the image with every
pixel of a hidden token set to 0 (the black background), so nothing of the
hidden region reaches them through the tokenizer's receptive field or its
frame-wide normalisation (``blank``). Before this, the codes of the full image
were forced, and on images whose top half was empty the model still drew the
hidden object's colour right 94.7% of the time (issue 15).

v2v needs no blanking: the tokenizer encodes each frame alone, so the codes of
the given frames do not depend on the later ones (tests/test_model_masks.py).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def default_hidden(config) -> torch.Tensor:
    """(h, w) bool token mask of i2i's default: every row below ``config.i2i_given_rows`` hidden."""
    _, h, w = config.token_grid
    m = torch.zeros(h, w, dtype=torch.bool)
    m[config.i2i_given_rows:] = True
    return m


def pixel_mask(mask, size: int) -> torch.Tensor:
    """A user mask (tensor or array, (H, W), (1, H, W) or (1, 1, H, W); nonzero = hidden) -> (H, W) bool."""
    m = torch.as_tensor(mask)
    while m.dim() > 2 and m.shape[0] == 1:
        m = m[0]
    if m.dim() != 2 or tuple(m.shape) != (size, size):
        raise ValueError(f"mask must have shape ({size}, {size}) (nonzero = hidden), got shape={tuple(m.shape)}")
    if m.is_floating_point() and bool(torch.isnan(m).any()):
        raise ValueError("mask holds NaN values")
    return m != 0


def token_hidden(mask, config) -> torch.Tensor:
    """(h, w) bool: a token is hidden when any pixel of its patch is hidden in the user ``mask``."""
    ds = config.vq_downsample
    m = pixel_mask(mask, config.image_size).float()[None, None]
    hid = F.max_pool2d(m, ds)[0, 0] > 0
    if not bool(hid.any()):
        raise ValueError("mask hides nothing: mark the region to generate with nonzero (white) pixels")
    return hid


def pixels_of(hidden_tokens: torch.Tensor, config) -> torch.Tensor:
    """(h, w) token mask -> (H, W) bool pixel mask of the hidden tokens' patches."""
    ds = config.vq_downsample
    return hidden_tokens.repeat_interleave(ds, 0).repeat_interleave(ds, 1)


def blank(video: torch.Tensor, hidden_tokens: torch.Tensor, config) -> torch.Tensor:
    """``video`` (B, T, 3, H, W) with every pixel of a hidden token set to 0 (black background)."""
    keep = (~pixels_of(hidden_tokens, config)).to(video.device, video.dtype)
    return video * keep


def check_given_frames(config, frames: int, given: Optional[int]) -> int:
    """Checked number of given v2v frames (default ``config.v2v_given_frames``)."""
    g = config.v2v_given_frames if given is None else given
    if isinstance(g, bool) or not isinstance(g, int) or not 1 <= g < frames:
        raise ValueError(f"given_frames must be an int in [1, {frames - 1}] (frames to keep of {frames}), "
                         f"got given_frames={given!r}")
    return g


def random_layout(task: str, config, rng) -> dict:
    """A random i2i mask (a rectangle of whole tokens, 1/4 to 3/4 of each side) or a random
    number of given v2v frames, from numpy ``rng``: training with these
    (``train --random-masks P``) teaches the model other regions than the default."""
    if task == "i2i":
        _, h, w = config.token_grid
        th, tw = (int(rng.integers(max(1, n // 4), max(2, 3 * n // 4) + 1)) for n in (h, w))
        y, x = int(rng.integers(0, h - th + 1)), int(rng.integers(0, w - tw + 1))
        hid = torch.zeros(h, w, dtype=torch.bool)
        hid[y:y + th, x:x + tw] = True
        return {"mask": pixels_of(hid, config)}
    if task == "v2v":
        return {"given_frames": int(rng.integers(1, config.frames))}
    return {}
