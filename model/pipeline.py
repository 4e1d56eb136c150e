"""``NuwaPipeline``: tokenizers + NÜWA in one module, with training loss, generation and checkpoints.

Inputs (docs/design.md): pixels are floats in [0, 1],
videos (B, T, 3, H, W), images (B, 1, 3, H, W); sketches are long class maps
(B, T, H, W); text is a list of str (a bare str is a batch of one).

``training_loss(task, inputs)`` needs ``TRAIN_INPUTS[task]`` (the condition
plus "target"); for image tasks "image" and for video tasks "video" stand in
for a missing "target" (ti2i/tv2v need an explicit "target", their "source"
is pixels too). The tokenizers are frozen there (``no_grad`` encoding, their
EMA is not updated): train them first with their own ``forward`` losses, and
optimise ``pipeline.nuwa.parameters()`` for the transformer.

``generate``: i2i keeps the top ``config.i2i_given_rows`` token rows (the top
``i2i_given_rows * vq_downsample`` pixel rows, half the image by default) of
``image``, or everything outside a user ``mask``, and completes the rest; the
kept tokens are encoded from the image with the hidden region blanked
(model/masks.py), in training too, so no hidden pixel reaches them. v2v keeps
the first ``config.v2v_given_frames`` (or ``given_frames``) frames of
``video`` and predicts the others.

Checkpoints: ``save(dir)`` writes ``config.json`` and ``model.safetensors``
(the whole state dict, tokenizers' codebooks included), each atomically
(model/weights.py); ``load(dir)`` reads them back without pickle. Untested: loading across torch versions and devices
other than CPU (``map_location`` is a plain device string).
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import replace
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from nuwa3dna.model.config import NuwaConfig
from nuwa3dna.model.masks import blank, check_given_frames, default_hidden, token_hidden
from nuwa3dna.model.nuwa import Nuwa
from nuwa3dna.model.tasks import (GENERATE_INPUTS, IMAGE_TASKS, SKETCH_TASKS, SOURCE_TASKS, TEXT_TASKS,
                                  TRAIN_INPUTS, check_task, drop_condition, form, output_grid)
from nuwa3dna.model.text import ByteTextTokenizer, UnknownWordsWarning, normalize_text, unknown_words
from nuwa3dna.model.vq import SketchTokenizer, VQTokenizer
from nuwa3dna.model.weights import load_tensors, module_tensors, save_json, save_tensors

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
VOCAB_FILE = "vocab.json"     # optional: the training captions' words (``vocabulary``)
SHIPPED_CHECKPOINT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoints", "default")


class NuwaPipeline(nn.Module):
    def __init__(self, *, config: Optional[NuwaConfig] = None, tokenizer: Optional[VQTokenizer] = None,
                 sketch_tokenizer: Optional[SketchTokenizer] = None, nuwa: Optional[Nuwa] = None):
        super().__init__()
        self.config = config = NuwaConfig() if config is None else config
        if not isinstance(config, NuwaConfig):
            raise TypeError(f"config must be a NuwaConfig, got {type(config).__name__}")
        self.tokenizer = VQTokenizer.from_config(config) if tokenizer is None else tokenizer
        self.sketch_tokenizer = SketchTokenizer.from_config(config) if sketch_tokenizer is None else sketch_tokenizer
        self.nuwa = Nuwa(config=config) if nuwa is None else nuwa
        self.text_tokenizer = ByteTextTokenizer(config.text_len)
        # Words of the training captions (None: unknown, no warnings); saved as vocab.json.
        self.vocabulary: Optional[Tuple[str, ...]] = None
        if self.tokenizer.codebook_size != config.vq_codebook_size:
            raise ValueError(f"tokenizer has {self.tokenizer.codebook_size} codes but "
                             f"{config.vq_codebook_size=}")
        if self.sketch_tokenizer.codebook_size != config.sketch_codebook_size:
            raise ValueError(f"sketch_tokenizer has {self.sketch_tokenizer.codebook_size} codes but "
                             f"{config.sketch_codebook_size=}")

    # ---- inputs -----------------------------------------------------------------------
    @staticmethod
    def required_inputs(task: str) -> Tuple[str, ...]:
        """Inputs ``generate`` needs for ``task`` (training adds "target")."""
        return GENERATE_INPUTS[check_task(task)]

    def _device(self):
        return self.nuwa.bos.device

    def _check_pixels(self, name, x, frames: Optional[int], min_frames: int = 1):
        c = self.config
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of pixels, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must hold floats in [0, 1], got {name}.dtype={x.dtype}")
        want = f"(B, {frames if frames else 'T'}, 3, {c.image_size}, {c.image_size})"
        if x.dim() != 5 or tuple(x.shape[2:]) != (3, c.image_size, c.image_size):
            raise ValueError(f"{name} must have shape {want}, got {name}.shape={tuple(x.shape)}")
        if frames is not None and x.shape[1] != frames:
            raise ValueError(f"{name} must have {frames} frame(s) for this task, got {name}.shape={tuple(x.shape)}")
        if x.shape[1] < min_frames:
            raise ValueError(f"{name} needs at least {min_frames} frame(s), got {name}.shape={tuple(x.shape)}")
        return x.to(self._device())

    def _check_sketch(self, x, frames: int):
        c = self.config
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"sketch must be a torch.Tensor class map, got {type(x).__name__}")
        if x.is_floating_point() or x.dtype == torch.bool:
            raise TypeError(f"sketch must be an integer class map, got sketch.dtype={x.dtype}")
        if x.dim() != 4 or tuple(x.shape[1:]) != (frames, c.image_size, c.image_size):
            raise ValueError(f"sketch must have shape (B, {frames}, {c.image_size}, {c.image_size}), "
                             f"got sketch.shape={tuple(x.shape)}")
        if x.numel() and (int(x.min()) < 0 or int(x.max()) >= c.sketch_classes):
            raise ValueError(f"sketch classes must lie in [0, {c.sketch_classes}), got min={int(x.min())}, "
                             f"max={int(x.max())}")
        return x.to(self._device())

    def _text(self, text):
        """Captions -> ids; case-insensitive (``normalize_text``: the training captions are lower case)."""
        if isinstance(text, str):
            text = [text]
        if not isinstance(text, (list, tuple)):
            raise TypeError(f"text must be a str or a list of str, got {type(text).__name__}")
        texts = [normalize_text(t) if isinstance(t, str) else t for t in text]
        return self.text_tokenizer.encode(texts).to(self._device())

    def unknown_words(self, text: str):
        """Words of ``text`` the model never saw in training ([] when ``vocabulary`` is None)."""
        return [] if self.vocabulary is None else unknown_words(text, self.vocabulary)

    def _warn_unknown(self, text) -> None:
        for t in ([text] if isinstance(text, str) else list(text) if isinstance(text, (list, tuple)) else []):
            bad = self.unknown_words(t) if isinstance(t, str) else []
            if bad:
                warnings.warn(f"prompt {t!r} has words the model never saw in training: {', '.join(bad)}; "
                              f"it knows: {' '.join(self.vocabulary)}", UnknownWordsWarning, stacklevel=3)

    def _layout(self, task: str, inputs: Dict) -> Dict:
        """What the task hides: i2i's (h, w) hidden token mask (from ``inputs["mask"]``, a pixel
        mask with nonzero = hidden, or the default bottom rows), v2v's number of given frames."""
        c = self.config
        if inputs.get("mask") is not None and task != "i2i":
            raise ValueError(f"mask is an i2i input (the region to generate), not one of task {task!r}")
        if inputs.get("given_frames") is not None and task != "v2v":
            raise ValueError(f"given_frames is a v2v input, not one of task {task!r}")
        if task == "i2i":
            m = inputs.get("mask")
            return {"hidden": default_hidden(c) if m is None else token_hidden(m, c)}
        if task == "v2v":
            return {"given_frames": check_given_frames(c, c.frames, inputs.get("given_frames"))}
        return {}

    def _tokenize(self, task: str, inputs: Dict, training: bool):
        """Validate and tokenize; returns (formation kwargs, target tokens or None, batch, layout).

        i2i's given tokens are the codes of the image with its hidden tokens'
        pixels blanked (model/masks.py: nothing hidden reaches them)."""
        c = self.config
        frames = 1 if task in IMAGE_TASKS else c.frames
        layout = self._layout(task, inputs)
        toks, batches = {}, {}
        if task in TEXT_TASKS:
            toks["text"] = self._text(inputs["text"])
            batches["text"] = toks["text"].shape[0]
        if task in SKETCH_TASKS:
            sk = self._check_sketch(inputs["sketch"], frames)
            toks["sketch"] = self.sketch_tokenizer.encode(sk)
            batches["sketch"] = sk.shape[0]
        if task in SOURCE_TASKS:
            src = self._check_pixels("source", inputs["source"], frames)
            toks["source"] = self.tokenizer.encode(src)
            batches["source"] = src.shape[0]
        target = None
        if training:
            tgt = self._check_pixels("target", inputs["target"], frames)
            target = self.tokenizer.encode(tgt)
            batches["target"] = tgt.shape[0]
            if task == "i2i":
                toks["given"] = self.tokenizer.encode(blank(tgt, layout["hidden"], c))
            elif task == "v2v":       # per-frame tokenizer: the given frames' codes are their own
                toks["given"] = target
        elif task == "i2i":
            img = self._check_pixels("image", inputs["image"], 1)
            toks["given"] = self.tokenizer.encode(blank(img, layout["hidden"], c))
            batches["image"] = img.shape[0]
        elif task == "v2v":
            g_frames = layout["given_frames"]
            vid = self._check_pixels("video", inputs["video"], None, g_frames)
            g = self.tokenizer.encode(vid[:, :g_frames])
            full = torch.zeros((g.shape[0], *output_grid(task, c)), dtype=torch.long, device=g.device)
            full[:, :g_frames] = g
            toks["given"] = full
            batches["video"] = vid.shape[0]
        if len(set(batches.values())) > 1:
            raise ValueError(f"inputs disagree on the batch size: {batches}")
        if min(batches.values()) < 1:
            raise ValueError(f"inputs hold no example: batch sizes {batches}")
        return toks, target, next(iter(batches.values())), layout

    def _gather_inputs(self, task: str, inputs: Dict, needed: Tuple[str, ...]) -> Dict:
        if not isinstance(inputs, dict):
            raise TypeError(f"inputs must be a dict, got {type(inputs).__name__}")
        inputs = dict(inputs)
        if "target" in needed and inputs.get("target") is None and task not in SOURCE_TASKS:
            alias = "image" if task in IMAGE_TASKS else "video"
            if inputs.get(alias) is not None:
                inputs["target"] = inputs[alias]
        missing = [k for k in needed if inputs.get(k) is None]
        if missing:
            raise ValueError(f"task {task!r} needs inputs {needed}; missing {missing}")
        return inputs

    # ---- training ---------------------------------------------------------------------
    def training_loss(self, task: str, inputs: Dict) -> torch.Tensor:
        """Mean cross-entropy of the decoder over the non-given target tokens, with condition dropout."""
        check_task(task)
        inputs = self._gather_inputs(task, inputs, TRAIN_INPUTS[task])
        toks, target, batch, layout = self._tokenize(task, inputs, training=True)
        f = form(task, self.config, batch=batch, **toks, **layout)
        if self.training and self.config.cond_drop > 0 and f.has_condition:
            drop = torch.rand(batch, device=target.device) < self.config.cond_drop
            f = drop_condition(f, drop, self.config)
        # The decoder reads the given tokens (i2i: codes of the blanked image) where the task
        # gives them, the target's elsewhere; the loss covers the non-given tokens only.
        logits = self.nuwa(f, torch.where(f.given_mask, f.given, target))
        keep = ~f.given_mask.reshape(-1)
        logits = logits.reshape(batch, -1, logits.shape[-1])[:, keep]
        labels = target.reshape(batch, -1)[:, keep]
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none")
        weight = self._token_weights(target).reshape(batch, -1)[:, keep].reshape(-1)
        return (ce * weight).sum() / weight.sum()

    def caption_contrast_loss(self, task: str, inputs: Dict, variants, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of picking each target's true caption among ``variants``
        by the model's own likelihood: logit_k = sum over the non-given target
        tokens of log p(token | caption k) (equal caption priors, so by Bayes'
        rule this is the model's posterior over the captions).

        variants: B lists of V captions (e.g. ``data.caption_variants`` over the
        five directions); labels: (B,) long index of the true caption. Targets
        get no condition dropout here. Why: with next-token loss alone the
        caption's direction moved a t2v video's likelihood by only a few nats
        (the direction decides a handful of frame-1 tokens), and the model
        confused "left" with "up" and "right" with "down" (teacher-forced
        posterior 0.56-0.71 on the true direction); this loss trains that
        posterior directly.
        """
        check_task(task)
        if task not in TEXT_TASKS:
            raise ValueError(f"caption contrast needs a text task, got {task=}")
        V = len(variants[0])
        if any(len(v) != V for v in variants):
            raise ValueError(f"every sample needs the same number of caption variants, got "
                             f"{[len(v) for v in variants]}")
        inputs = self._gather_inputs(task, inputs, TRAIN_INPUTS[task])
        toks, target, batch, _ = self._tokenize(task, inputs, training=True)
        toks["text"] = self._text([c for caps in variants for c in caps])              # [B*V, L]
        toks = {k: (v if k == "text" else v.repeat_interleave(V, 0)) for k, v in toks.items()}
        tgt = target.repeat_interleave(V, 0)
        f = form(task, self.config, batch=batch * V, **toks)
        logp = self.nuwa(f, tgt).float().log_softmax(-1).gather(-1, tgt[..., None])[..., 0]   # [B*V, T, h, w]
        keep = ~f.given_mask
        ll = logp[:, keep].sum(-1).view(batch, V)                                         # [B, V]
        return F.cross_entropy(ll, labels.to(ll.device))

    def _token_weights(self, target: torch.Tensor) -> torch.Tensor:
        """(B, T, h, w) loss weights: ``config.motion_weight`` where a code changed since the previous frame."""
        w = torch.ones(target.shape, dtype=torch.float32, device=target.device)
        mw = float(self.config.motion_weight)
        if mw != 1.0 and target.shape[1] > 1:
            w[:, 1:][target[:, 1:] != target[:, :-1]] = mw
        return w

    # ---- generation -------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, task: str, *, text=None, sketch=None, image=None, video=None, source=None,
                 mask=None, given_frames: Optional[int] = None, num_samples: int = 1, temperature: float = 1.0, top_k: Optional[int] = None,
                 top_p: Optional[float] = None, cond_scale: float = 1.0, seed: int = 0,
                 progress: bool = True) -> torch.Tensor:
        """Pixels (num_samples, T, 3, H, W) in [0, 1] (T = 1 for image tasks).

        Inputs hold one example (batch 1, or a bare str for text), repeated for
        each sample, or exactly ``num_samples`` examples (e.g. a list of
        ``num_samples`` prompts). i2i: ``mask`` (H, W), nonzero = the region to
        generate (default: the bottom half); v2v: ``given_frames`` (default
        ``config.v2v_given_frames``). Words of a prompt that the model never saw
        in training (``vocabulary``) raise an ``UnknownWordsWarning``.
        """
        from nuwa3dna.model.sampling import sample_tokens
        check_task(task)
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive int, got {num_samples=}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {seed=}")
        given = dict(text=text, sketch=sketch, image=image, video=video, source=source)
        needed = self.required_inputs(task)
        inputs = self._gather_inputs(task, {k: v for k, v in given.items() if v is not None}, needed)
        unused = [k for k, v in given.items() if v is not None and k not in needed]
        if unused:
            raise ValueError(f"task {task!r} takes inputs {needed}; got unused inputs {unused}")
        if text is not None:
            self._warn_unknown(text)
        was_training = self.training
        self.eval()
        try:
            toks, _, batch, layout = self._tokenize(task, dict(inputs, mask=mask, given_frames=given_frames),
                                                    training=False)
            if batch not in (1, num_samples):
                raise ValueError(f"inputs hold {batch} examples; give 1 or {num_samples=}")
            toks = {k: v.expand(num_samples, *v.shape[1:]) if batch == 1 else v for k, v in toks.items()}
            f = form(task, self.config, batch=num_samples, **toks, **layout)
            gen = torch.Generator(device=self._device()).manual_seed(seed)
            tokens = sample_tokens(self.nuwa, f, temperature=temperature, top_k=top_k, top_p=top_p,
                                   cond_scale=cond_scale, generator=gen, progress=progress)
            return self.tokenizer.decode(tokens)
        finally:
            self.train(was_training)

    def with_rotary(self) -> "NuwaPipeline":
        """A copy whose self-attention layers have rotary positions (``config.rotary``); every
        existing weight is kept and the new frequencies start at their standard init."""
        if self.config.rotary:
            raise ValueError("this pipeline already has rotary positions (config.rotary=True)")
        new = type(self)(config=replace(self.config, rotary=True)).to(self._device())
        missing, unexpected = new.load_state_dict(self.state_dict(), strict=False)
        if unexpected or not all(k.endswith("rotary_freqs") for k in missing):
            raise ValueError(f"rotary conversion mismatch: missing={missing[:5]}, unexpected={unexpected[:5]}")
        new.vocabulary = self.vocabulary
        return new

    # ---- checkpoints ------------------------------------------------------------------
    def save(self, directory) -> None:
        os.makedirs(directory, exist_ok=True)
        save_json(os.path.join(directory, CONFIG_FILE), self.config.to_json())
        save_tensors(os.path.join(directory, WEIGHTS_FILE), module_tensors(self),
                     metadata={"format": "nuwa3dna-pipeline"})
        vocab_path = os.path.join(directory, VOCAB_FILE)
        if self.vocabulary is not None:
            save_json(vocab_path, json.dumps({"words": list(self.vocabulary)}, indent=1))
        elif os.path.isfile(vocab_path):
            os.remove(vocab_path)

    @classmethod
    def load(cls, directory=None, map_location: str = "cpu") -> "NuwaPipeline":
        """A saved pipeline; ``directory=None`` is the checkpoint shipped with the package."""
        if directory is None:
            directory = SHIPPED_CHECKPOINT
        cfg_path = os.path.join(directory, CONFIG_FILE)
        w_path = os.path.join(directory, WEIGHTS_FILE)
        for p in (cfg_path, w_path):
            if not os.path.isfile(p):
                raise ValueError(f"checkpoint file missing: {p}")
        try:
            with open(cfg_path) as fh:
                config = NuwaConfig.from_dict(json.load(fh))
        except (ValueError, TypeError) as e:   # JSONDecodeError is a ValueError
            raise ValueError(f"corrupt or mismatched config file {cfg_path}: {e}") from e
        state = load_tensors(w_path, device=map_location)
        pipe = cls(config=config)
        own = pipe.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        bad = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
        if missing or unexpected or bad:
            raise ValueError(f"weights file {w_path} does not match {cfg_path}: missing={missing[:5]}, "
                             f"unexpected={unexpected[:5]}, wrong shape={bad[:5]}")
        pipe.load_state_dict(state)
        pipe.vocabulary = _read_vocabulary(os.path.join(directory, VOCAB_FILE))
        return pipe.to(map_location)


def _read_vocabulary(path: str) -> Optional[Tuple[str, ...]]:
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as fh:
            words = json.load(fh)["words"]
        if not all(isinstance(w, str) for w in words):
            raise TypeError("words must be strings")
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"corrupt vocabulary file {path}: {e!r}") from None
    return tuple(words)
