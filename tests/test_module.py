"""NearbyAttention3D in its self and cross forms, against projections + the dense reference."""
import pytest
import torch

from nuwa3dna import NearbyAttention3D, dense_nearby_attention


def manual(attn, x, context, extent, causal):
    src = x if context is None else context
    q = attn.to_q(x).unflatten(-1, (attn.heads, attn.dim_head))
    k, v = attn.to_kv(src).unflatten(-1, (2, attn.heads, attn.dim_head)).unbind(-3)
    return attn.to_out(dense_nearby_attention(q, k, v, extent, causal).flatten(-2))


@pytest.mark.parametrize("backend", ["torch", "dense"])
@pytest.mark.parametrize("form", ["self", "self-causal", "cross"])
def test_module_forms(form, backend, gen):
    torch.manual_seed(0)
    extent = (1, None, 2)
    x = torch.randn(2, 3, 5, 7, 24, generator=gen, dtype=torch.float64)
    context = torch.randn(2, 2, 3, 4, 12, generator=gen, dtype=torch.float64) if form == "cross" else None
    attn = NearbyAttention3D(24, heads=3, dim_head=8, extent=extent, causal=form == "self-causal",
                             context_dim=12 if form == "cross" else None, backend=backend).double()
    y = attn(x, context)
    assert y.shape == x.shape
    torch.testing.assert_close(y, manual(attn, x, context, extent, form == "self-causal"))
    y.square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in attn.parameters())
