"""PNG/GIF in and out, contact sheets, and user files -> pipeline tensors (pillow).

Pixels are float tensors in [0, 1]: an image (3, H, W), a video (T, 3, H, W).
Sketches (class maps, long) are drawn with ``SKETCH_PALETTE`` (class c ->
colour c) and read back by nearest palette colour, so a sketch written by
``save_sketch_png`` reads back exactly. A greyscale ('L'/'I') PNG whose values
are all < ``num_classes`` is read as class indices directly (palette 'P'
files are read by colour: GIF palettes order colours arbitrarily).

Resizing of user files: downscaling uses BOX filtering (exact for
nearest-upscaled pictures such as our own outputs), upscaling NEAREST. A
non-square file is letterboxed, not stretched: centred on a black square
(black is the background colour and sketch class 0) with a ``UserWarning``
naming the sizes (the command lines print it as one ``warning:`` line).
Untested: 16-bit PNGs and CMYK files.
"""
from __future__ import annotations

import os
import warnings
from typing import Optional, Sequence, Tuple

import numpy as np
import torch

try:
    from PIL import Image, ImageDraw, ImageFont, ImageSequence
except ImportError as e:  # pragma: no cover - pillow is in the "model" extra
    raise ImportError("nuwa3dna.model.imageio needs pillow: pip install 'nuwa3dna[model]'") from e

# Class 0 (background) black, then well separated colours; 8 entries cover
# the data's 4 classes and leave room for more shapes.
SKETCH_PALETTE = np.asarray([
    (0, 0, 0), (255, 255, 255), (255, 128, 0), (0, 160, 255),
    (160, 255, 0), (255, 0, 128), (128, 0, 255), (128, 128, 128),
], dtype=np.uint8)


# ----------------------------------------------------------------------------- conversions

def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(..., 3, H, W) float in [0, 1] -> (..., H, W, 3) uint8."""
    a = x.detach().to("cpu", torch.float32).clamp(0, 1).numpy()
    return np.ascontiguousarray(np.moveaxis((a * 255.0 + 0.5).astype(np.uint8), -3, -1))


def sketch_to_rgb(sketch: torch.Tensor) -> torch.Tensor:
    """(..., H, W) long class map -> (..., 3, H, W) float in [0, 1] with SKETCH_PALETTE."""
    s = sketch.detach().to("cpu").long().numpy()
    if s.size and (s.min() < 0 or s.max() >= len(SKETCH_PALETTE)):
        raise ValueError(f"sketch classes must be in [0, {len(SKETCH_PALETTE)}), got range "
                         f"[{s.min()}, {s.max()}]")
    rgb = SKETCH_PALETTE[s].astype(np.float32) / 255.0
    return torch.from_numpy(np.moveaxis(rgb, -1, -3).copy())


def _upscale(arr: np.ndarray, scale: int) -> np.ndarray:
    return arr.repeat(scale, axis=-3).repeat(scale, axis=-2) if scale > 1 else arr


# ----------------------------------------------------------------------------- writing

def save_png(image: torch.Tensor, path: str, scale: int = 1) -> str:
    """Write an image (3, H, W) or (1, 3, H, W) as PNG, upscaled by ``scale`` (nearest)."""
    if image.dim() == 4:
        if image.shape[0] != 1:
            raise ValueError(f"save_png takes one image, got shape={tuple(image.shape)}")
        image = image[0]
    Image.fromarray(_upscale(to_uint8(image), scale)).save(path, format="PNG")
    return path


def save_gif(video: torch.Tensor, path: str, scale: int = 1, frame_ms: int = 300) -> str:
    """Write a video (T, 3, H, W) as a looping animated GIF, upscaled by ``scale``."""
    frames = [Image.fromarray(f) for f in _upscale(to_uint8(video), scale)]
    # GIF is palettized; our frames hold few colours, so ADAPTIVE keeps them exact.
    frames = [f.convert("P", palette=Image.ADAPTIVE, colors=256) for f in frames]
    frames[0].save(path, format="GIF", save_all=True, append_images=frames[1:],
                   duration=frame_ms, loop=0, disposal=2)
    return path


def save_sketch_png(sketch: torch.Tensor, path: str, scale: int = 1) -> str:
    """Write one sketch frame (H, W) or (1, H, W) with SKETCH_PALETTE."""
    if sketch.dim() == 3:
        sketch = sketch[0]
    return save_png(sketch_to_rgb(sketch), path, scale)


def _font():
    """PIL's built-in font at 11 px (its 10 px default runs words together: "movesdown")."""
    try:
        return ImageFont.load_default(size=11)
    except TypeError:                     # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def contact_sheet(panels: Sequence[Tuple[str, torch.Tensor]], scale: int = 4, pad: int = 4,
                  title: Optional[str] = None) -> Image.Image:
    """Condition and output side by side: images as one row of panels; videos as
    one row per panel with time running left to right, so motion reads across.

    ``panels``: (label, pixels) with pixels (T, 3, H, W) or (3, H, W); all must
    share H and W. Labels (and an optional title, e.g. the prompt) are drawn
    with PIL's built-in bitmap font: the title on top, each label above its panel.
    """
    vids = [(label, (p[None] if p.dim() == 3 else p)) for label, p in panels]
    if not vids:
        raise ValueError("contact_sheet needs at least one panel")
    H, W = vids[0][1].shape[-2:]
    for label, v in vids:
        if tuple(v.shape[-2:]) != (H, W):
            raise ValueError(f"panel {label!r} has size {tuple(v.shape[-2:])}, expected {(H, W)}")
    T = max(v.shape[0] for _, v in vids)
    fh, fw = H * scale, W * scale
    # PIL's default bitmap font is 11 px tall (6 px per character): a 14 px line for
    # the title, a 12 px line above each panel for its label.
    top = 2 + (14 if title else 0)
    cell_w, cell_h = fw + pad, 12 + fh + pad
    cols, rows = (len(vids), 1) if T == 1 else (T, len(vids))
    label_w = 8 + 6 * max(len(lab) for lab, _ in vids) if T > 1 else 0
    width = max(pad + cols * cell_w, 8 + 6 * len(title or ""), label_w)
    sheet = Image.new("RGB", (width, top + rows * cell_h), (40, 40, 40))
    draw = ImageDraw.Draw(sheet)
    draw.font = _font()
    if title:
        draw.text((pad, 2), title[:80], fill=(255, 255, 255))
    for i, (label, v) in enumerate(vids):
        x0, y0 = (pad + i * cell_w, top) if T == 1 else (pad, top + i * cell_h)
        draw.text((x0, y0), label if T > 1 else label[: max(1, fw // 6)], fill=(220, 220, 220))
        for t, frame in enumerate(_upscale(to_uint8(v), scale)):
            sheet.paste(Image.fromarray(frame), (x0 + t * cell_w, y0 + 12))
    return sheet


# ----------------------------------------------------------------------------- reading

def _open(path: str) -> Image.Image:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str, got {type(path).__name__}")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file: {path!r}")
    if os.path.isdir(path):
        raise ValueError(f"expected an image file, got a directory: {path!r}")
    try:
        img = Image.open(path)
        img.load()
    except Exception as e:   # pillow raises UnidentifiedImageError, OSError, SyntaxError...
        raise ValueError(f"cannot read image file {path!r}: {e}") from None
    return img


def _frames(img: Image.Image):
    try:
        return [f.copy() for f in ImageSequence.Iterator(img)]
    except Exception as e:
        raise ValueError(f"cannot read the frames of {getattr(img, 'filename', '?')!r}: {e}") from None


def letterbox(frame: Image.Image) -> Image.Image:
    """A non-square frame centred on a black (value 0) square of its longer side."""
    w, h = frame.size
    if w == h:
        return frame
    n = max(w, h)
    out = Image.new(frame.mode, (n, n), 0)
    out.paste(frame, ((n - w) // 2, (n - h) // 2))
    return out


def _square_frames(frames, path) -> list:
    w, h = frames[0].size
    if w != h:
        n = max(w, h)
        warnings.warn(f"{os.fspath(path)!r} is {w}x{h} px, not square: letterboxed to {n}x{n} "
                      f"(black bands), not stretched", UserWarning, stacklevel=3)
        frames = [letterbox(f.convert("RGB") if f.mode == "P" else f) for f in frames]
    return frames


def _resize(frame: Image.Image, size: int) -> Image.Image:
    frame = letterbox(frame)
    if frame.size == (size, size):
        return frame
    smaller = frame.size[0] >= size and frame.size[1] >= size
    return frame.resize((size, size), Image.BOX if smaller else Image.NEAREST)


def read_video(path: str, size: int, max_frames: Optional[int] = None) -> torch.Tensor:
    """A PNG (one frame) or GIF (all frames) -> (1, T, 3, size, size) float in [0, 1]."""
    with _open(path) as img:
        frames = _frames(img)
    if max_frames is not None:
        frames = frames[:max_frames]
    frames = _square_frames(frames, path)
    arr = np.stack([np.asarray(_resize(f.convert("RGB"), size), dtype=np.float32) / 255.0 for f in frames])
    return torch.from_numpy(np.moveaxis(arr, -1, -3).copy())[None]


def read_image(path: str, size: int) -> torch.Tensor:
    """The first frame of a PNG/GIF -> (1, 1, 3, size, size)."""
    return read_video(path, size, max_frames=1)


def read_mask(path: str, size: int) -> torch.Tensor:
    """An i2i mask PNG -> (size, size) bool, True (white, grey >= 128) = hidden, to generate.

    Downscaling keeps a pixel hidden if any hidden source pixel falls in it, so a
    thin stroke still hides its tokens."""
    with _open(path) as img:
        frames = _square_frames(_frames(img)[:1], path)
    hid = (np.asarray(frames[0].convert("L")) >= 128).astype(np.uint8) * 255
    img = Image.fromarray(hid, mode="L")
    if img.size != (size, size):
        img = _resize(img, size)
    return torch.from_numpy(np.asarray(img) > 0)


def _classes_of(frame: Image.Image, size: int, num_classes: int) -> np.ndarray:
    frame = letterbox(frame)
    if frame.mode in ("L", "I"):
        raw = np.asarray(frame.resize((size, size), Image.NEAREST) if frame.size != (size, size) else frame)
        if raw.size and raw.max() < num_classes:
            return raw.astype(np.int64)
    rgb = np.asarray(_resize(frame.convert("RGB"), size), dtype=np.float32)
    pal = SKETCH_PALETTE[:num_classes].astype(np.float32)
    d = np.linalg.norm(rgb[..., None, :] - pal, axis=-1)
    return d.argmin(-1).astype(np.int64)


def read_sketch(path: str, size: int, num_classes: int, max_frames: Optional[int] = None) -> torch.Tensor:
    """A sketch PNG/GIF -> (1, T, size, size) long class map (see module doc)."""
    if num_classes > len(SKETCH_PALETTE):
        raise ValueError(f"at most {len(SKETCH_PALETTE)} sketch classes can be read from colours, got {num_classes=}")
    with _open(path) as img:
        frames = _frames(img)
    if max_frames is not None:
        frames = frames[:max_frames]
    frames = _square_frames(frames, path)
    return torch.from_numpy(np.stack([_classes_of(f, size, num_classes) for f in frames]))[None]
