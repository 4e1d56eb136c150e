"""Per-frame VQ autoencoders: ``VQTokenizer`` (RGB pixels) and ``SketchTokenizer`` (class maps).

Both are conv encoder -> ``VectorQuantizer`` -> conv decoder, applied to every
frame of a (B, T, ...) video independently (an image is a 1-frame video).

The quantizer keeps its codebook with exponential moving averages (VQ-VAE-2 /
SoundStream style), is initialised from the first training batch's encoder
outputs, and restarts dead codes (EMA usage below ``restart_threshold``
vectors per step) at random encoder outputs of the current batch (Jukebox), so
every code stays in use. Gradients reach the encoder by the straight-through
estimator; the encoder is pulled to its code by the commitment loss.

"VQ-GAN-style" here means the architecture (residual conv blocks, GroupNorm,
SiLU); there is no adversarial or perceptual loss: the procedural data (flat
colours on black) reconstructs well with MSE alone. Untested: the adversarial
losses of VQ-GAN (not implemented) and multi-process EMA (no all-reduce).
"""
from __future__ import annotations

import math
from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch import nn


def _groups(ch: int) -> int:
    for g in (8, 4, 2, 1):
        if ch % g == 0:
            return g
    return 1


class ResBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.block = nn.Sequential(
            nn.GroupNorm(_groups(ch), ch), nn.SiLU(), nn.Conv2d(ch, ch, 3, padding=1),
            nn.GroupNorm(_groups(ch), ch), nn.SiLU(), nn.Conv2d(ch, ch, 3, padding=1))

    def forward(self, x):
        return x + self.block(x)


class ConvEncoder(nn.Module):
    """(N, in_ch, H, W) -> (N, out_ch, H/down, W/down): one stride-2 conv per factor of 2."""

    def __init__(self, in_ch: int, hidden: int, out_ch: int, downsample: int):
        super().__init__()
        layers = [nn.Conv2d(in_ch, hidden, 3, padding=1)]
        for _ in range(int(math.log2(downsample))):
            layers += [ResBlock(hidden), nn.Conv2d(hidden, hidden, 4, stride=2, padding=1)]
        layers += [ResBlock(hidden), nn.GroupNorm(_groups(hidden), hidden), nn.SiLU(),
                   nn.Conv2d(hidden, out_ch, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class ConvDecoder(nn.Module):
    """(N, in_ch, h, w) -> (N, out_ch, h*up, w*up): nearest upsampling + conv per factor of 2."""

    def __init__(self, in_ch: int, hidden: int, out_ch: int, upsample: int):
        super().__init__()
        layers = [nn.Conv2d(in_ch, hidden, 3, padding=1), ResBlock(hidden)]
        for _ in range(int(math.log2(upsample))):
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(hidden, hidden, 3, padding=1),
                       ResBlock(hidden)]
        layers += [nn.GroupNorm(_groups(hidden), hidden), nn.SiLU(), nn.Conv2d(hidden, out_ch, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class VectorQuantizer(nn.Module):
    """Nearest-code quantizer with EMA codebook, data init and dead-code restarts.

    ``forward(z)`` takes (N, dim, h, w) and returns (quantized with straight-
    through gradient, codes (N, h, w), commitment loss, perplexity). The
    codebook is a buffer (updated by EMA in training mode only), not a parameter.
    """

    def __init__(self, *, codebook_size: int, dim: int, beta: float = 0.25, decay: float = 0.99,
                 restart_threshold: float = 1.0, eps: float = 1e-5):
        super().__init__()
        self.codebook_size, self.dim = codebook_size, dim
        self.beta, self.decay, self.restart_threshold, self.eps = beta, decay, restart_threshold, eps
        self.register_buffer("embed", torch.randn(codebook_size, dim) * dim ** -0.5)
        self.register_buffer("cluster_size", torch.zeros(codebook_size))
        self.register_buffer("embed_sum", self.embed.clone())
        self.register_buffer("initted", torch.zeros((), dtype=torch.bool))

    def codes(self, flat: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code of each row of (n, dim)."""
        e = self.embed
        dist = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ e.t() + e.pow(2).sum(1)[None]
        return dist.argmin(1)

    @torch.no_grad()
    def _random_rows(self, flat: torch.Tensor, n: int) -> torch.Tensor:
        idx = torch.randint(0, flat.shape[0], (n,), device=flat.device)
        return flat[idx]

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, idx: torch.Tensor):
        if not bool(self.initted):
            # Data init: codes start where the encoder outputs are, so none is dead from step 1.
            self.embed.copy_(self._random_rows(flat, self.codebook_size))
            self.embed_sum.copy_(self.embed)
            self.cluster_size.fill_(1.0)
            self.initted.fill_(True)
            idx = self.codes(flat)
        counts = torch.bincount(idx, minlength=self.codebook_size).to(flat.dtype)
        sums = torch.zeros_like(self.embed_sum).index_add_(0, idx, flat)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (n + self.codebook_size * self.eps) * n   # Laplace
        self.embed.copy_(self.embed_sum / smoothed[:, None])
        dead = self.cluster_size < self.restart_threshold
        n_dead = int(dead.sum())
        if n_dead:
            fresh = self._random_rows(flat, n_dead)
            self.embed[dead] = fresh
            self.embed_sum[dead] = fresh
            self.cluster_size[dead] = 1.0
        return idx

    def forward(self, z: torch.Tensor):
        N, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)
        idx = self.codes(flat.detach())
        if self.training:
            idx = self._ema_update(flat.detach().float(), idx)
        q = self.embed[idx].to(z.dtype)
        commit = self.beta * F.mse_loss(flat, q.detach())
        q_st = flat + (q - flat).detach()                 # straight-through estimator
        probs = torch.bincount(idx, minlength=self.codebook_size).float() / idx.numel()
        perplexity = torch.exp(-(probs * torch.log(probs + 1e-10)).sum())
        q_st = q_st.reshape(N, h, w, d).permute(0, 3, 1, 2)
        return q_st, idx.reshape(N, h, w), commit, perplexity

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """(N, h, w) codes -> (N, dim, h, w) code vectors."""
        return self.embed[codes].permute(0, 3, 1, 2)


def _check_int(name, v, lo=1):
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {name}={v!r}")


class _FrameVQ(nn.Module):
    """Shared machinery: frames of (B, T, C, H, W) through encoder, quantizer, decoder."""

    def __init__(self, *, in_ch, out_ch, hidden, downsample, codebook_size, codebook_dim, beta,
                 ema_decay, restart_threshold):
        super().__init__()
        for name, v in (("hidden", hidden), ("downsample", downsample), ("codebook_size", codebook_size),
                        ("codebook_dim", codebook_dim)):
            _check_int(name, v)
        if downsample & (downsample - 1):
            raise ValueError(f"downsample must be a power of 2, got {downsample=}")
        self.downsample, self.codebook_size = downsample, codebook_size
        self.encoder = ConvEncoder(in_ch, hidden, codebook_dim, downsample)
        self.quantizer = VectorQuantizer(codebook_size=codebook_size, dim=codebook_dim, beta=beta,
                                         decay=ema_decay, restart_threshold=restart_threshold)
        self.decoder = ConvDecoder(codebook_dim, hidden, out_ch, downsample)

    def _quantize(self, x):                 # x: (B, T, C, H, W) float, already checked
        B, T = x.shape[:2]
        z = self.encoder(x.flatten(0, 1))
        q, codes, commit, perplexity = self.quantizer(z)
        return q, codes.reshape(B, T, *codes.shape[1:]), commit, perplexity

    def _check_codes(self, tokens):
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 4 or tokens.is_floating_point():
            desc = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise ValueError(f"tokens must be a (B, T, h, w) integer tensor, got tokens.shape={desc}")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.codebook_size):
            raise ValueError(f"tokens must lie in [0, {self.codebook_size}), got min={int(tokens.min())}, "
                             f"max={int(tokens.max())}")

    def _decode_frames(self, tokens):
        B, T = tokens.shape[:2]
        out = self.decoder(self.quantizer.lookup(tokens.flatten(0, 1).long()))
        return out.reshape(B, T, *out.shape[1:])


class VQTokenizer(_FrameVQ):
    """RGB frames in [0, 1] <-> (B, T, h, w) codes; h = H / downsample."""

    def __init__(self, *, channels: int = 3, hidden: int = 64, downsample: int = 4, codebook_size: int = 256,
                 codebook_dim: int = 32, beta: float = 0.25, ema_decay: float = 0.99,
                 restart_threshold: float = 1.0):
        _check_int("channels", channels)
        super().__init__(in_ch=channels, out_ch=channels, hidden=hidden, downsample=downsample,
                         codebook_size=codebook_size, codebook_dim=codebook_dim, beta=beta,
                         ema_decay=ema_decay, restart_threshold=restart_threshold)
        self.channels = channels

    @classmethod
    def from_config(cls, config) -> "VQTokenizer":
        return cls(hidden=config.vq_hidden, downsample=config.vq_downsample,
                   codebook_size=config.vq_codebook_size, codebook_dim=config.vq_codebook_dim,
                   beta=config.vq_beta, ema_decay=config.vq_ema_decay,
                   restart_threshold=config.vq_restart_threshold)

    def _check(self, video):
        if not isinstance(video, torch.Tensor):
            raise TypeError(f"video must be a torch.Tensor, got {type(video).__name__}")
        if video.dim() != 5 or video.shape[2] != self.channels:
            raise ValueError(f"video must have shape (B, T, {self.channels}, H, W), got video.shape={tuple(video.shape)}")
        if not video.is_floating_point():
            raise TypeError(f"video must hold floats in [0, 1], got video.dtype={video.dtype}")
        H, W = video.shape[-2:]
        if H % self.downsample or W % self.downsample:
            raise ValueError(f"frame size must be divisible by downsample={self.downsample}, "
                             f"got video.shape={tuple(video.shape)}")

    def forward(self, video: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Reconstruct ``video`` (B, T, 3, H, W) in [0, 1]; losses 'recon', 'commit', 'total' (+ 'perplexity')."""
        self._check(video)
        x = video * 2 - 1
        q, _, commit, perplexity = self._quantize(x)
        out = self.decoder(q).reshape(x.shape)
        recon = F.mse_loss(out, x)
        losses = {"recon": recon, "commit": commit, "total": recon + commit,
                  "perplexity": perplexity.detach()}
        return ((out + 1) / 2).clamp(0, 1), losses

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """(B, T, 3, H, W) in [0, 1] -> (B, T, h, w) long codes (no EMA update)."""
        self._check(video)
        z = self.encoder((video * 2 - 1).flatten(0, 1))
        codes = self.quantizer.codes(z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]))
        return codes.reshape(video.shape[0], video.shape[1], *z.shape[-2:])

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T, h, w) codes -> (B, T, 3, H, W) pixels in [0, 1]."""
        self._check_codes(tokens)
        return ((self._decode_frames(tokens) + 1) / 2).clamp(0, 1)


class SketchTokenizer(_FrameVQ):
    """Class maps (B, T, H, W) long in [0, num_classes) <-> (B, T, h, w) codes; one-hot in, logits out."""

    def __init__(self, *, num_classes: int = 8, hidden: int = 32, downsample: int = 4, codebook_size: int = 64,
                 codebook_dim: int = 16, beta: float = 0.25, ema_decay: float = 0.99,
                 restart_threshold: float = 1.0):
        _check_int("num_classes", num_classes, 2)
        super().__init__(in_ch=num_classes, out_ch=num_classes, hidden=hidden, downsample=downsample,
                         codebook_size=codebook_size, codebook_dim=codebook_dim, beta=beta,
                         ema_decay=ema_decay, restart_threshold=restart_threshold)
        self.num_classes = num_classes

    @classmethod
    def from_config(cls, config) -> "SketchTokenizer":
        return cls(num_classes=config.sketch_classes, hidden=config.sketch_hidden,
                   downsample=config.sketch_downsample, codebook_size=config.sketch_codebook_size,
                   codebook_dim=config.sketch_codebook_dim, beta=config.vq_beta,
                   ema_decay=config.vq_ema_decay, restart_threshold=config.vq_restart_threshold)

    def _check(self, sketch):
        if not isinstance(sketch, torch.Tensor):
            raise TypeError(f"sketch must be a torch.Tensor, got {type(sketch).__name__}")
        if sketch.dim() != 4:
            raise ValueError(f"sketch must have shape (B, T, H, W), got sketch.shape={tuple(sketch.shape)}")
        if sketch.is_floating_point() or sketch.dtype == torch.bool:
            raise TypeError(f"sketch must be an integer class map, got sketch.dtype={sketch.dtype}")
        H, W = sketch.shape[-2:]
        if H % self.downsample or W % self.downsample:
            raise ValueError(f"sketch size must be divisible by downsample={self.downsample}, "
                             f"got sketch.shape={tuple(sketch.shape)}")
        if sketch.numel() and (int(sketch.min()) < 0 or int(sketch.max()) >= self.num_classes):
            raise ValueError(f"sketch classes must lie in [0, {self.num_classes}), got min={int(sketch.min())}, "
                             f"max={int(sketch.max())}")

    def _one_hot(self, sketch):
        return F.one_hot(sketch.long(), self.num_classes).permute(0, 1, 4, 2, 3).float()

    def forward(self, sketch: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Class logits (B, T, C, H, W); losses 'recon' (cross-entropy), 'commit', 'total' (+ 'perplexity')."""
        self._check(sketch)
        q, _, commit, perplexity = self._quantize(self._one_hot(sketch))
        logits = self.decoder(q)
        recon = F.cross_entropy(logits, sketch.flatten(0, 1).long())
        B, T = sketch.shape[:2]
        losses = {"recon": recon, "commit": commit, "total": recon + commit,
                  "perplexity": perplexity.detach()}
        return logits.reshape(B, T, *logits.shape[1:]), losses

    @torch.no_grad()
    def encode(self, sketch: torch.Tensor) -> torch.Tensor:
        """(B, T, H, W) class map -> (B, T, h, w) long codes."""
        self._check(sketch)
        z = self.encoder(self._one_hot(sketch).flatten(0, 1))
        codes = self.quantizer.codes(z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]))
        return codes.reshape(sketch.shape[0], sketch.shape[1], *z.shape[-2:])

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T, h, w) codes -> (B, T, H, W) long class map (argmax of the decoder's logits)."""
        self._check_codes(tokens)
        return self._decode_frames(tokens).argmax(2)
