"""``nearby_attention``: the functional entry point; validates once, then dispatches."""
from __future__ import annotations

from nuwa3dna.checks import check_inputs
from nuwa3dna.custom_op import torch_op
from nuwa3dna.kernels.geometry import resolve_extent
from nuwa3dna.reference import dense_nearby_attention
from nuwa3dna.torch_path import torch_nearby_attention


def nearby_attention(q, k, v, extent, causal=False, scale=None, backend="auto"):
    """3D Nearby Attention (NÜWA, SPEC.md section 1).

    Args:
        q: (B, T, H, W, heads, D) queries.
        k, v: (B, T', H', W', heads, D) keys and values; a grid other than q's
            makes it cross 3DNA with rescaled centres.
        extent: radius per axis (t, h, w): an int for all axes, or a 3-tuple of
            ints >= 0 or None (None = the whole axis). Windows are clipped at borders.
        causal: also hide keys later in raster order (q and k grids must match).
        scale: score scale, default D ** -0.5.
        backend: "auto" (Triton on CUDA, "torch" elsewhere), "triton", "torch", "dense".

    Returns:
        (B, T, H, W, heads, D) in q's dtype and on q's device.
    """
    backend = check_inputs(q, k, v, extent, causal, scale, backend)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if backend == "dense":
        return dense_nearby_attention(q, k, v, extent, causal, scale)
    extent = resolve_extent(extent, tuple(k.shape[1:4]))
    # Both fast paths go through torch.library custom ops (custom_op.py), so
    # torch.compile(fullgraph=True) sees one opaque op with a fake and a backward.
    if backend == "triton":
        from nuwa3dna.kernels.triton.op import triton_attention
        return triton_attention(q, k, v, extent, causal, scale)
    if q.device.type == "cpu":
        return torch_op(q, k, v, extent, causal, scale)
    return torch_nearby_attention(q, k, v, extent, causal, scale)
