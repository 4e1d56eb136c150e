"""``NearbyAttention3D``: 3DNA as an nn.Module with projections (self or cross)."""
from __future__ import annotations

import torch
from torch import nn

from nuwa3dna.checks import check_backend, check_extent, check_windows, normalize_extent
from nuwa3dna.ops import nearby_attention
from nuwa3dna.kernels.windows import bias_radius
from nuwa3dna.rotary import grid_positions, init_freqs, rotate


class NearbyAttention3D(nn.Module):
    """Multi-head 3DNA over a (B, T, H, W, dim) token grid.

    ``attn(x)`` is self 3DNA; ``attn(x, context)`` is cross 3DNA to a context
    grid of any size (B, T', H', W', context_dim), centres rescaled.
    ``rotary=True`` (self-attention only) rotates queries and keys by learned
    3D rotary positions (``nuwa3dna.rotary``), parameter ``rotary_freqs``.
    ``causal`` (a bool or per-axis 3-tuple), ``dilation``, ``stride`` and ``border``
    are ``nearby_attention``'s (docs/design.md section 7).

    Beyond the window (docs/design.md section 8):
    ``kv_heads`` (a divisor of ``heads``, default ``heads``): grouped key/value heads
    (GQA; 1 is MQA), a smaller ``to_kv`` and smaller keys/values to cache.
    ``global_tokens=N``: N learned tokens (parameter ``global_tokens``, (N, kv source
    dim)) that every query sees besides its window, in the same softmax; a call may
    add its own with ``forward(..., global_context=(B, M, kv source dim))`` (text or
    register tokens), projected by the same ``to_kv``.
    ``rel_pos_bias=True``: a learned relative position bias per head and window
    offset (parameter ``rel_pos_bias``, (heads, 2R_t+1, 2R_h+1, 2R_w+1), zeros at
    start); needs a finite extent, and a per-call ``extent`` must keep its shape.
    """

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64, extent=(1, 3, 3),
                 causal: bool = False, context_dim=None, backend: str = "auto", bias: bool = False,
                 rotary: bool = False, dilation=1, stride=1, border: str = "clip", *, kv_heads=None,
                 global_tokens: int = 0, rel_pos_bias: bool = False):
        super().__init__()
        for name, val in (("dim", dim), ("heads", heads), ("dim_head", dim_head)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be a positive int, got {name}={val!r}")
        kv_heads = heads if kv_heads is None else kv_heads
        if isinstance(kv_heads, bool) or not isinstance(kv_heads, int) or kv_heads < 1 or heads % kv_heads:
            raise ValueError(f"kv_heads must be a positive divisor of {heads=}, got {kv_heads=}")
        if isinstance(global_tokens, bool) or not isinstance(global_tokens, int) or global_tokens < 0:
            raise ValueError(f"global_tokens must be an int >= 0, got {global_tokens=}")
        if not isinstance(rel_pos_bias, bool):
            raise TypeError(f"rel_pos_bias must be a bool, got {rel_pos_bias=}")
        if context_dim is not None and (isinstance(context_dim, bool) or not isinstance(context_dim, int)
                                        or context_dim < 1):
            raise ValueError(f"context_dim must be a positive int or None, got {context_dim=}")
        check_extent(extent)
        if not isinstance(causal, (tuple, list)):
            causal = bool(causal)
        causal, dilation, stride = check_windows(normalize_extent(extent), causal, dilation, stride, border)
        check_backend(backend)
        if not isinstance(rotary, bool):
            raise TypeError(f"rotary must be a bool, got {rotary=}")
        if rotary and context_dim is not None:
            raise ValueError(f"rotary positions are for self-attention; got {rotary=} with {context_dim=}")
        self.dim, self.heads, self.dim_head = dim, heads, dim_head
        self.extent, self.causal, self.backend = extent, causal, backend
        self.dilation, self.stride, self.border = dilation, stride, border
        self.context_dim, self.kv_heads = context_dim, kv_heads
        inner = heads * dim_head
        src_dim = dim if context_dim is None else context_dim
        self.to_q = nn.Linear(dim, inner, bias=bias)
        self.to_kv = nn.Linear(src_dim, 2 * kv_heads * dim_head, bias=bias)
        self.to_out = nn.Linear(inner, dim)
        self.rotary = rotary
        if rotary:
            # one frequency set per kv head: a key shared by a group of query heads can only be
            # rotated one way, so the group's query heads share its frequencies
            self.rotary_freqs = nn.Parameter(init_freqs(kv_heads, dim_head))
        if global_tokens:
            self.global_tokens = nn.Parameter(torch.randn(global_tokens, src_dim) * src_dim ** -0.5)
        else:
            self.register_parameter("global_tokens", None)
        if rel_pos_bias:
            extent3 = normalize_extent(extent)
            if any(e is None for e in extent3):
                raise ValueError(f"rel_pos_bias needs a finite extent on every axis, got {extent=}")
            shape = (heads,) + tuple(2 * bias_radius(e, None, border == "shift") + 1 for e in extent3)
            self.rel_pos_bias = nn.Parameter(torch.zeros(shape))
        else:
            self.register_parameter("rel_pos_bias", None)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.heads}, dim_head={self.dim_head}, extent={self.extent}, "
                f"causal={self.causal}, context_dim={self.context_dim}, backend={self.backend!r}, "
                f"rotary={self.rotary}" + self._window_repr())

    def _extras_repr(self) -> str:
        parts = [f"kv_heads={self.kv_heads}"] if self.kv_heads != self.heads else []
        if self.global_tokens is not None:
            parts.append(f"global_tokens={self.global_tokens.shape[0]}")
        if self.rel_pos_bias is not None:
            parts.append("rel_pos_bias=True")
        return "".join(", " + p for p in parts)

    def _window_repr(self) -> str:
        parts = [f"{n}={getattr(self, n)}" for n in ("dilation", "stride") if getattr(self, n) != (1, 1, 1)]
        if self.border != "clip":
            parts.append(f"border={self.border!r}")
        return "".join(", " + p for p in parts) + self._extras_repr()

    def _check(self, x, context):
        if not isinstance(x, torch.Tensor) or x.dim() != 5 or x.shape[-1] != self.dim:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must have shape (B, T, H, W, dim={self.dim}), got x.shape={shape}")
        if context is None:
            return
        cdim = self.dim if self.context_dim is None else self.context_dim
        if not isinstance(context, torch.Tensor) or context.dim() != 5 or context.shape[-1] != cdim:
            shape = tuple(context.shape) if isinstance(context, torch.Tensor) else type(context).__name__
            raise ValueError(f"context must have shape (B, T', H', W', context_dim={cdim}), got context.shape={shape}")
        if context.shape[0] != x.shape[0]:
            raise ValueError(f"x and context differ in batch: x.shape={tuple(x.shape)}, context.shape={tuple(context.shape)}")

    def forward(self, x: torch.Tensor, context: torch.Tensor = None, *, extent=None,
                global_context: torch.Tensor = None) -> torch.Tensor:
        """``extent`` overrides the module's window for this call (same weights), e.g. one
        encoder serving condition grids with different windows. ``global_context``
        (B, M, kv source dim): tokens every query sees this call, besides the window."""
        self._check(x, context)
        if extent is None:
            extent = self.extent
        else:
            check_extent(extent)
        if context is None and self.context_dim is not None:
            raise ValueError(f"this module was built for cross-attention ({self.context_dim=}); pass a context")
        if context is not None and self.rotary:
            raise ValueError("this module has rotary positions (self-attention only); got a context")
        src = x if context is None else context
        q = self.to_q(x).unflatten(-1, (self.heads, self.dim_head))
        k, v = self.to_kv(src).unflatten(-1, (2, self.kv_heads, self.dim_head)).unbind(-3)
        if self.rotary:
            pos = grid_positions(x.shape[1:4], device=x.device)                # [T, H, W, 3]
            q, k = self.rotate(q, pos), self.rotate(k, pos)
        extra = self._global_kv(x, src, global_context)
        out = nearby_attention(q, k, v, extent, causal=self.causal, backend=self.backend,
                               dilation=self.dilation, stride=self.stride, border=self.border,
                               additional_keys=extra[0], additional_values=extra[1], bias=self.rel_pos_bias)
        return self.to_out(out.flatten(-2))

    def _global_kv(self, x, src, global_context):
        """(keys, values) (B, N, kv_heads, dim_head) of the learned and the call's global tokens, or (None, None)."""
        tokens = []
        if self.global_tokens is not None:
            tokens.append(self.global_tokens.to(x.dtype).expand(x.shape[0], -1, -1))
        if global_context is not None:
            want = src.shape[-1]
            if (not isinstance(global_context, torch.Tensor) or global_context.dim() != 3
                    or global_context.shape[0] != x.shape[0] or global_context.shape[-1] != want):
                shape = tuple(global_context.shape) if isinstance(global_context, torch.Tensor) else \
                    type(global_context).__name__
                raise ValueError(f"global_context must have shape (B={x.shape[0]}, M, {want}), "
                                 f"got global_context.shape={shape}")
            tokens.append(global_context)
        if not tokens:
            return None, None
        kv = self.to_kv(torch.cat(tokens, dim=1)).unflatten(-1, (2, self.kv_heads, self.dim_head))
        return kv[:, :, 0], kv[:, :, 1]

    def rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Queries (..., heads, dim_head) or keys (..., kv_heads, dim_head) at ``positions`` (..., 3)
        rotated (identity without rotary); query head h turns with kv head h // (heads // kv_heads)."""
        if not self.rotary:
            return x
        freqs = self.rotary_freqs
        if x.shape[-2] != freqs.shape[0]:
            freqs = freqs.repeat_interleave(x.shape[-2] // freqs.shape[0], dim=0)
        return rotate(x, freqs, positions)
