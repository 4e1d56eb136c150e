"""``NearbyAttention3D``: 3DNA as an nn.Module with projections (self or cross)."""
from __future__ import annotations

import torch
from torch import nn

from nuwa3dna.checks import check_backend, check_extent, check_windows, normalize_extent
from nuwa3dna.ops import nearby_attention
from nuwa3dna.rotary import grid_positions, init_freqs, rotate


class NearbyAttention3D(nn.Module):
    """Multi-head 3DNA over a (B, T, H, W, dim) token grid.

    ``attn(x)`` is self 3DNA; ``attn(x, context)`` is cross 3DNA to a context
    grid of any size (B, T', H', W', context_dim), centres rescaled.
    ``rotary=True`` (self-attention only) rotates queries and keys by learned
    3D rotary positions (``nuwa3dna.rotary``), parameter ``rotary_freqs``.
    ``causal`` (a bool or per-axis 3-tuple), ``dilation``, ``stride`` and ``border``
    are ``nearby_attention``'s (docs/design.md section 7).
    """

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64, extent=(1, 3, 3),
                 causal: bool = False, context_dim=None, backend: str = "auto", bias: bool = False,
                 rotary: bool = False, dilation=1, stride=1, border: str = "clip"):
        super().__init__()
        for name, val in (("dim", dim), ("heads", heads), ("dim_head", dim_head)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be a positive int, got {name}={val!r}")
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
        self.context_dim = context_dim
        inner = heads * dim_head
        self.to_q = nn.Linear(dim, inner, bias=bias)
        self.to_kv = nn.Linear(dim if context_dim is None else context_dim, 2 * inner, bias=bias)
        self.to_out = nn.Linear(inner, dim)
        self.rotary = rotary
        if rotary:
            self.rotary_freqs = nn.Parameter(init_freqs(heads, dim_head))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.heads}, dim_head={self.dim_head}, extent={self.extent}, "
                f"causal={self.causal}, context_dim={self.context_dim}, backend={self.backend!r}, "
                f"rotary={self.rotary}" + self._window_repr())

    def _window_repr(self) -> str:
        parts = [f"{n}={getattr(self, n)}" for n in ("dilation", "stride") if getattr(self, n) != (1, 1, 1)]
        if self.border != "clip":
            parts.append(f"border={self.border!r}")
        return "".join(", " + p for p in parts)

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

    def forward(self, x: torch.Tensor, context: torch.Tensor = None, *, extent=None) -> torch.Tensor:
        """``extent`` overrides the module's window for this call (same weights), e.g. one
        encoder serving condition grids with different windows."""
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
        k, v = self.to_kv(src).unflatten(-1, (2, self.heads, self.dim_head)).unbind(-3)
        if self.rotary:
            pos = grid_positions(x.shape[1:4], device=x.device)                # [T, H, W, 3]
            q, k = self.rotate(q, pos), self.rotate(k, pos)
        out = nearby_attention(q, k, v, extent, causal=self.causal, backend=self.backend,
                               dilation=self.dilation, stride=self.stride, border=self.border)
        return self.to_out(out.flatten(-2))

    def rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Queries or keys (..., heads, dim_head) at ``positions`` (..., 3) rotated (identity without rotary)."""
        return rotate(x, self.rotary_freqs, positions) if self.rotary else x
