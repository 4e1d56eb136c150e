"""The operator inside real training loops: inference mode, fork, threads, forward AD,
double backward, memory held between calls. Hangs and process-wide settings are
checked in a subprocess with a timeout, so a regression fails instead of hanging."""
import subprocess
import sys
import textwrap
import threading

import pytest
import torch

import nuwa3dna
from nuwa3dna import clear_workspace, nearby_attention, workspace_bytes
from nuwa3dna.kernels.cpu.planner import MASKS
from nuwa3dna.reference import dense_nearby_attention


def _script(code: str, timeout: float = 120.0) -> str:
    """Run ``code`` in a fresh interpreter (2 torch threads); returns stdout, fails on error/timeout."""
    pre = "import torch\ntorch.set_num_threads(2)\nfrom nuwa3dna import nearby_attention\n"
    r = subprocess.run([sys.executable, "-c", pre + textwrap.dedent(code)], capture_output=True,
                       text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def test_inference_mode_then_training(gen):
    q = torch.randn(1, 2, 4, 4, 2, 8, generator=gen)
    with torch.inference_mode():
        a = nearby_attention(q, q, q, 1, backend="torch")
    qr = q.clone().requires_grad_(True)
    b = nearby_attention(qr, qr, qr, 1, backend="torch")
    b.sum().backward()
    torch.testing.assert_close(a, b.detach())
    assert qr.grad is not None and torch.isfinite(qr.grad).all()


def test_forked_child_runs_the_op():
    """The parent used the op (worker pool started); a fork-started Pool child must not hang."""
    out = _script("""
        import multiprocessing as mp
        q = torch.randn(1, 4, 8, 8, 2, 16)
        def f(_):
            return float(nearby_attention(q, q, q, 1).sum())
        parent = f(0)
        child = mp.get_context("fork").Pool(1).map_async(f, [1]).get(timeout=60)[0]
        print(abs(parent - child) < 1e-3)
    """)
    assert out.strip() == "True"


def test_concurrent_calls_keep_thread_counts():
    """4 threads x 20 calls: afterwards the main thread and new threads still have 2 torch threads."""
    out = _script("""
        import threading
        x = torch.randn(1, 4, 16, 16, 4, 32)
        ref = nearby_attention(x, x, x, (1, 3, 3))
        bad = []
        def g():
            for _ in range(20):
                if not torch.allclose(nearby_attention(x, x, x, (1, 3, 3)), ref, atol=1e-5):
                    bad.append(1)
        ts = [threading.Thread(target=g) for _ in range(4)]
        [t.start() for t in ts]; [t.join() for t in ts]
        fresh = []
        t = threading.Thread(target=lambda: fresh.append(torch.get_num_threads())); t.start(); t.join()
        print(torch.get_num_threads(), fresh[0], len(bad))
    """)
    assert out.split() == ["2", "2", "0"]


def test_concurrent_calls_with_gradients(gen):
    """Threads calling forward and backward at once get the single-threaded answers."""
    qs = [torch.randn(1, 3, 5, 6, 2, 8, generator=gen, requires_grad=True) for _ in range(3)]
    refs = [torch.autograd.grad(dense_nearby_attention(q, q, q, 1).sum(), q)[0] for q in qs]
    got = [None] * 3

    def work(i):
        q = qs[i].detach().clone().requires_grad_()
        got[i] = torch.autograd.grad(nearby_attention(q, q, q, 1, backend="torch").sum(), q)[0]
    ts = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    for a, b in zip(got, refs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_forward_ad_is_refused_not_wrong(gen):
    q, k, v = (torch.randn(1, 2, 4, 4, 2, 8, generator=gen) for _ in range(3))
    with pytest.raises(NotImplementedError, match="forward-mode AD"):
        torch.func.jvp(lambda q: nearby_attention(q, k, v, 1, backend="torch"), (q,), (torch.randn_like(q),))
    import torch.autograd.forward_ad as fwAD
    with fwAD.dual_level(), pytest.raises(NotImplementedError, match="forward-mode AD"):
        nearby_attention(fwAD.make_dual(q, torch.randn_like(q)), k, v, 1, backend="torch")
    # The dense backend supports it: the refusal names the way out.
    _, t = torch.func.jvp(lambda q: nearby_attention(q, k, v, 1, backend="dense"), (q,), (torch.ones_like(q),))
    assert t.abs().sum() > 0


def test_vmap_still_works(gen):
    q = torch.randn(3, 1, 2, 4, 4, 2, 8, generator=gen)
    out = torch.func.vmap(lambda x: nearby_attention(x, x, x, 1, backend="torch"))(q)
    torch.testing.assert_close(out[1], dense_nearby_attention(q[1], q[1], q[1], 1), atol=1e-5, rtol=1e-4)


def test_double_backward_has_a_clear_message(gen):
    q = torch.randn(1, 2, 4, 4, 2, 8, generator=gen, requires_grad=True)
    (g,) = torch.autograd.grad(nearby_attention(q, q, q, 1, backend="torch").square().sum(), q,
                               create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward"):
        g.sum().backward()


def test_memory_is_bounded_and_freeable(gen):
    clear_workspace()
    assert workspace_bytes() == 0
    limit = nuwa3dna.kernels.cpu.planner.DEFAULT.mask_cache_limit
    for n in range(20, 60, 3):                      # many geometries: the mask cache stays bounded
        q = torch.randn(1, 1, n, n, 1, 8, generator=gen)
        nearby_attention(q, q, q, (0, 2, 2), backend="torch")
    assert 0 < MASKS.nbytes() <= limit
    assert workspace_bytes() > 0
    clear_workspace()
    assert workspace_bytes() == 0
