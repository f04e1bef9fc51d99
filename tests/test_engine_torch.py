"""The torch adapter gives the same numbers as the numpy reference layers."""
import numpy as np
import pytest

from engine import Pipeline, schedules
from engine.layers import mlp_stages, mse_loss

torch = pytest.importorskip("torch")
from engine.torch_stage import TorchStage, torch_loss  # noqa: E402


class _Solo:
    rank, size = 0, 1


def _torch_copy(stage):
    """A torch module with the same weights as a numpy Sequential(Linear, Tanh, ...)."""
    mods = []
    for layer in stage.layers:
        if hasattr(layer, "weight"):
            lin = torch.nn.Linear(*layer.weight.shape).double()
            with torch.no_grad():
                lin.weight.copy_(torch.from_numpy(layer.weight.T))
                lin.bias.copy_(torch.from_numpy(layer.bias))
            mods.append(lin)
        else:
            mods.append(torch.nn.Tanh())
    return torch.nn.Sequential(*mods)


@pytest.mark.parametrize("sched", [schedules.interleaved_1f1b(1, 3, 2),
                                   schedules.zero_bubble_h1(1, 3)], ids=lambda s: s.name)
def test_torch_stages_match_numpy_stages(sched):
    widths = [4, 5, 3, 2]
    ref = mlp_stages(widths, sched.num_stages, seed=2)
    tstages = [TorchStage(_torch_copy(s)) for s in ref]
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((7, 4)), rng.standard_normal((7, 2))
    loss_ref = Pipeline(_Solo(), ref, sched, loss_fn=mse_loss).step(x, y)
    loss_fn = torch_loss(torch.nn.functional.mse_loss)
    loss_t = Pipeline(_Solo(), tstages, sched, loss_fn=loss_fn).step(x, y)
    assert loss_t == pytest.approx(loss_ref, rel=1e-12)
    for s_ref, s_t in zip(ref, tstages):
        got = s_t.grads()
        want = [g.T if g.ndim == 2 else g for g in s_ref.grads()]
        for a, b in zip(got, want, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)


def test_grads_are_views_of_torch_gradients():
    stage = TorchStage(torch.nn.Linear(2, 2).double())
    stage.grads()[0][...] = 3.0
    assert float(stage.module.weight.grad[0, 0]) == 3.0
    assert len(stage.params()) == 2
