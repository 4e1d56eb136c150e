"""Every bad input gets a clear ValueError/TypeError naming the bad value, before any work."""
import numpy as np
import pytest
import torch

from nuwa3dna import NearbyAttention3D, nearby_attention
from nuwa3dna.checks import interpreter_enabled


def qkv(q_shape=(2, 3, 5, 7, 2, 8), kv_shape=None, dtype=torch.float32):
    kv_shape = kv_shape or q_shape
    return (torch.randn(q_shape, dtype=dtype), torch.randn(kv_shape, dtype=dtype),
            torch.randn(kv_shape, dtype=dtype))


BAD_CALLS = {
    "q-rank": (lambda: (torch.randn(2, 3, 5, 2, 8), *qkv()[1:]), {}, ValueError, "q.shape"),
    "k-rank": (lambda: (qkv()[0], torch.randn(3, 5, 7, 2, 8), qkv()[2]), {}, ValueError, "k.shape"),
    "batch": (lambda: qkv(kv_shape=(1, 3, 5, 7, 2, 8)), {}, ValueError, "batch"),
    "heads": (lambda: qkv(kv_shape=(2, 3, 5, 7, 3, 8)), {}, ValueError, "heads"),
    "head-dim": (lambda: qkv(kv_shape=(2, 3, 5, 7, 2, 16)), {}, ValueError, "head dim"),
    "kv-grids": (lambda: (qkv()[0], torch.randn(2, 3, 5, 7, 2, 8), torch.randn(2, 3, 4, 7, 2, 8)),
                 {}, ValueError, "v.shape"),
    "mixed-dtype": (lambda: (qkv()[0].half(), *qkv()[1:]), {}, TypeError, "q.dtype=torch.float16"),
    "int-tensor": (lambda: (torch.ones(2, 3, 5, 7, 2, 8, dtype=torch.int32), *qkv()[1:]), {},
                   TypeError, "q.dtype=torch.int32"),
    "not-tensor": (lambda: ([1.0], *qkv()[1:]), {}, TypeError, "q must be a torch.Tensor"),
    "empty": (lambda: qkv((2, 0, 5, 7, 2, 8)), {}, ValueError, "q is empty"),
    "negative-extent": (qkv, {"extent": (1, -1, 2)}, ValueError, "extent[1]"),
    "extent-len": (qkv, {"extent": (1, 2)}, ValueError, "extent=(1, 2)"),
    "extent-float": (qkv, {"extent": 1.5}, TypeError, "extent=1.5"),
    "extent-bool": (qkv, {"extent": (1, True, 1)}, TypeError, "True"),
    "extent-str": (qkv, {"extent": "123"}, TypeError, "extent='123'"),
    "causal-cross": (lambda: qkv(kv_shape=(2, 3, 4, 7, 2, 8)), {"causal": True}, ValueError, "kv grid=(3, 4, 7)"),
    "causal-type": (qkv, {"causal": "yes"}, TypeError, "causal='yes'"),
    "scale-zero": (qkv, {"scale": 0.0}, ValueError, "scale=0.0"),
    "scale-nan": (qkv, {"scale": float("nan")}, ValueError, "scale=nan"),
    "scale-str": (qkv, {"scale": "1"}, TypeError, "scale='1'"),
    "backend": (qkv, {"backend": "cuda"}, ValueError, "backend='cuda'"),
    "triton-float64": (lambda: qkv(dtype=torch.float64), {"backend": "triton"}, TypeError, "torch.float64"),
    "triton-head-dim": (lambda: qkv((1, 1, 2, 2, 1, 264)), {"backend": "triton"}, ValueError, "D=264"),
    "extent-set": (qkv, {"extent": {1, 2, 3}}, TypeError, "set"),
    "extent-dict": (qkv, {"extent": {"t": 1, "h": 1, "w": 1}}, TypeError, "dict"),
    "extent-float-tensor": (qkv, {"extent": torch.tensor(1.0)}, TypeError, "tensor(1.)"),
    "extent-vector-tensor": (qkv, {"extent": torch.tensor([1, 1, 1])}, TypeError, "shape (3,)"),
    "extent-numpy-float": (qkv, {"extent": (1, np.float64(2.0), 1)}, TypeError, "extent[1]"),
    "float64-named": (lambda: (torch.ones(2, 3, 5, 7, 2, 8, dtype=torch.complex64), *qkv()[1:]), {},
                      TypeError, "complex64"),
}


@pytest.mark.parametrize("extent", [torch.tensor(1), np.int64(1), (np.int32(1), torch.tensor(1), 1), [1, 1, 1]],
                         ids=["int-tensor", "numpy-int", "mixed-tuple", "list"])
def test_integer_like_extents_accepted(extent):
    q, k, v = qkv()
    torch.testing.assert_close(nearby_attention(q, k, v, extent), nearby_attention(q, k, v, 1))


def test_dtype_error_lists_float64():
    with pytest.raises(TypeError, match="float64"):
        nearby_attention(*[x.to(torch.int64) for x in qkv()], 1)


@pytest.mark.parametrize("case", BAD_CALLS, ids=str)
def test_bad_input_named(case):
    make, kwargs, exc, text = BAD_CALLS[case]
    kwargs = {"extent": 1, **kwargs}
    with pytest.raises(exc, match=None) as info:
        nearby_attention(*make(), **kwargs)
    assert text in str(info.value), str(info.value)


def test_mixed_devices_named():
    q, k, v = qkv()
    k = k.to("meta")
    with pytest.raises(ValueError, match="one device"):
        nearby_attention(q, k, v, 1)


def test_triton_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not interpreter_enabled()
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        nearby_attention(*qkv(), 1, backend="triton")


@pytest.mark.parametrize("kwargs,exc,text", [
    ({"dim": 0}, ValueError, "dim=0"),
    ({"dim": 16, "heads": 2.5}, ValueError, "heads=2.5"),
    ({"dim": 16, "extent": (1, -2, 1)}, ValueError, "extent[1]"),
    ({"dim": 16, "backend": "gpu"}, ValueError, "backend='gpu'"),
    ({"dim": 16, "context_dim": -3}, ValueError, "context_dim=-3"),
])
def test_module_bad_config(kwargs, exc, text):
    with pytest.raises(exc) as info:
        NearbyAttention3D(**kwargs)
    assert text in str(info.value)


def test_module_bad_inputs():
    attn = NearbyAttention3D(16, heads=2, dim_head=8, extent=1)
    with pytest.raises(ValueError, match=r"x.shape=\(2, 3, 4, 15\)"):
        attn(torch.randn(2, 3, 4, 15))
    with pytest.raises(ValueError, match="dim=16"):
        attn(torch.randn(2, 3, 4, 5, 12))
    with pytest.raises(ValueError, match="context_dim=16"):
        attn(torch.randn(2, 3, 4, 5, 16), torch.randn(2, 3, 4, 5, 12))
    with pytest.raises(ValueError, match="batch"):
        attn(torch.randn(2, 3, 4, 5, 16), torch.randn(1, 3, 4, 5, 16))
    cross = NearbyAttention3D(16, heads=2, dim_head=8, extent=1, context_dim=12)
    with pytest.raises(ValueError, match="pass a context"):
        cross(torch.randn(2, 3, 4, 5, 16))
