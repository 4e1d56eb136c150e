"""torch.compile(fullgraph=True) of nearby_attention and NearbyAttention3D on CPU.

The CPU backend is a torch.library custom op (kernels/cpu/op.py) with a fake
implementation and a registered backward, so Dynamo traces it without graph
breaks. One tiny shape only: compiling is slow on 2 cores.
Untested here: the Triton custom ops under compile (needs a GPU).
"""
import torch
from torch.library import opcheck

from nuwa3dna import NearbyAttention3D, nearby_attention
from nuwa3dna.problems import Problem

P = Problem(1, (2, 3, 4), 2, 8, (1, 1, 1), causal=True)


def test_opcheck_torch_ops(gen):
    """Schema, fake tensor, autograd registration and AOT dispatch of the custom op."""
    q, k, v = P.make(torch.float32, requires_grad=True, generator=gen)
    opcheck(torch.ops.nuwa3dna.torch_fwd.default, (q, k, v, [1, 1, 1], True, 0.3))
    q2, k2, v2 = Problem(1, (2, 3, 4), 1, 8, (0, 1, 1), kv_grid=(1, 2, 3)).make(
        torch.float32, requires_grad=True, generator=gen)
    opcheck(torch.ops.nuwa3dna.torch_fwd.default, (q2, k2, v2, [0, 1, 1], False, 0.5))


def test_compile_fullgraph_function_and_module(gen):
    torch._dynamo.reset()
    q, k, v = P.make(torch.float32, generator=gen)
    dout = torch.randn(q.shape, generator=gen)

    def fn(q, k, v):
        return nearby_attention(q, k, v, P.extent, causal=P.causal) * 2.0

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    qe, ke, ve = (x.clone().requires_grad_(True) for x in (q, k, v))
    qc, kc, vc = (x.clone().requires_grad_(True) for x in (q, k, v))
    oe, oc = fn(qe, ke, ve), compiled(qc, kc, vc)
    torch.testing.assert_close(oc, oe)
    ge = torch.autograd.grad(oe, (qe, ke, ve), dout)
    gc = torch.autograd.grad(oc, (qc, kc, vc), dout)
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b)

    torch.manual_seed(0)
    attn = NearbyAttention3D(16, heads=2, dim_head=8, extent=(1, 1, 1), causal=True)
    x = torch.randn(1, 2, 3, 4, 16, generator=gen)
    cattn = torch.compile(attn, fullgraph=True)      # default (inductor) backend
    ye, yc = attn(x), cattn(x)
    torch.testing.assert_close(yc, ye, atol=1e-5, rtol=1e-5)
    ye.sum().backward()
    grads_e = [p.grad.clone() for p in attn.parameters()]
    attn.zero_grad()
    yc.sum().backward()
    for p, g in zip(attn.parameters(), grads_e):
        torch.testing.assert_close(p.grad, g, atol=1e-5, rtol=1e-5)


def test_opcheck_triton_op_under_interpreter(gen):
    """The Triton custom op (interpreter on CPU): schema, fake, autograd registration."""
    import pytest
    from nuwa3dna.checks import interpreter_enabled
    if not (torch.cuda.is_available() or interpreter_enabled()):
        pytest.skip("Triton needs CUDA or the interpreter")
    import nuwa3dna.kernels.triton.op  # noqa: F401  (registers the Triton ops)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v = (x.to(device).requires_grad_(True) for x in P.make(torch.float32, generator=gen))
    opcheck(torch.ops.nuwa3dna.triton_fwd.default, (q, k, v, [1, 1, 1], True, 0.3))
