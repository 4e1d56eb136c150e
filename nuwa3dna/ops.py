"""``nearby_attention``: the functional entry point; validates once, then dispatches."""
from __future__ import annotations

from nuwa3dna.checks import check_inputs, uses_forward_ad
from nuwa3dna.dispatch import resolve_auto
from nuwa3dna.kernels.cpu.op import torch_attention
from nuwa3dna.kernels.geometry import resolve_extent
from nuwa3dna.kernels.windows import Options
from nuwa3dna.reference import dense_nearby_attention


def nearby_attention(q, k, v, extent, causal=False, scale=None, backend="auto", *, dilation=1, stride=1,
                     border="clip"):
    """3D Nearby Attention (NÜWA; docs/design.md).

    Args:
        q: (B, T, H, W, heads, D) queries.
        k, v: (B, T', H', W', heads, D) keys and values; a grid other than q's
            makes it cross 3DNA with rescaled centres.
        extent: radius per axis (t, h, w): an int for all axes, or a 3-tuple of
            ints >= 0 or None (None = the whole axis).
        causal: True hides keys later in raster order; a 3-tuple of bools makes
            those axes causal on their own (frame-causal video: (True, False, False)).
            Either needs q and k grids to match.
        scale: score scale, default D ** -0.5.
        backend: "auto" (``nuwa3dna.dispatch.choose_backend``), "triton", "torch", "dense".
        dilation, stride: int or 3-tuple of ints >= 1 (docs/design.md section 7): a
            window takes every d-th key; a group of s queries shares one window.
        border: "clip" (windows cut at the borders) or "shift" (NATTEN's: windows
            keep 2*extent + 1 keys by moving inward).

    Returns:
        (B, T, H, W, heads, D) in q's dtype and on q's device.

    Dilation, stride, per-axis causal and border="shift" run on backends "torch"
    (chosen by "auto") and "dense"; "triton" raises NotImplementedError for them.
    """
    return windowed_attention(q, k, v, extent, causal, scale, backend, dilation=dilation, stride=stride,
                              border=border)


def windowed_attention(q, k, v, extent, causal=False, scale=None, backend="auto", *, dilation=1, stride=1,
                       border="clip", after=None):
    """``nearby_attention`` plus the internal ``after``: per-axis radii after the leader where
    they differ from ``extent`` (the asymmetric windows of NATTEN's even kernel sizes,
    ``nuwa3dna.natten``)."""
    extent, scale, causal, dilation, stride = check_inputs(
        q, k, v, extent, causal, scale, backend, dilation=dilation, stride=stride, border=border, after=after)
    resolved = resolve_extent(extent, tuple(k.shape[1:4]))
    options = dict(dilation=dilation, stride=stride, border=border, after=after)
    if backend == "auto":
        backend = resolve_auto(q, k, resolved, causal, **options)
    if backend == "dense":
        return dense_nearby_attention(q, k, v, extent, causal, scale, **options)
    if uses_forward_ad(q, k, v):
        raise NotImplementedError(
            "nearby_attention: forward-mode AD (torch.func.jvp / forward_ad) is not implemented "
            f"for {backend=}; use backend='dense' for it")
    # Both fast backends are torch.library custom ops: torch.compile(fullgraph=True)
    # sees one opaque op with a fake implementation and a backward. Only plain
    # windows reach Triton (check_inputs refuses the v2 options there); the torch
    # backend takes them as ``Options`` (raster causality stays the bool ``causal``).
    if backend == "triton":
        from nuwa3dna.kernels.triton.op import triton_attention
        return triton_attention(q, k, v, resolved, causal, scale)[0]
    opts = Options.of(causal, dilation, stride, border,
                      None if after is None else resolve_extent(after, tuple(k.shape[1:4])))
    return torch_attention(q, k, v, resolved, causal is True, scale, opts)[0]
