"""The whole NÜWA model on backend="dense" (masked SDPA) and backend="torch" (and, for two
formations, "triton" -- the interpreter on CPU) agrees:
same logits, same loss and same parameter gradients (fp32) for every one of the eight task formations.

Dense is the ground truth of 3DNA (docs/design.md); the tiny config's extents are smaller than
its grids on every axis, so windows are clipped, causal and rescaled (sketch 2x2 -> target 4x4).
"""
import pytest
import torch
import torch.nn.functional as F

from nuwa3dna.model.config import tiny_config
from nuwa3dna.model.nuwa import Nuwa
from nuwa3dna.model.tasks import TASKS, random_formation


pytestmark = pytest.mark.usefixtures("one_thread")


def loss_and_grads(model, f, target):
    model.zero_grad()
    logits = model(f, target)
    loss = F.cross_entropy(logits.flatten(0, -2), target.flatten())
    loss.backward()
    return logits.detach(), loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                            if p.grad is not None}


def triton_interpreted():
    """CPU tensors reach the Triton kernels only under the interpreter (on a GPU machine the
    kernels' own tests cover CUDA, where fp32 dots may use TF32 and need looser tolerances)."""
    from nuwa3dna.checks import interpreter_enabled
    return interpreter_enabled() and not torch.cuda.is_available()


CASES = [(task, "torch") for task in TASKS] + [
    # Under the Triton interpreter a model pass takes seconds: two formations cover causal
    # self-attention over a video (t2v) and rescaled cross-attention to a 2x2 sketch (s2i).
    pytest.param(task, "triton", marks=pytest.mark.skipif(not triton_interpreted(), reason="Triton interpreter off"))
    for task in ("t2v", "s2i")]


@pytest.mark.parametrize("task,backend", CASES)
def test_dense_and_fast_backends_agree(task, backend, gen):
    torch.manual_seed(0)
    dense = Nuwa(config=tiny_config(backend="dense"))
    fast = Nuwa(config=tiny_config(backend=backend))
    fast.load_state_dict(dense.state_dict())
    f, target = random_formation(task, dense.config, 2, gen)
    l1, loss1, g1 = loss_and_grads(dense, f, target)
    l2, loss2, g2 = loss_and_grads(fast, f, target)
    torch.testing.assert_close(l2, l1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss2, loss1, rtol=1e-6, atol=1e-6)
    assert g1.keys() == g2.keys()
    # Every attention layer the task uses received a gradient (the comparison is not vacuous).
    assert "layers.0.self_attn.to_q.weight" in g1 and "vis_layers.0.attn.to_q.weight" in g1
    for name in g1:
        torch.testing.assert_close(g2[name], g1[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_the_comparison_sees_window_changes(gen):
    """The tolerance above is far below what one window step changes: shrinking the decoder's
    width radius by one moves the logits by orders of magnitude more than 1e-5."""
    torch.manual_seed(0)
    a = Nuwa(config=tiny_config(backend="torch"))
    b = Nuwa(config=tiny_config(backend="torch", video_extent=(1, 1, 1)))
    b.load_state_dict(a.state_dict())
    f, target = random_formation("t2v", a.config, 2, gen)
    with torch.no_grad():
        assert (a(f, target) - b(f, target)).abs().max() > 1e-3


def test_nuwa_rejects_tokens_that_do_not_fit(gen):
    nuwa = Nuwa(config=tiny_config())
    f, target = random_formation("t2v", nuwa.config, 2, gen)
    with pytest.raises(ValueError, match=r"shape \(2, 3, 4, 4\)"):
        nuwa(f, target[:, :2])
    with pytest.raises(ValueError, match="must lie in"):
        nuwa(f, target + 16)
    with pytest.raises(ValueError, match="exceeds the position tables"):
        nuwa.tgt_pos((4, 4, 4))
