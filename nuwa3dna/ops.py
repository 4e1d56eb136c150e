"""``nearby_attention``: the functional entry point; validates once, then dispatches."""
from __future__ import annotations

from nuwa3dna.checks import check_extras, check_inputs, uses_forward_ad
from nuwa3dna.dispatch import resolve_auto
from nuwa3dna.kernels.cpu.op import torch_attention
from nuwa3dna.kernels.geometry import resolve_extent
from nuwa3dna.kernels.windows import Options
from nuwa3dna.merge import global_attention, merge_attentions
from nuwa3dna.reference import dense_nearby_attention


def nearby_attention(q, k, v, extent, causal=False, scale=None, backend="auto", *, dilation=1, stride=1,
                     border="clip", additional_keys=None, additional_values=None, bias=None,
                     return_lse=False):
    """3D Nearby Attention (NÜWA; docs/design.md).

    Args:
        q: (B, T, H, W, Hq, D) queries.
        k, v: (B, T', H', W', Hk, D) keys and values; a grid other than q's
            makes it cross 3DNA with rescaled centres. Hk may divide Hq (grouped
            kv heads, GQA/MQA: query head h uses kv head h // (Hq // Hk); no copies).
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
        additional_keys, additional_values: (B, N, Hk, D) global tokens every query
            sees besides its window (no window, no causality), in the same softmax.
        bias: (Hq, 2R_t+1, 2R_h+1, 2R_w+1) relative position bias, R = extent
            (clip) or 2*extent (shift) per axis: added to the score of each window key
            at its offset from the query's leader in dilation steps, plus R
            (docs/design.md section 8). Finite extents only. Differentiable.
        return_lse: also return the natural log-sum-exp of each query's scores,
            (B, T, H, W, Hq) float32 (float64 for float64 inputs), differentiable:
            ``merge_attentions`` combines it with attention you run yourself.

    Returns:
        (B, T, H, W, Hq, D) in q's dtype and on q's device; with ``return_lse``, (out, lse).

    Support per backend: docs/design.md section 8 and the README's support matrix.
    """
    return windowed_attention(q, k, v, extent, causal, scale, backend, dilation=dilation, stride=stride,
                              border=border, additional_keys=additional_keys,
                              additional_values=additional_values, bias=bias, return_lse=return_lse)


def windowed_attention(q, k, v, extent, causal=False, scale=None, backend="auto", *, dilation=1, stride=1,
                       border="clip", after=None, additional_keys=None, additional_values=None, bias=None,
                       return_lse=False):
    """``nearby_attention`` plus the internal ``after``: per-axis radii after the leader where
    they differ from ``extent`` (the asymmetric windows of NATTEN's even kernel sizes,
    ``nuwa3dna.natten``)."""
    extent, scale, causal, dilation, stride = check_inputs(
        q, k, v, extent, causal, scale, backend, dilation=dilation, stride=stride, border=border, after=after)
    check_extras(q, k, extent, border, after, additional_keys=additional_keys,
                 additional_values=additional_values, bias=bias, return_lse=return_lse, backend=backend)
    resolved = resolve_extent(extent, tuple(k.shape[1:4]))
    options = dict(dilation=dilation, stride=stride, border=border, after=after)
    if backend == "auto":
        backend = resolve_auto(q, k, resolved, causal, bias=bias, **options)
    if backend == "dense":
        return dense_nearby_attention(q, k, v, extent, causal, scale, **options, bias=bias,
                                      additional_keys=additional_keys, additional_values=additional_values,
                                      return_lse=return_lse)
    if uses_forward_ad(q, k, v, *(x for x in (bias, additional_keys, additional_values) if x is not None)):
        raise NotImplementedError(
            "nearby_attention: forward-mode AD (torch.func.jvp / forward_ad) is not implemented "
            f"for {backend=}; use backend='dense' for it")
    # Both fast backends are torch.library custom ops: torch.compile(fullgraph=True)
    # sees one opaque op with a fake implementation and a backward; the window
    # options travel as ``Options`` (raster causality stays the bool ``causal``).
    opts = Options.of(causal, dilation, stride, border,
                      None if after is None else resolve_extent(after, tuple(k.shape[1:4])))
    window = None if opts.plain else opts.encode()
    if backend == "triton":
        from nuwa3dna.kernels.triton.op import triton_attention
        out, lse = triton_attention(q, k, v, resolved, causal is True, scale, window, bias)
        lse = lse.permute(0, 2, 3, 4, 1)           # the kernels' (B, heads, T, H, W) -> (B, T, H, W, heads)
    else:
        out, lse = torch_attention(q, k, v, resolved, causal is True, scale, opts, bias)
    if additional_keys is not None:    # one softmax over window and global keys, merged exactly
        out, lse = merge_attentions([(out, lse), global_attention(q, additional_keys, additional_values, scale)])
    return (out, lse) if return_lse else out
