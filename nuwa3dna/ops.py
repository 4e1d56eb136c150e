"""``nearby_attention``: the functional entry point; validates once, then dispatches."""
from __future__ import annotations

from nuwa3dna.checks import check_inputs, uses_forward_ad
from nuwa3dna.dispatch import resolve_auto
from nuwa3dna.kernels.cpu.op import torch_attention
from nuwa3dna.kernels.geometry import resolve_extent
from nuwa3dna.reference import dense_nearby_attention


def nearby_attention(q, k, v, extent, causal=False, scale=None, backend="auto"):
    """3D Nearby Attention (NÜWA; docs/design.md).

    Args:
        q: (B, T, H, W, heads, D) queries.
        k, v: (B, T', H', W', heads, D) keys and values; a grid other than q's
            makes it cross 3DNA with rescaled centres.
        extent: radius per axis (t, h, w): an int for all axes, or a 3-tuple of
            ints >= 0 or None (None = the whole axis). Windows are clipped at borders.
        causal: also hide keys later in raster order (q and k grids must match).
        scale: score scale, default D ** -0.5.
        backend: "auto" (``nuwa3dna.dispatch.choose_backend``), "triton", "torch", "dense".

    Returns:
        (B, T, H, W, heads, D) in q's dtype and on q's device.
    """
    extent, scale = check_inputs(q, k, v, extent, causal, scale, backend)
    resolved = resolve_extent(extent, tuple(k.shape[1:4]))
    if backend == "auto":
        backend = resolve_auto(q, k, resolved, causal)
    if backend == "dense":
        return dense_nearby_attention(q, k, v, extent, causal, scale)
    if uses_forward_ad(q, k, v):
        raise NotImplementedError(
            "nearby_attention: forward-mode AD (torch.func.jvp / forward_ad) is not implemented "
            f"for {backend=}; use backend='dense' for it")
    # Both fast backends are torch.library custom ops: torch.compile(fullgraph=True)
    # sees one opaque op with a fake implementation and a backward.
    if backend == "triton":
        from nuwa3dna.kernels.triton.op import triton_attention
        return triton_attention(q, k, v, resolved, causal, scale)
    return torch_attention(q, k, v, resolved, causal, scale)
