"""Training data for ``python -m nuwa3dna.train``: the procedural generator, or a folder of your own files.

Both give the same two things, as pure functions of (stream, start index), so
a resumed or distributed run sees exactly the samples it would have seen:

* ``task_inputs(task, batch_size, stream, start, device)``: one task's training
  inputs (``tasks.TRAIN_INPUTS`` keys, plus "objects" ground truth where known);
* ``tokenizer_batch(key, batch_size, stream, start, device)``: pixels ("video")
  or class maps ("sketch") for the tokenizer stages.

``ProceduralData`` is model/data.py's "moving shapes" (every task).

``FolderData`` reads a folder::

    my_data/
      captions.jsonl          one JSON object per line:
                              {"file": "cat.png", "caption": "a cat"}
                              {"file": "clip.gif", "caption": "a ball rolls left", "sketch": "clip_sketch.gif"}
      cat.png  clip.gif  clip_sketch.gif  ...

A PNG/JPEG (or a GIF with fewer frames than ``config.frames``) is an image,
a GIF with at least ``config.frames`` frames a video (its first frames). Files
are resized to ``config.image_size`` (non-square ones letterboxed, with a
warning). "sketch" (optional) is a class map of the same frames: a greyscale
PNG/GIF of class indices or colours of ``imageio.SKETCH_PALETTE``. "caption"
is optional too (such items serve i2i/v2v/s2i/s2v only). Tasks a folder can
train: t2i, i2i, s2i on images; t2v, v2v, s2v on videos (s2* need sketches);
ti2i/tv2v need edit pairs, which a folder does not describe. Every file is
read once, at start, and kept in memory (a folder of thousands of 32 px
files is a few MB). ``scripts/make_example_dataset.py`` writes an example.
"""
from __future__ import annotations

import json
import os
import warnings
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from nuwa3dna.model.tasks import IMAGE_TASKS, SOURCE_TASKS, TASKS, check_task
from nuwa3dna.model.text import vocabulary_of

CAPTIONS_FILE = "captions.jsonl"


class ProceduralData:
    """model/data.py's moving shapes; stream per task as before (``seed * 1000 + task index``)."""

    name = "procedural"
    tasks = TASKS

    def __init__(self, data_cfg):
        self.cfg = data_cfg

    @property
    def vocabulary(self) -> Tuple[str, ...]:
        return self.cfg.vocabulary

    def task_inputs(self, task: str, batch_size: int, stream: int, start: int, device) -> Dict:
        from nuwa3dna.model import data
        frames = 1 if task in IMAGE_TASKS else self.cfg.frames
        if task in SOURCE_TASKS:
            b = data.make_edit_batch(batch_size, stream, start, self.cfg, frames)
            return dict(text=b["text"], source=b["source"].to(device), target=b["target"].to(device))
        b = data.make_batch(batch_size, stream, start, self.cfg, frames)
        out = dict(target=b["video"].to(device))
        if task in ("t2i", "t2v"):
            out["text"] = b["text"]
            out["objects"] = [smp.objects for smp in b["samples"]]
        if task in ("s2i", "s2v"):
            out["sketch"] = b["sketch"].to(device)
        return out

    def tokenizer_batch(self, key: str, batch_size: int, stream: int, start: int, device) -> torch.Tensor:
        from nuwa3dna.model import data
        return data.make_batch(batch_size, stream, start, self.cfg)[key].to(device)


class _Item:
    __slots__ = ("file", "video", "sketch", "caption")

    def __init__(self, file, video, sketch, caption):
        self.file, self.video, self.sketch, self.caption = file, video, sketch, caption


class FolderData:
    """Images and GIF videos with captions (and optional sketches) from a folder (module doc)."""

    name = "folder"

    def __init__(self, root: str, config):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"--data: no such folder {root!r}")
        path = os.path.join(root, CAPTIONS_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--data {root!r} has no {CAPTIONS_FILE} (one JSON object per line: "
                                    f'{{"file": "x.png", "caption": "..."}})')
        self.root, self.config = root, config
        with warnings.catch_warnings(record=True) as caught:      # one line for all letterboxed files
            warnings.simplefilter("always", UserWarning)
            self.items = [self._load(entry, where) for entry, where in _read_jsonl(path)]
        boxed = [str(w.message).split(" is ")[0] for w in caught if "letterboxed" in str(w.message)]
        for w in caught:
            if "letterboxed" not in str(w.message):
                warnings.warn(w.message, w.category, stacklevel=2)
        if boxed:
            warnings.warn(f"--data {root!r}: {len(boxed)} file(s) are not square and were letterboxed "
                          f"(black bands), e.g. {boxed[0]}", UserWarning, stacklevel=2)
        if not self.items:
            raise ValueError(f"{path} lists no file")
        T = config.frames
        images = [i for i in self.items if i.video.shape[0] < T]
        videos = [i for i in self.items if i.video.shape[0] >= T]
        self.pools: Dict[str, List[_Item]] = {
            "t2i": [i for i in images if i.caption], "i2i": images, "s2i": [i for i in images if i.sketch is not None],
            "t2v": [i for i in videos if i.caption], "v2v": videos, "s2v": [i for i in videos if i.sketch is not None],
        }
        self.tasks = tuple(t for t in TASKS if self.pools.get(t))

    def _load(self, entry: Dict, where: str) -> _Item:
        from nuwa3dna.model import imageio
        c = self.config
        if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
            raise ValueError(f"{where}: each line needs a \"file\" (a path relative to the folder), got {entry!r:.80}")
        cap = entry.get("caption")
        if cap is not None and (not isinstance(cap, str) or not cap.strip()):
            raise ValueError(f"{where}: \"caption\" must be a non-empty string, got {cap!r:.80}")
        video = imageio.read_video(os.path.join(self.root, entry["file"]), c.image_size)[0]
        video = video[:c.frames] if video.shape[0] >= c.frames else video[:1]
        sketch = None
        if entry.get("sketch") is not None:
            sketch = imageio.read_sketch(os.path.join(self.root, entry["sketch"]), c.image_size, c.sketch_classes,
                                         max_frames=video.shape[0])[0]
            if sketch.shape[0] != video.shape[0]:
                raise ValueError(f"{where}: sketch {entry['sketch']!r} has {sketch.shape[0]} frame(s), "
                                 f"{entry['file']!r} {video.shape[0]}")
        return _Item(entry["file"], video, sketch, cap)

    @property
    def vocabulary(self) -> Tuple[str, ...]:
        return vocabulary_of(i.caption for i in self.items if i.caption)

    def _pick(self, pool: List[_Item], batch_size: int, stream: int, start: int) -> List[_Item]:
        idx = np.random.default_rng([stream, start]).integers(0, len(pool), size=batch_size)
        return [pool[int(k)] for k in idx]

    def task_inputs(self, task: str, batch_size: int, stream: int, start: int, device) -> Dict:
        check_task(task)
        if task not in self.tasks:
            raise ValueError(f"the folder {self.root!r} cannot train task {task!r}; it can train "
                             f"{', '.join(self.tasks)} (module doc of model/datasets.py)")
        items = self._pick(self.pools[task], batch_size, stream, start)
        out = dict(target=torch.stack([i.video for i in items]).to(device))
        if task in ("t2i", "t2v"):
            out["text"] = [i.caption for i in items]
        if task in ("s2i", "s2v"):
            out["sketch"] = torch.stack([i.sketch for i in items]).to(device)
        return out

    def tokenizer_batch(self, key: str, batch_size: int, stream: int, start: int, device) -> torch.Tensor:
        """``batch_size`` single frames (B, 1, ...) drawn from every item's frames."""
        frames = [(i, t) for i in self.items for t in range(i.video.shape[0])
                  if key == "video" or i.sketch is not None]
        if not frames:
            raise ValueError(f"the folder {self.root!r} has no sketch to train the sketch tokenizer on")
        idx = np.random.default_rng([stream, start]).integers(0, len(frames), size=batch_size)
        picked = [frames[int(k)] for k in idx]
        src = [(i.video if key == "video" else i.sketch)[t] for i, t in picked]
        return torch.stack(src)[:, None].to(device)


def _read_jsonl(path: str):
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line), f"{path}:{n}"
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n} is not JSON: {e}") from None


def make_dataset(spec: Optional[str], config, data_cfg):
    """``--data``: None or "procedural" -> ProceduralData(data_cfg); a folder -> FolderData."""
    if spec is None or spec == "procedural":
        return ProceduralData(data_cfg)
    return FolderData(spec, config)
