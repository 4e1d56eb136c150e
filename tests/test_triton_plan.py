"""The Triton launchers' plan cache (kernels/triton/launch.py ``PLANS``, issue 12 item 7).

One plan per key (shapes, dtype, device, extent, causal, options, bias shape,
arch): equal keys share it and every key element makes a new one; the cached path
gives bit-identical outputs and gradients through ``nearby_attention`` to a path
that rebuilds every plan; the cache is bounded, freed by ``clear_workspace`` and
counted by ``workspace_bytes``; threads share it safely. Plans are built on "meta"
tensors where no kernel runs; the attention runs under the Triton interpreter on
CPU (tests/conftest.py), on tiny grids. No timings here: benchmarks/NOTES.md.
"""
import threading

import pytest
import torch

import nuwa3dna
from nuwa3dna.kernels.windows import Options

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

from nuwa3dna.kernels.triton import launch  # noqa: E402  (after the interpreter is on)
from nuwa3dna.kernels.triton.plancache import PlanCache  # noqa: E402

EXTENT = (1, 2, 2)


@pytest.fixture
def plans(monkeypatch):
    """A fresh, empty plan cache for the test (the module's own is process-wide)."""
    cache = PlanCache(launch.PLAN_CACHE_SIZE)
    monkeypatch.setattr(launch, "PLANS", cache)
    return cache


def meta(B=2, grid=(3, 5, 7), heads=2, D=24, dtype=torch.float32):
    return torch.empty(B, *grid, heads, D, dtype=dtype, device="meta")


def fwd_plan(q=None, k=None, extent=EXTENT, causal=False, options=None, bias=None, arch=None):
    q = meta() if q is None else q
    return launch.launch_plan("fwd", q, q if k is None else k, extent, causal, options, bias, arch)


def test_equal_keys_share_a_plan_and_each_key_element_matters(plans):
    base = fwd_plan()
    # Equal keys from other tensor objects, strides included (strides are per-call arguments).
    transposed = torch.empty(2, 3, 5, 7, 24, 2, device="meta").transpose(-1, -2)
    assert fwd_plan() is base and fwd_plan(q=transposed) is base
    assert launch.launch_plan("fwd", meta(), meta(), list(EXTENT), False) is base     # extent as a list
    assert len(plans) == 1
    changed = {
        "shape": fwd_plan(q=meta(grid=(3, 5, 8))),
        "batch": fwd_plan(q=meta(B=3)),
        "head dim": fwd_plan(q=meta(D=32)),
        "extent": fwd_plan(extent=(1, 1, 2)),
        "causal": fwd_plan(causal=True),
        "options": fwd_plan(options=Options(stride=(1, 2, 1))),
        "dtype": fwd_plan(q=meta(dtype=torch.bfloat16)),
        "bias": fwd_plan(bias=torch.empty(2, 3, 5, 5, device="meta")),
        "bias shape": fwd_plan(bias=torch.empty(2, 5, 5, 5, device="meta")),
        "kv heads": fwd_plan(k=meta(heads=1)),
        "arch": fwd_plan(arch=80),
    }
    ids = {id(p) for p in changed.values()} | {id(base)}
    assert len(ids) == len(changed) + 1, "two keys shared a plan"
    assert len(plans) == len(changed) + 1
    # What the elements change in the plan: the launch, not just the cache slot.
    assert changed["causal"].metas[0]["CAUSAL"] and not base.metas[0]["CAUSAL"]
    assert changed["kv heads"].metas[0]["GROUPED"] and changed["bias"].metas[0]["HAS_BIAS"]
    assert changed["bias"].sizes != changed["bias shape"].sizes          # the bias radii
    assert changed["options"].tab is not None and base.tab is None
    assert changed["batch"].grid[0] == 3 * base.grid[0] // 2
    # Kinds are separate entries; a backward is one entry of three plans.
    q = meta()
    bwd = launch.launch_plan("bwd", q, q, EXTENT, False)
    assert isinstance(bwd, launch.BackwardPlan) and bwd.dq.kernel is not base.kernel
    assert launch.launch_plan("bwd", meta(), meta(), EXTENT, False) is bwd


def test_cached_plan_equals_a_fresh_build(plans):
    """The cached plan is what the builders give without the cache, and the public launch
    specs (kernels/report.py compiles them) carry it: same kernel, grid, arguments and meta."""
    q, k = meta(), meta(heads=1)
    bias = torch.empty(2, 3, 5, 5, device="meta")
    for kind in ("fwd", "dq", "dkdv", "preprocess"):
        cached = launch.launch_plan(kind, q, k, EXTENT, True, None, bias)
        fresh = launch._BUILDERS[kind](q, k, EXTENT, True, None, bias, None)
        assert (cached.kernel, cached.grid, cached.sizes) == (fresh.kernel, fresh.grid, fresh.sizes)
        assert cached.tab is None and fresh.tab is None
        assert [dict(m) for m in cached.metas] == [dict(m) for m in fresh.metas]
    lse = torch.empty(launch.stats_shape(q), device="meta")
    kernel, grid, args, m = launch.fwd_launch(q, k, k, q, lse, EXTENT, True, 0.5, bias=bias)
    p = launch.launch_plan("fwd", q, k, EXTENT, True, None, bias)
    assert (kernel, grid, m) == (p.kernel, p.grid, dict(p.metas[0])) and type(m) is dict
    assert args[7:7 + 24] == [*q.stride(), *k.stride(), *k.stride(), *q.stride()]
    assert tuple(args[31:-1]) == p.sizes and args[-1] == pytest.approx(0.5 * launch.LOG2E)
    m["CAUSAL"] = False         # a caller's edit of the returned meta leaves the plan alone
    assert p.metas[0]["CAUSAL"] is True
    with pytest.raises(TypeError):
        p.metas[0]["CAUSAL"] = False


def _attention(q, k, v, dout, causal):
    q, k, v = (x.clone().requires_grad_(True) for x in (q, k, v))
    out = nuwa3dna.nearby_attention(q, k, v, EXTENT, causal=causal, backend="triton")
    out.backward(dout)
    return [out.detach(), q.grad, k.grad, v.grad]


def _inputs(gen, B=2, grid=(3, 5, 7), heads=2, D=24):
    shape = (B, *grid, heads, D)
    return [torch.randn(shape, generator=gen).to(DEVICE) for _ in range(4)]


def test_cached_and_uncached_paths_are_bit_identical(gen, plans, monkeypatch):
    """nearby_attention (backend="triton") forward and gradients: the first call (builds the
    plans), the second (reads them) and a cache of size 0 (builds every plan again) agree
    bit for bit."""
    q, k, v, dout = _inputs(gen)
    builds = []
    counting = {kind: (lambda *a, _b=b, _k=kind: builds.append(_k) or _b(*a))
                for kind, b in launch._BUILDERS.items()}
    monkeypatch.setattr(launch, "_BUILDERS", counting)
    first = _attention(q, k, v, dout, True)
    assert sorted(builds) == ["bwd", "fwd"] and len(plans) == 2
    second = _attention(q, k, v, dout, True)
    assert len(builds) == 2, "the second call rebuilt a plan"
    monkeypatch.setattr(launch, "PLANS", PlanCache(0))
    uncached = _attention(q, k, v, dout, True)
    assert len(builds) == 4 and len(launch.PLANS) == 0
    for a, b, c in zip(first, second, uncached):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert torch.isfinite(first[0]).all()


def test_cache_is_bounded_freed_and_counted(plans):
    from nuwa3dna.memory import clear_workspace, workspace_bytes

    assert launch.PLAN_CACHE_SIZE == 256 and launch.PLANS.maxsize == 256
    batches = range(1, launch.PLAN_CACHE_SIZE + 45)      # B changes only the grid: cheap plans
    kept = {B: fwd_plan(q=meta(B=B)) for B in batches}
    assert len(plans) == launch.PLAN_CACHE_SIZE
    assert fwd_plan(q=meta(B=batches[-1])) is kept[batches[-1]]       # the newest stay
    assert fwd_plan(q=meta(B=1)) is not kept[1]                       # the oldest were dropped
    assert len(plans) == launch.PLAN_CACHE_SIZE
    # A table-path plan on a real device holds its window tables; both are counted.
    q = torch.empty(1, 3, 5, 7, 2, 16, device=DEVICE)
    tab = fwd_plan(q=q, options=Options(dilation=(1, 2, 1))).tab
    assert tab is not None and tab.device == q.device
    held = plans.nbytes()
    assert held >= launch.PLAN_CACHE_SIZE * 1000 + tab.numel() * 4
    assert workspace_bytes() >= held
    before = workspace_bytes()
    clear_workspace()
    assert len(plans) == 0 and plans.nbytes() == 0
    assert workspace_bytes() <= before - held


def test_host_side_plans_from_threads(plans, monkeypatch):
    """Four threads ask for 12 keys through a cache of 4 (constant eviction and rebuilding):
    every spec equals the one built alone, and the cache never passes its size."""
    monkeypatch.setattr(launch, "PLANS", PlanCache(4))
    keys = [(B, causal, ext) for B in (1, 2, 3) for causal in (False, True) for ext in ((1, 2, 2), (0, 1, 1))]

    def spec(key):
        B, causal, ext = key
        q = meta(B=B)
        lse = torch.empty(launch.stats_shape(q), device="meta")
        kernel, grid, args, m = launch.fwd_launch(q, q, q, q, lse, ext, causal, 0.5)
        return kernel, grid, args[7:], m

    want = {key: spec(key) for key in keys}
    errors, sizes = [], []

    def work(seed):
        g = torch.Generator().manual_seed(seed)
        try:
            for i in torch.randint(0, len(keys), (300,), generator=g).tolist():
                if spec(keys[i]) != want[keys[i]]:
                    errors.append(keys[i])
                sizes.append(len(launch.PLANS))
        except Exception as e:      # noqa: BLE001  (reported below)
            errors.append(repr(e))

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:5]
    assert max(sizes) <= 4


def test_attention_from_threads(gen, plans, monkeypatch):
    """Four threads run nearby_attention (forward and backward) with different flags at once,
    while a fifth keeps clearing the plans: each result equals the serial one bit for bit.
    The interpreter is not thread-safe (one global program id, and it patches
    triton.language while a kernel runs), so kernels run one at a time here; the plan
    lookups, argument lists and autograd run concurrently."""
    cases = [(causal, seed) for causal in (False, True) for seed in (1, 2)]
    inputs = {c: _inputs(torch.Generator().manual_seed(c[1]), B=1, grid=(2, 3, 5), D=16) for c in cases}
    want = {c: _attention(*inputs[c], c[0]) for c in cases}

    lock, real_run = threading.Lock(), launch._run

    def serial_run(spec):
        with lock:
            real_run(spec)
    monkeypatch.setattr(launch, "_run", serial_run)
    got, errors, done = {}, [], threading.Event()

    def work(c):
        try:
            got[c] = _attention(*inputs[c], c[0])
        except Exception as e:      # noqa: BLE001  (reported below)
            errors.append(repr(e))

    def clear():
        while not done.is_set():
            plans.clear()
            done.wait(0.01)

    threads = [threading.Thread(target=work, args=(c,)) for c in cases]
    clearer = threading.Thread(target=clear)
    clearer.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    clearer.join()
    assert not errors, errors
    for c in cases:
        for a, b in zip(got[c], want[c]):
            assert torch.equal(a, b), c
