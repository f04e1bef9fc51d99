"""The torch adapter gives the same numbers as the numpy reference layers."""
import copy
import functools
import re
import sys

import numpy as np
import pytest

import engine
from engine import Pipeline, schedules
from engine.layers import mlp_stages, mse_loss

torch = pytest.importorskip("torch")
from engine.torch_stage import TorchStage, torch_loss  # noqa: E402
from engine.traced import given_as_returned  # noqa: E402


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


def test_a_pipeline_takes_an_ordinary_torch_loss_and_says_what_a_loss_returns():
    sched = schedules.one_f_one_b(1, 3)
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((7, 4)), rng.standard_normal((7, 2))
    mse = torch.nn.functional.mse_loss
    got = {}
    for name, fn in [("wrapped", torch_loss(mse)), ("plain", mse)]:
        stages = [TorchStage(_torch_copy(s)) for s in mlp_stages([4, 5, 2], 1, seed=2)]
        got[name] = (Pipeline(_Solo(), stages, sched, loss_fn=fn).step(x, y), stages[0].grads())
    assert got["plain"][0] == got["wrapped"][0]
    for a, b in zip(got["plain"][1], got["wrapped"][1], strict=True):
        np.testing.assert_array_equal(a, b)
    for fn, words in [(lambda o, t: float(mse(o, t)), "returned a float: a Pipeline's loss_fn "
                       "returns (loss, gradient of the output)"),
                      (lambda o, t: (o - t) ** 2, "returned a Tensor of shape (2, 2)")]:
        stages = [TorchStage(_torch_copy(s)) for s in mlp_stages([4, 5, 2], 1, seed=2)]
        with pytest.raises(TypeError, match=re.escape(f"pp rank 0: loss_fn(output, target) "
                                                      f"{words}")):
            Pipeline(_Solo(), stages, sched, loss_fn=fn).step(torch.from_numpy(x),
                                                               torch.from_numpy(y))
    for fn, words in [(lambda o, t: (mse(o, t), o), "a tuple of 2: a torch model's loss_fn "
                       "returns the loss as a scalar tensor"),
                      (lambda o, t: (o - t) ** 2, "(reduction='mean')"),
                      (lambda o, t: mse(o, t).item(), "not a number (no .item())"),
                      (lambda o, t: mse(o.detach(), t), "a scalar tensor without a gradient")]:
        with pytest.raises(TypeError, match=re.escape(words)):
            torch_loss(fn)(torch.zeros(3, 2), torch.ones(3, 2))
    with pytest.raises(ValueError, match=re.escape("is called as loss_fn(output, target), "
                                                   "but it takes (logits)")):
        engine.distribute(_torch_copy(mlp_stages([4, 5, 2], 1, seed=2)[0]), None,
                          loss_fn=lambda logits: logits.sum())


def _counted_solo(sched, loss_fn=None, **kw):
    """(a Pipeline on one process of a (Linear, Tanh, Linear) classifier cut
    in two, per_token_ce its loss unless told; the whole model)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6).double(), torch.nn.Tanh(),
                                torch.nn.Linear(6, 3).double())
    stages = [model[:2], model[2:]]
    pipe = Pipeline(_Solo(), stages, sched, loss_fn=loss_fn or per_token_ce, **kw)
    return pipe, model


def _counted_batch():
    rng = np.random.default_rng(0)
    x, y = torch.from_numpy(rng.standard_normal((9, 4))), torch.from_numpy(rng.integers(0, 3, 9))
    y[[0, 1, 2, 4]] = -100        # micro-batches of 3 rows count 0, 2 and 3 targets
    return x, y


@pytest.mark.parametrize("sched", [schedules.zb_v(1, 3), schedules.interleaved_1f1b(1, 3, 2)],
                         ids=lambda s: s.name)
def test_a_per_token_loss_is_the_sum_over_the_counted_targets_over_their_count(sched):
    """loss_fn returns (sum, count): the step's loss and gradients are one
    process's F.cross_entropy(..., reduction="sum") / count over the whole
    batch (the mean of the micro-batches' means, weighed by rows, was not:
    nan, micro-batch 0 counting none of its 3 targets, then 2 and 3), and so
    is eval_step's loss. A step that
    counts nothing has a loss of 0 and leaves the gradients as they were.
    nn.CrossEntropyLoss() itself (a mean) runs as that sum and count; so do
    F.cross_entropy and a function returning such a call's value (the
    criterion given a model's output taken out of a tuple), which were
    means weighed by rows (nan here). Megatron-core's (sum, count, reports)
    too, its reports as Megatron's training loop logs them (``pipe.reports``):
    a [sum, count] summed over the micro-batches then divided, one value
    averaged over them."""
    F = torch.nn.functional
    x, y = _counted_batch()
    # (what engine.distribute gives a loss_fn of a model returning {"logits": ..., "aux": None})
    dict_ce = given_as_returned(lambda out, t: ce(out["logits"], t),
                                lambda o: {"logits": o, "aux": None})
    ce = torch.nn.CrossEntropyLoss()
    for fn in (per_token_ce, torch.nn.CrossEntropyLoss(), F.cross_entropy, dict_ce, megatron_ce):
        pipe, model = _counted_solo(sched, fn)
        _, ref = _counted_solo(sched)
        total = F.cross_entropy(ref(x), y, ignore_index=-100, reduction="sum")
        want = total / (y != -100).sum()
        want.backward()
        assert pipe.step(x, y) == pytest.approx(want.item(), rel=1e-12), fn
        for p, q in zip(model.parameters(), ref.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-14)
        if fn is megatron_ce:
            assert pipe.reports.keys() == {"lm loss", "tokens", "micro-batches"}, pipe.reports
            assert pipe.reports["lm loss"].dtype == torch.float64
            assert pipe.reports["lm loss"].shape == pipe.reports["tokens"].shape == ()
            assert pipe.reports["lm loss"].item() == pytest.approx(want.item(), rel=1e-12)
            assert pipe.reports["tokens"].item() == pytest.approx(5 / 3, rel=1e-15)
            assert pipe.reports["micro-batches"] == 1.0
        else:
            assert pipe.reports == {}, pipe.reports
        assert pipe.eval_step(x, y) == pytest.approx(want.item(), rel=1e-12)
        held = [p.grad.clone() for p in model.parameters()]
        assert pipe.step(x, torch.full_like(y, -100)) == 0.0
        for p, h in zip(model.parameters(), held, strict=True):
            assert torch.equal(p.grad, h)


def test_a_per_token_loss_refuses_mixed_kinds_bad_counts_and_opt_actions():
    """A step whose micro-batches return a mean and a (sum, count) fails,
    naming both; so does a negative count, and a per-token loss under a
    schedule with OPT actions (its optimizer steps before the count is
    known); each rolled back, the gradients as they were."""
    x, y = _counted_batch()

    def mixed(logits, t):      # the loss alone where every target counts (micro-batch 2)
        loss, count = per_token_ce(logits, t)
        return loss if int(count) == len(t) else (loss, count)

    def reported(logits, t):   # reports where every target counts; others named by count
        loss, count = per_token_ce(logits, t)
        return (loss, count, {"all": 1}) if int(count) == len(t) else (loss, count)

    for fn, words, kw in [
            (mixed, "1F2: loss_fn(output, target) returned a mean (a loss alone) for "
                    "micro-batch 2 but a per-token (sum, count) for micro-batch 0", {}),
            (reported, "1F2: loss_fn(output, target) returned a per-token (sum, count, "
                       "reports) for micro-batch 2 but a per-token (sum, count) for "
                       "micro-batch 0", {}),
            (lambda o, t: (*per_token_ce(o, t), {"some" if (t != -100).any() else "none": 1}),
             "1F1: loss_fn(output, target) returned the reports {'some': a number} for "
             "micro-batch 1 but {'none': a number} for micro-batch 0", {}),
            (lambda o, t: (*per_token_ce(o, t), {"lm loss": (1.0, 2.0, 3.0)}),
             "1F0: loss_fn(output, target) returned the report 'lm loss' of shape (3,), 3 "
             "values: Megatron's training loop takes a report of 2 values", {}),
            (lambda o, t: (per_token_ce(o, t)[0], -1), "returned a count of -1.0", {}),
            (per_token_ce, "returned a per-token (sum, count), but the schedule has OPT "
                           "actions", {"optimizer": lambda stage: None})]:
        sched = schedules.zb_v(1, 3)
        if "optimizer" in kw:
            sched = engine.with_optimizer_step(sched)
        pipe, model = _counted_solo(sched, fn, **kw)
        with pytest.raises(ValueError, match=re.escape(words)):
            pipe.step(x, y)
        assert all(p.grad is None for p in model.parameters()), words
    pipe, model = _counted_solo(schedules.zb_v(1, 3), lambda o, t: (*per_token_ce(o, t),
                                                                     {"lm loss": "text"}))
    with pytest.raises(TypeError, match=re.escape("returned the report 'lm loss' as str 'text': "
                                                  "a report's value is a tensor")):
        pipe.step(x, y)
    # nn.CrossEntropyLoss() there runs as written: each micro-batch's mean, weighed by rows;
    # so does a function returning F.cross_entropy's mean
    y[0] = 1        # (micro-batch 0 counting none of its targets: torch's mean is nan)
    for fn in (torch.nn.CrossEntropyLoss(), lambda o, t: torch.nn.functional.cross_entropy(o, t)):
        pipe, model = _counted_solo(engine.with_optimizer_step(schedules.zb_v(1, 3)), fn,
                                    optimizer=lambda stage: None)
        means = [torch.nn.functional.cross_entropy(model(x[k:k + 3]), y[k:k + 3])
                 for k in (0, 3, 6)]
        assert pipe.step(x, y) == pytest.approx((sum(means) / 3).item(), rel=1e-12)


def test_a_loss_whose_kind_flips_is_called_once_a_micro_batch():
    """A function returning a mean cross entropy's value is watched; made as
    sums once it has, a call returning something else (the cross entropy
    plus a term, the next step) keeps the value it made, the same mean:
    each micro-batch calls it once (it was called again, as written: a
    stateful loss stepped twice), and its loss and gradients are one
    process's, each kind's."""
    F = torch.nn.functional
    x, y = _counted_batch()
    y[[0, 1, 2, 4]] = torch.tensor([0, 1, 2, 0])      # (every target counts: the means weigh alike)
    calls, term = [], [0.0]

    def flipping(o, t):     # the cross entropy alone in step 0, plus a term after
        calls.append(len(t))
        loss = F.cross_entropy(o, t)
        return loss + term[0] * o.square().mean() if term[0] else loss

    pipe, model = _counted_solo(schedules.interleaved_1f1b(1, 3, 2), flipping)
    _, ref = _counted_solo(schedules.interleaved_1f1b(1, 3, 2))
    for step, extra in enumerate((0.0, 0.5, 0.5)):
        calls.clear()
        term[0] = extra
        for p in (*model.parameters(), *ref.parameters()):
            p.grad = None
        got = pipe.step(x, y)
        out = ref(x)
        want = F.cross_entropy(out, y) + extra * sum(
            out[k:k + 3].square().mean() for k in (0, 3, 6)) / 3
        want.backward()
        assert len(calls) == 3, (step, calls)
        assert got == pytest.approx(want.item(), rel=1e-12), step
        for p, q in zip(model.parameters(), ref.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-14)


def test_a_loss_is_called_once_a_micro_batch_from_its_first_under_a_loss_scale():
    """Under ``step(scaler=)`` a torch loss is called once a micro-batch,
    its first call too (a function of one's own was called as written to
    see what it returns, then wrapped, then seeded: three times; a torch
    module, wrapped when given, twice); the loss is one process's."""
    F = torch.nn.functional
    x, y = _counted_batch()
    y[[0, 1, 2, 4]] = torch.tensor([0, 1, 2, 0])
    calls = []

    class Counted(torch.nn.CrossEntropyLoss):
        def forward(self, o, t):
            calls.append(len(t))
            return super().forward(o, t)

    def counted(o, t):
        calls.append(len(t))
        return F.cross_entropy(o, t)

    for fn in (counted, Counted()):
        pipe, model = _counted_solo(schedules.interleaved_1f1b(1, 3, 2), fn)
        _, ref = _counted_solo(schedules.interleaved_1f1b(1, 3, 2))
        scaler = torch.amp.GradScaler("cpu")
        want = F.cross_entropy(ref(x), y).item()
        for step in range(2):
            calls.clear()
            assert pipe.step(x, y, scaler=scaler) == pytest.approx(want, rel=1e-12)
            assert len(calls) == 3, (fn, step, calls)
            for p in model.parameters():
                p.grad = None


def test_a_loss_and_gradient_pair_on_torch_stages_still_runs_from_its_first_call():
    """A (loss, gradient) pair of one's own on torch stages: its first call
    is handed the output requiring its gradient (to be called once where it
    is a torch loss), so its gradient comes back detached, and one that
    takes the output to numpy (``.numpy()``, ``np.asarray``, which torch
    refuses on such a tensor) gets its detached values there, and one that
    changes it in place (refused alike) changes them; each is called once a
    micro-batch (those two were called again on their first, on the output
    as it is) and trains as one process's mean squared error. A torch loss
    that takes the output to numpy or changes it in place is refused on
    that call, naming the rank, as torch refuses its next ones (an
    IndexError of a 0-dim tensor came after it was called twice)."""
    x, y = _counted_batch()
    t = torch.nn.functional.one_hot(y.clamp(min=0), 3).double()
    calls = []

    def by_torch(o, t):
        calls.append(("torch", len(t)))
        d = o - t
        return float((d * d).mean()), 2 * d / d.numel()

    def by_numpy(o, t):
        calls.append(("numpy", len(t)))
        d = o.numpy() - t.numpy()
        return float((d * d).mean()), torch.from_numpy(2 * d / d.size)

    def by_asarray(o, t):
        calls.append(("asarray", len(t)))
        d = np.asarray(o) - np.asarray(t)
        return float((d * d).mean()), 2 * d / d.size

    def in_place(o, t):         # (torch refuses it on a leaf requiring its gradient)
        calls.append(("in place", len(t)))
        o -= t
        d = o.numpy()
        return float((d * d).mean()), torch.from_numpy(2 * d / d.size)

    for fn in (by_torch, by_numpy, by_asarray, in_place):
        pipe, model = _counted_solo(schedules.zb_v(1, 3), fn)
        _, ref = _counted_solo(schedules.zb_v(1, 3))
        want = torch.nn.functional.mse_loss(ref(x), t)
        want.backward()
        assert pipe.step(x, t) == pytest.approx(want.item(), rel=1e-12), fn
        for p, q in zip(model.parameters(), ref.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-14)
    assert calls == [(name, 3) for name in ("torch", "numpy", "asarray", "in place")
                     for _ in range(3)]

    def logged(o, t):       # (a torch loss logging the output's mean through numpy)
        calls.append(("logged", float(o.numpy().mean())))
        return torch.nn.functional.mse_loss(o, t)

    def shifted(o, t):
        calls.append(("shifted", len(t)))
        return torch.nn.functional.mse_loss(o.sub_(t), torch.zeros_like(t))

    for fn in (logged, shifted):
        calls.clear()
        pipe, model = _counted_solo(schedules.zb_v(1, 3), fn)
        with pytest.raises(RuntimeError, match=re.escape(
                "pp rank 0: loss_fn(output, target) returned a torch loss but took a tensor "
                "requiring its gradient out of torch (.numpy(), np.asarray) or changed it in "
                "place, which torch refuses: use .detach().numpy() or .clone() there")):
            pipe.step(x, t)
        assert len(calls) == 1, calls
        assert all(p.grad is None for p in model.parameters())


class _Runs(torch.overrides.TorchFunctionMode):
    """Notes each call of torch's losses (F.cross_entropy, F.mse_loss), the
    calls a loss module makes (as written, or as its per-token sum)."""

    def __init__(self, runs):
        super().__init__()
        self.runs = runs

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.nn.functional.cross_entropy, torch.nn.functional.mse_loss):
            self.runs.append(func.__name__)
        return func(*args, **(kwargs or {}))


def _noted(fn, calls):
    """``fn`` noting each call's rows in ``calls``."""
    def noted(o, t):
        calls.append(len(t))
        return fn(o, t)
    return noted


def _by_numpy(o, t):
    """A (loss, gradient) pair of one's own that takes a torch output to numpy."""
    d = o.numpy() - t.numpy()
    return float((d * d).mean()), torch.from_numpy(2 * d / d.size)


def _every_loss(calls, opt):
    """(name, loss_fn, whether the target is class ids, whether a module's
    runs count the calls) of each kind a Pipeline of torch stages takes,
    those of one's own noting their calls in ``calls``: a torch function,
    a pair through numpy, modules, Megatron-core's (sum, count, reports)
    (its older (mean, reports) under OPT actions, where a per-token loss is
    refused)."""
    return [("function", _noted(torch.nn.functional.mse_loss, calls), False, False),
            ("numpy pair", _noted(_by_numpy, calls), False, False),
            ("CrossEntropyLoss", torch.nn.CrossEntropyLoss(), True, True),
            ("MSELoss", torch.nn.MSELoss(), False, True),
            ("megatron", _noted(megatron_legacy if opt else megatron_ce, calls), True, False)]


@pytest.mark.parametrize("sched", [schedules.gpipe(1, 3), schedules.one_f_one_b(1, 3),
                                   schedules.interleaved_1f1b(1, 3, 2),
                                   engine.with_optimizer_step(schedules.zb_v(1, 3))],
                         ids=lambda s: s.name)
def test_every_loss_is_called_once_a_micro_batch(sched):
    """Each micro-batch calls the loss once, its first too, whatever the
    loss (``_every_loss``; engine.layers' numpy mse_loss on numpy stages)
    and the schedule (GPipe, 1F1B, interleaved, ZB-V with OPT actions), as
    torch.distributed.pipelining and DeepSpeed call it: a loss counting its
    calls, logging or drawing random numbers sees 3 calls a step of 3
    micro-batches. A pair taking the output to numpy was called twice on
    its first; so was a module loss wrapped and set as ``pipe.loss_fn``
    before the first step under OPT actions (per token, then as written).
    The losses are one process's."""
    F = torch.nn.functional
    x, y = _counted_batch()
    y = y.clamp(min=0)          # (every target counted: a mean is one process's)
    t = F.one_hot(y, 3).double()
    opt = sched.name.startswith("zb")
    kw = {"optimizer": lambda stage: None} if opt else {}
    calls, runs = [], []
    cases = _every_loss(calls, opt) + [("CrossEntropyLoss set", torch_loss(
        torch.nn.CrossEntropyLoss()), True, True)]
    for name, fn, ids, module in cases:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 6).double(), torch.nn.Tanh(),
                                    torch.nn.Linear(6, 3).double())
        stages = [model] if sched.num_stages == 1 else [model[:2], model[2:]]
        pipe = Pipeline(_Solo(), stages, sched, loss_fn=fn, **kw)
        if name.endswith("set"):        # (set in place of the one given, before a step)
            pipe.loss_fn = fn
        target = y if ids else t
        with torch.no_grad():
            want = (F.cross_entropy if ids else F.mse_loss)(model(x), target).item()
        for step in range(2):
            calls.clear()
            runs.clear()
            with _Runs(runs):
                got = pipe.step(x, target)
            assert len(runs if module else calls) == 3, (name, step, calls, runs)
            assert got == pytest.approx(want, rel=1e-12), (name, step)
    stages = mlp_stages([4, 5, 3], sched.num_stages, seed=2)
    pipe = Pipeline(_Solo(), stages, sched, loss_fn=_noted(mse_loss, calls), **kw)
    xs, ts = x.numpy(), t.numpy()
    for stage in stages:
        xs = stage.forward(xs)[0]
    for step in range(2):
        calls.clear()
        assert pipe.step(x.numpy(), ts) == pytest.approx(mse_loss(xs, ts)[0], rel=1e-12)
        assert calls == [3, 3, 3], (step, calls)


def test_every_loss_is_called_once_a_micro_batch_through_distribute():
    """engine.distribute's jobs call the loss once a micro-batch too
    (``_every_loss`` but the pair through numpy: a torch model's loss is a
    torch loss; engine.layers' mse_loss on an engine.layers model), under
    GPipe, 1F1B, interleaved and ZB-V (pp=1: the last two on two stages;
    OPT actions are a Pipeline's, given its optimizer), the losses one
    process's."""
    import mesh
    from engine.layers import Sequential
    F = torch.nn.functional
    x, y = _counted_batch()
    y = y.clamp(min=0)
    t = F.one_hot(y, 3).double()
    calls, runs = [], []
    with mesh.init() as world:
        grid = mesh.grid(world, pp=1)
        for n, schedule in enumerate(("gpipe", "1f1b", "interleaved", "zb-v")):
            args = dict(schedule=schedule, microbatches=3, balance="uniform", verbose=False)
            for k, (name, fn, ids, module) in enumerate(_every_loss(calls, False)):
                if name == "numpy pair":
                    continue
                torch.manual_seed(0)
                model = torch.nn.Sequential(torch.nn.Linear(4, 6).double(), torch.nn.Tanh(),
                                            torch.nn.Linear(6, 3).double())
                target = y if ids else t
                with torch.no_grad():
                    want = (F.cross_entropy if ids else F.mse_loss)(model(x), target).item()
                job = engine.distribute(model, grid, loss_fn=fn, tag_base=(n * 6 + k) << 16,
                                        **args)
                for step in range(2):
                    calls.clear()
                    runs.clear()
                    with _Runs(runs):
                        got = job.step(x, target)
                    assert len(runs if module else calls) == 3, (schedule, name, calls, runs)
                    assert got == pytest.approx(want, rel=1e-12), (schedule, name, step)
            layers = Sequential(*mlp_stages([4, 5, 3], 1, seed=2)[0].layers)
            xs, ts = x.numpy(), t.numpy()
            want = mse_loss(layers.forward(xs)[0], ts)[0]
            job = engine.distribute(layers, grid, loss_fn=_noted(mse_loss, calls),
                                    tag_base=(n * 6 + 5) << 16, **args)
            for step in range(2):
                calls.clear()
                assert job.step(xs, ts) == pytest.approx(want, rel=1e-12), (schedule, step)
                assert calls == [3, 3, 3], (schedule, step, calls)


def megatron_legacy(o, t):
    """Megatron's older loss_func: (mean, {"lm loss": the mean, detached})."""
    loss = torch.nn.functional.cross_entropy(o, t)
    return loss, {"lm loss": loss.detach().clone(), "rows": len(t)}


def test_megatrons_older_mean_and_reports_are_averaged_as_megatron_averages_them():
    """Megatron's older loss_func returns (loss_mean, {"lm loss": mean}):
    the loss a mean, weighed by rows as a mean alone; each report averaged
    over the step's micro-batches (Megatron's training loop's mean over
    them, each micro-batch one) in ``pipe.reports``, in step and eval_step;
    beside a mean alone or a per-token loss in one step, refused naming both
    micro-batches."""
    F = torch.nn.functional
    rng = np.random.default_rng(1)      # 10 rows: micro-batches of 3, 3 and 4, which the
    # loss weighs by rows and the reports not
    x, y = torch.from_numpy(rng.standard_normal((10, 4))), torch.from_numpy(
        rng.integers(0, 3, 10))
    for sched in (schedules.zb_v(1, 3), schedules.interleaved_1f1b(1, 3, 2)):
        pipe, model = _counted_solo(sched, megatron_legacy)
        _, ref = _counted_solo(sched)
        want = F.cross_entropy(ref(x), y)
        want.backward()
        means = [F.cross_entropy(ref(x[a:b]), y[a:b]).item() for a, b in ((0, 3), (3, 6),
                                                                             (6, 10))]
        assert pipe.step(x, y) == pytest.approx(want.item(), rel=1e-12)
        for p, q in zip(model.parameters(), ref.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-14)
        assert pipe.reports.keys() == {"lm loss", "rows"}, pipe.reports
        assert pipe.reports["lm loss"].dtype == torch.float64
        assert pipe.reports["lm loss"].item() == pytest.approx(np.mean(means), rel=1e-12)
        assert pipe.reports["rows"] == pytest.approx(10 / 3, rel=1e-15)     # (a number's: float)
        assert abs(np.mean(means) - want.item()) > 1e-3      # (the mean of means: not the loss)
        assert pipe.eval_step(x, y) == pytest.approx(want.item(), rel=1e-12)
        assert pipe.reports["lm loss"].item() == pytest.approx(np.mean(means), rel=1e-12)
    for fn, words in [
            (lambda o, t: 1.0 * megatron_legacy(o, t)[0] if len(t) == 4  # (not read as
             else megatron_legacy(o, t),                                     # per-token)
             "returned a mean (a loss alone) for micro-batch 2 but a mean and its reports "
             "(loss, reports) for micro-batch 0"),
            (lambda o, t: per_token_ce(o, t) if len(t) == 4 else megatron_legacy(o, t),
             "returned a per-token (sum, count) for micro-batch 2 but a mean and its reports "
             "(loss, reports) for micro-batch 0")]:
        pipe, model = _counted_solo(schedules.interleaved_1f1b(1, 3, 2), fn)
        with pytest.raises(ValueError, match=re.escape(words)):
            pipe.step(x, y)


def test_a_torch_loss_of_ones_own_takes_numpy_targets():
    """README: a torch stage's loss may be "a function of your own"; given
    numpy targets its first call got them as they came (torch_loss turns
    them into tensors only once it is wrapped), and F.cross_entropy failed
    there: "argument 'target' ... must be Tensor, not numpy.ndarray"."""
    F = torch.nn.functional
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3).double()
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((7, 4)), rng.integers(0, 3, 7)
    stage = TorchStage(copy.deepcopy(model))
    pipe = Pipeline(_Solo(), stage, schedules.one_f_one_b(1, 3),
                    loss_fn=lambda logits, t: F.cross_entropy(logits, t))
    loss = pipe.step(x, y)
    want = F.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y))
    want.backward()
    want = float(want.detach())
    assert loss == pytest.approx(want, rel=1e-12)
    for p, q in zip(stage.module.parameters(), model.parameters(), strict=True):
        np.testing.assert_allclose(p.grad.numpy(), q.grad.numpy(), rtol=1e-10)
    assert pipe.eval_step(x, y) == pytest.approx(want, rel=1e-12)


def test_grads_are_views_of_torch_gradients():
    stage = TorchStage(torch.nn.Linear(2, 2).double())
    stage.grads()[0][...] = 3.0
    assert float(stage.module.weight.grad[0, 0]) == 3.0
    assert len(stage.params()) == 2


def test_float64_input_to_a_float32_stage():
    """Inputs are cast to the module's dtype; the input gradient keeps theirs."""
    torch.manual_seed(0)
    stage = TorchStage(torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Tanh()))
    x = np.random.default_rng(0).standard_normal((4, 3))
    y, ctx = stage.forward(x)
    assert y.dtype == torch.float32
    gx = stage.backward(ctx, torch.ones_like(y))
    assert gx.dtype == torch.float64 and gx.shape == x.shape
    gx_i, wctx = stage.backward_input(stage.forward(x)[1], np.ones(tuple(y.shape)))
    assert gx_i.dtype == torch.float64
    np.testing.assert_allclose(gx_i.numpy(), gx.numpy(), rtol=1e-6)
    stage.backward_weight(wctx)
    assert stage.grads()[0].dtype == np.float32


def test_split_backward_of_a_stage_without_parameters():
    stage = TorchStage(torch.nn.Tanh())
    y, ctx = stage.forward(np.ones((2, 3)))
    gx, wctx = stage.backward_input(ctx, torch.ones_like(y))
    stage.backward_weight(wctx)
    assert gx.shape == (2, 3) and stage.grads() == []


def test_a_stage_whose_first_layer_changes_its_input_in_place():
    """A cut right before an ``nn.ReLU(inplace=True)`` (torchvision's AlexNet
    in DeepSpeed's pipeline example, cut by parameters): the stage feeds it
    a copy of the input's leaf, which an in-place change to would refuse."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 2)
    stage = TorchStage(torch.nn.Sequential(torch.nn.ReLU(inplace=True), copy.deepcopy(lin)))
    x = torch.randn(4, 3)
    y, ctx = stage.forward(x)
    gx = stage.backward(ctx, torch.ones_like(y))
    xr = x.clone().requires_grad_(True)
    lin(torch.relu(xr)).backward(torch.ones(4, 2))
    assert torch.equal(gx, xr.grad) and torch.equal(y, lin(torch.relu(x)))


def test_default_zero_grad_leaves_grads_usable():
    """torch's zero_grad() sets .grad to None: grads() and backward_weight
    put zeros back in place, and grads() views the current tensors."""
    stage = TorchStage(torch.nn.Linear(2, 2).double())
    opt = torch.optim.SGD(stage.module.parameters(), lr=0.1)
    opt.zero_grad()
    assert [float(np.abs(g).sum()) for g in stage.grads()] == [0.0, 0.0]
    opt.zero_grad()
    _, ctx = stage.forward(np.ones((1, 2)))
    _, wctx = stage.backward_input(ctx, np.ones((1, 2)))
    stage.backward_weight(wctx)
    grads = stage.grads()
    grads[1][...] = 7.0
    assert float(stage.module.bias.grad[0]) == 7.0


WIDTHS, ROWS, STEPS, LR = [5, 8, 6, 4, 3], 16, 3, 0.1


def _torch_model():
    torch.manual_seed(3)
    layers = []
    for i, (a, b) in enumerate(zip(WIDTHS, WIDTHS[1:])):
        layers += [torch.nn.Linear(a, b).double()] + ([torch.nn.Tanh()] if i < 3 else [])
    return torch.nn.Sequential(*layers)


def _torch_data(step):
    rng = np.random.default_rng(50 + step)
    return rng.standard_normal((ROWS, WIDTHS[0])), rng.standard_normal((ROWS, WIDTHS[-1]))


class _Recording(TorchStage):
    """A TorchStage that notes the kinds of activations and gradients it is
    handed (point-to-point carries tensors between stages)."""

    def __init__(self, module, index):
        super().__init__(module)
        self.index, self.kinds = index, set()

    def forward(self, x):
        self.kinds.add(f"stage {self.index} forward: {type(x).__name__}")
        return super().forward(x)

    def backward(self, ctx, gy):
        self.kinds.add(f"backward: {type(gy).__name__}")
        return super().backward(ctx, gy)

    def backward_input(self, ctx, gy):
        self.kinds.add(f"backward: {type(gy).__name__}")
        return super().backward_input(ctx, gy)


def _counted_data(step):
    """``_torch_data``'s inputs and class ids (of WIDTHS[-1]), -100 where not
    counted: each micro-batch and each dp replica counts another number."""
    x, _ = _torch_data(step)
    rng = np.random.default_rng(80 + step)
    y = rng.integers(0, WIDTHS[-1], ROWS)
    y[rng.random(ROWS) < 0.4] = -100
    y[:3] = -100
    return x, y


def per_token_ce(logits, y):
    """A per-token loss: the cross entropy summed over the counted targets,
    and their count."""
    return (torch.nn.functional.cross_entropy(logits, y, ignore_index=-100, reduction="sum"),
            (y != -100).sum())


def megatron_ce(logits, y, name="lm loss"):
    """Megatron-core's per-token loss_func: (sum, count, reports)."""
    loss, count = per_token_ce(logits, y)
    count = count.to(torch.int)
    return loss, count, {name: torch.cat([loss.clone().detach().view(1), count.view(1)]),
                         "tokens": count.view(1), "micro-batches": 1}


def legacy_squared(o, t):
    """Megatron's older loss_func over every row (no -100), and its square
    reported too (a mean of squares: not the square of the mean)."""
    loss, reports = megatron_legacy(o, t.clamp(min=0))
    return loss, {"lm loss": reports["lm loss"], "squared": reports["lm loss"] ** 2}


def _torch_dp_pp(world, names):
    """dp=2 x pp=2, TorchStages and torch SGD with the default zero_grad();
    then a per-token loss (``per_token_ce``; Megatron-core's with its
    reports under 1F1B; nn.CrossEntropyLoss in a lambda under ZB-H1, which
    runs as the same sum and count), its eval_step, and steps whose dp
    replicas' losses are of both kinds, or report other names."""
    import mesh
    from engine.executor import split_microbatches, stages_for_rank
    grid = mesh.grid(world, dp=2, pp=2)
    pp, d = grid.group("pp"), grid.coord("dp")
    out = {}
    for name in names:
        sched = schedules.by_name(name, pp.size, 4)
        mine = stages_for_rank([TorchStage(m) for m in (_torch_model()[:4], _torch_model()[4:])],
                               sched, pp.rank)
        opt = torch.optim.SGD([p for s in mine for p in s.module.parameters()], lr=LR)
        ce = torch.nn.CrossEntropyLoss(ignore_index=-100)
        fn = {"1f1b": megatron_ce, "zb-h1": lambda o, t: ce({"logits": o}["logits"], t)}[name]
        pipe = Pipeline(grid, mine, sched, loss_fn=fn, timeout=30)
        losses, reports = [], []
        for step in range(STEPS):
            x, y = (split_microbatches(a, 2)[d] for a in _counted_data(step))
            opt.zero_grad()
            losses.append(pipe.step(x if pipe.first else None, y if pipe.last else None))
            reports.append(pipe.reports)
            opt.step()
        x, y = (split_microbatches(a, 2)[d] for a in _counted_data(0))
        losses.append(pipe.eval_step(x if pipe.first else None, y if pipe.last else None))
        reports.append(pipe.reports)
        out[name + " per-token"] = ({s: [p.detach().numpy().copy() for p in st.module.parameters()]
                                     for s, st in pipe.stages.items()}, losses, reports)
    for way, fn in [("mixed", torch_loss(per_token_ce) if d == 0 else torch_loss(
                        torch.nn.functional.cross_entropy, per_token=False)),
                    ("named", torch_loss(functools.partial(megatron_ce,
                                                           name="lm loss" if d else "loss")))]:
        pipe.loss_fn = fn
        try:
            pipe.step(x if pipe.first else None, y if pipe.last else None)
            out[way] = "no error"
        except Exception as e:
            out[way] = f"{type(e).__name__}: {e}"
        out[way + " reports"] = pipe.reports     # (a failed step's: none)
    # Megatron's older (mean, reports): the loss on every rank, the reports averaged over
    # the micro-batches and the dp replicas (the trained weights kept: no optimizer step)
    pipe.loss_fn = torch_loss(legacy_squared)
    out["legacy"] = (pipe.step(x if pipe.first else None, y if pipe.last else None),
                     pipe.reports)
    # a function returning F.cross_entropy's value, then that plus a term: each step's loss
    # on every rank, each micro-batch's loss called once
    calls, term = [], [0.0]

    def flipping(o, t):
        calls.append(len(t))
        loss = torch.nn.functional.cross_entropy(o, t.clamp(min=0))
        return loss + term[0] * o.square().mean() if term[0] else loss

    pipe.loss_fn = torch_loss(flipping)
    out["flipping"] = []
    for term[0] in (0.0, 0.5):
        calls.clear()
        out["flipping"].append((pipe.step(x if pipe.first else None, y if pipe.last else None),
                                len(calls)))
    for name in names:
        sched = schedules.by_name(name, pp.size, 4, chunks=2)
        blocks = list(_torch_model())           # 4 blocks of (Linear, Tanh), the last alone
        per = [blocks[i:i + 2] for i in range(0, len(blocks), 2)]
        k = len(per) // sched.num_stages
        stages = [_Recording(torch.nn.Sequential(*sum(per[s * k:(s + 1) * k], [])), s)
                  for s in range(sched.num_stages)]
        mine = stages_for_rank(stages, sched, pp.rank)
        opt = torch.optim.SGD([p for s in mine for p in s.module.parameters()], lr=LR)
        pipe = Pipeline(grid, mine, sched, loss_fn=torch_loss(torch.nn.functional.mse_loss),
                        timeout=30)
        for step in range(STEPS):
            x, y = (split_microbatches(a, 2)[d] for a in _torch_data(step))
            opt.zero_grad()
            pipe.step(x if pipe.first else None, y if pipe.last else None)
            opt.step()
        out[name] = {s: [p.detach().numpy().copy() for p in st.module.parameters()]
                     for s, st in pipe.stages.items()}
        out[name + " kinds"] = sorted(set().union(*(st.kinds for st in mine)))
    return out


@pytest.mark.timeout(200)    # four processes importing torch on a loaded machine
def test_dp2_pp2_torch_stages_with_default_zero_grad_match_one_process():
    import mesh
    names = ["1f1b", "zb-h1"]
    results = mesh.spawn(_torch_dp_pp, 4, names, timeout=180)
    model = _torch_model()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for step in range(STEPS):
        x, y = (torch.from_numpy(a) for a in _torch_data(step))
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    want = [p.detach().numpy() for p in model.parameters()]
    _check_per_token_dp_pp(results, names)
    for name in names:
        kinds = sorted(set().union(*(res[name + " kinds"] for res in results)))
        assert kinds == ["backward: Tensor", "stage 0 forward: ndarray",
                         "stage 1 forward: Tensor"], kinds
        for d in range(2):
            got = {}
            for r in range(2):
                got.update(results[d * 2 + r][name])
            flat = [p for s in sorted(got) for p in got[s]]
            assert len(flat) == len(want)
            for a, b in zip(flat, want):
                np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12, err_msg=f"{name} dp {d}")


def _check_per_token_dp_pp(results, names):
    """``_torch_dp_pp``'s per-token training: one process's sum over every
    counted token over their count, in its weights, losses and eval loss;
    replicas of both kinds of loss fail the step on every rank."""
    import torch.nn.functional as F
    model, losses, sums = _torch_model(), [], []
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for step in range(STEPS):
        x, y = (torch.from_numpy(a) for a in _counted_data(step))
        opt.zero_grad()
        total = F.cross_entropy(model(x), y, ignore_index=-100, reduction="sum")
        loss = total / (y != -100).sum()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        sums.append([total.item(), (y != -100).sum().item()])
    x, y = (torch.from_numpy(a) for a in _counted_data(0))
    with torch.no_grad():
        losses.append(F.cross_entropy(model(x), y, ignore_index=-100).item())
        sums.append([F.cross_entropy(model(x), y, ignore_index=-100, reduction="sum").item(),
                     (y != -100).sum().item()])
    want = [p.detach().numpy() for p in model.parameters()]
    with torch.no_grad():       # Megatron's older (mean, reports), by Megatron's training loop
        x, y = (torch.from_numpy(a) for a in _counted_data(0))
        means = [F.cross_entropy(model(x[k:k + 2]), y[k:k + 2].clamp(min=0)).item()
                 for k in range(0, ROWS, 2)]         # (2 replicas x 4 micro-batches of 2 rows)
        loss = F.cross_entropy(model(x), y.clamp(min=0)).item()
        plus = loss + 0.5 * model(x).square().mean().item()    # (micro-batches of 2 rows alike)
    for r, res in enumerate(results):
        # the flipping loss: one call a micro-batch (4 on the last stage's ranks), the
        # step's loss on every rank
        (first, n0), (then, n1) = res["flipping"]
        assert (n0, n1) == ((4, 4) if r % 2 else (0, 0)), (r, n0, n1)
        np.testing.assert_allclose([first, then], [loss, plus], rtol=1e-10, err_msg=f"rank {r}")
        got, reports = res["legacy"]
        assert reports.keys() == {"lm loss", "squared"}, (r, reports)
        np.testing.assert_allclose(got, loss, rtol=1e-10, err_msg=f"rank {r}")
        np.testing.assert_allclose(reports["lm loss"].item(), np.mean(means), rtol=1e-10)
        np.testing.assert_allclose(reports["squared"].item(), np.mean(np.square(means)),
                                   rtol=1e-10, err_msg=f"rank {r}")
    for name in names:
        for d in range(2):
            got = {}
            for r in range(2):
                params, said, reports = results[d * 2 + r][name + " per-token"]
                got.update(params)
                if said[0] is not None:
                    np.testing.assert_allclose(said, losses, rtol=1e-10, err_msg=name)
                # Megatron-core's reports as its training loop logs them, on every rank: a
                # [sum, count] summed over micro-batches and replicas then divided, one value
                # averaged over the micro-batches (2 replicas x 4)
                for step, (rep, (total, count)) in enumerate(zip(reports, sums, strict=True)):
                    if name != "1f1b":
                        assert rep == {}, (name, rep)
                        continue
                    assert set(rep) == {"lm loss", "tokens", "micro-batches"}, rep
                    assert rep["lm loss"].dtype == torch.float64 and rep["lm loss"].shape == ()
                    np.testing.assert_allclose(rep["lm loss"].item(), total / count,
                                               rtol=1e-10, err_msg=f"step {step}")
                    np.testing.assert_allclose(rep["tokens"].item(), count / 8, rtol=1e-12)
                    assert rep["micro-batches"] == 1.0, rep
            flat = [p for s in sorted(got) for p in got[s]]
            for a, b in zip(flat, want, strict=True):
                np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12, err_msg=f"{name} dp {d}")
    for r, res in enumerate(results):
        assert ("returned a per-token (sum, count) on dp replicas [0] but a mean (a loss "
                "alone) on dp replicas [1]") in res["mixed"], (r, res["mixed"])
        assert ("loss_fn(output, target) returned other reports on other dp replicas (dp "
                "replica 0: {'loss': tensor of shape (2,), 'micro-batches': a number, 'tokens': "
                "tensor of shape (1,)}; dp replica 1: {'lm loss': tensor of shape (2,), "
                "'micro-batches': a number, 'tokens': tensor of shape (1,)}): every replica's "
                "loss reports the same names; rolled back on every rank"
                ) in res["named"], (r, res["named"])
        assert res["named reports"] == {}, res["named reports"]


class _Gate(torch.nn.Module):
    """(x, mask) -> (mask, tanh(fc(x)) * mask): a tuple in and out, an
    integer part with no gradient."""

    def __init__(self, w, last=False):
        super().__init__()
        self.fc, self.last = torch.nn.Linear(w, w).double(), last
        self.fail = 0

    def forward(self, xs):
        x, mask = xs if isinstance(xs, tuple) else (xs, (xs[:, :1] > 0).long())
        if self.fail:
            self.fail -= 1
            raise RuntimeError("a stage's own error")
        y = torch.tanh(self.fc(x)) * mask
        return y if self.last else (y, mask)


def test_a_stage_taking_and_returning_a_tuple():
    """Each part gets its gradient (None for the integer one); the split
    backward gives what the whole one does."""
    torch.manual_seed(0)
    stage = TorchStage(_Gate(3))
    x, mask = torch.randn(4, 3, dtype=torch.float64), torch.tensor([[1], [0], [1], [1]])
    out, ctx = stage.forward((x, mask))
    (y, m), fixed = out, out.fixed               # the mask: no gradient wanted back
    assert torch.equal(m, mask) and not y.requires_grad and fixed == (1,)
    gx, gm = stage.backward(ctx, (torch.ones_like(y), None))
    assert gm is None and gx.shape == x.shape and not gx[1].any()
    whole = [g.copy() for g in stage.grads()]
    for g in stage.grads():
        g[...] = 0
    (gx2, gm2), wctx = stage.backward_input(stage.forward((x, mask))[1], (np.ones((4, 3)), None))
    stage.backward_weight(wctx)
    assert gm2 is None
    torch.testing.assert_close(gx2, gx)
    for a, b in zip(stage.grads(), whole, strict=True):
        np.testing.assert_allclose(a, b)
    # a float part the sender marked fixed (made from its input alone): a
    # constant here, no gradient computed or sent back for it
    from engine.torch_stage import Parts
    scale = torch.full((4, 1), 0.5, dtype=torch.float64)
    _, ctx = stage.forward(Parts((x, scale), fixed=[1]))
    _, gs = stage.backward(ctx, (torch.ones_like(y), None))
    assert gs is None
    _, ctx = stage.forward((x, scale))
    assert stage.backward(ctx, (torch.ones_like(y), None))[1].shape == (4, 1)


def _tuple_pipeline(world):
    """pp=2 of _Gate stages: (activation, mask) tuples cross the ranks; a
    step failing on the second rank (its stage raises) is rolled back on
    both, and the next steps train as one process would."""
    import mesh
    from engine.executor import stages_for_rank
    grid = mesh.grid(world, pp=2)
    torch.manual_seed(1)
    stages = [_Gate(3), _Gate(3), _Gate(3), _Gate(3, last=True)]
    sched = schedules.by_name("interleaved", 2, 2, chunks=2)
    mine = stages_for_rank(stages, sched, grid.group("pp").rank)
    pipe = Pipeline(grid, mine, sched, loss_fn=torch_loss(torch.nn.functional.mse_loss),
                    timeout=30)
    if pipe.rank == 1:
        mine[0].fail = 1
    x, y = _gate_data()
    try:
        pipe.step(x, y)
        failed = None
    except (RuntimeError, mesh.MeshError) as e:     # the peer: its messages aborted
        failed = type(e).__name__
    losses = [pipe.step(x, y) for _ in range(2)]
    return {"failed": failed, "losses": losses if pipe.last else None,
            "grads": {s: [g.copy() for g in st.grads()] for s, st in pipe.stages.items()}}


def _gate_data():
    rng = np.random.default_rng(9)
    return rng.standard_normal((6, 3)), rng.standard_normal((6, 3))


@pytest.mark.timeout(200)
def test_tuples_between_ranks_and_a_failed_step_rolled_back():
    import mesh
    out = mesh.spawn(_tuple_pipeline, 2, timeout=180)
    assert out[1]["failed"] == "RuntimeError" and out[0]["failed"] in ("MeshError", "StepFailed")
    torch.manual_seed(1)
    model = torch.nn.Sequential(_Gate(3), _Gate(3), _Gate(3), _Gate(3, last=True))
    x, y = (torch.from_numpy(a) for a in _gate_data())
    losses = []
    for _ in range(2):
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        losses.append(loss.item())
    np.testing.assert_allclose(out[1]["losses"], losses, rtol=1e-12)
    got = {**out[0]["grads"], **out[1]["grads"]}
    for s, layer in enumerate(model):
        for a, p in zip(got[s], layer.parameters(), strict=True):
            np.testing.assert_allclose(a, p.grad.numpy(), rtol=1e-10)


def _dropout_model():
    torch.manual_seed(4)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.3), torch.nn.Tanh(),
                               torch.nn.Linear(8, 8), torch.nn.Dropout(0.3), torch.nn.Tanh(),
                               torch.nn.Linear(8, 2)).double()


def test_a_recomputing_stage_draws_the_same_dropout_masks():
    """recompute: the forward runs without a graph and again in the
    backward (split or whole) with the generator's state it first had; the
    outputs, gradients and the generator's later draws are a plain stage's."""
    x = torch.randn(5, 4, dtype=torch.float64)
    got = {}
    # ("*": selective recompute of every submodule; ("1", "4"): the dropouts;
    # "layered": layer by layer, each layer's draws its own)
    for recompute in (False, True, "*", ("1", "4"), "layered"):
        torch.manual_seed(1)
        stage = (TorchStage(_dropout_model(), True, layered=True) if recompute == "layered"
                 else TorchStage(_dropout_model(), recompute=recompute))
        y, ctx = stage.forward(x)
        y2, ctx2 = stage.forward(x)
        gx = stage.backward(ctx, torch.ones_like(y))
        gx2, wctx = stage.backward_input(ctx2, 2 * torch.ones_like(y2))
        stage.backward_weight(wctx)
        got[recompute] = [y, y2, gx, gx2, *map(torch.from_numpy, stage.grads()), torch.rand(3)]
    for k in (True, "*", ("1", "4"), "layered"):
        for a, b in zip(got[False], got[k], strict=True):
            assert torch.equal(a, b), k
    assert TorchStage(_dropout_model(), recompute=("1", "4")).checkpointed == ["1", "4"]
    with pytest.raises(ValueError, match=r"recompute='9' matches no submodule of Sequential "
                                         r"\(its submodules: 0, 1, 2"):
        TorchStage(_dropout_model(), recompute="9")
    with pytest.raises(TypeError, match=r"layered=True\) recomputes an nn.Sequential's layers "
                                        r"one by one: it needs recompute=True and an "
                                        r"nn.Sequential, not recompute=False and a Sequential"):
        TorchStage(_dropout_model(), layered=True)
    with pytest.raises(TypeError, match=r"recompute=True and a Linear"):
        TorchStage(torch.nn.Linear(2, 2), True, layered=True)


class _Biased(torch.nn.Module):      # (h, a mask's bias): the bias needs no gradient
    def __init__(self, first=False, changes=False, ids=False):
        super().__init__()
        self.fc, self.first, self.changes = torch.nn.Linear(4, 4), first, changes
        self.ids = ids              # (h, ids): int64 counts, not a float bias

    def forward(self, x):
        if self.first:
            mask = (x[:, :1] > 0)
            return torch.tanh(self.fc(x)), mask.long() if self.ids else mask.to(x.dtype) * -0.5
        h, bias = x
        if self.changes:            # changed in place, as one process's code may
            bias.add_(1) if self.ids else bias.mul_(2)
        scale = 1 - 0.25 * bias if self.ids else 1 + bias
        return torch.tanh(self.fc(h) * scale), bias


def test_a_recomputing_stage_keeps_the_parts_it_takes_uncopied_as_they_came():
    """A part of a recomputing stage's input that no gradient goes back to
    (a mask's bias) is taken as it came, not copied; changed in place by the
    stage (or by a later one on the rank, where it is handed on), the
    recompute read the changed values: weight gradients 0.75 off one
    process's, with nothing said. Whole, split and layer by layer; and
    (until the forty-third session) a layer deep in a layer-by-layer
    recompute, whose input is the layer before's output (a float bias, or
    int64 ids, changed in place by that layer or a later one): kept as it
    was handed on, its recompute read the changed values."""
    def model(ids=False):
        torch.manual_seed(0)
        return [_Biased(first=True, ids=ids).double(), _Biased(changes=True, ids=ids).double(),
                _Biased(changes=True, ids=ids).double()]
    x = torch.randn(3, 4, dtype=torch.float64)
    for way in ("whole", "split", "layered", "deep", "deep ids", "deep split ids"):
        ref = model(ids="ids" in way)
        out = torch.nn.Sequential(*ref)(x)[0]
        out.sum().backward()
        want = [p.grad for m in ref for p in m.parameters()]
        mods = model(ids="ids" in way)
        if way.startswith("deep"):      # both changing layers in one layered stage
            stages = [TorchStage(mods[0]), TorchStage(torch.nn.Sequential(*mods[1:]), True,
                                                      layered=True)]
        else:
            stages = [TorchStage(mods[0]), TorchStage(torch.nn.Sequential(mods[1]), True,
                                                      layered=way == "layered"),
                      TorchStage(mods[2])]
        y, ctxs = x, []
        for st in stages:
            y, ctx = st.forward(y)
            ctxs.append(ctx)
        g = (torch.ones_like(y[0]), None)
        for st, ctx in zip(stages[::-1], ctxs[::-1]):
            if "split" in way:
                g, wctx = st.backward_input(ctx, g)
                st.backward_weight(wctx)
            else:
                g = st.backward(ctx, g)
        torch.testing.assert_close([p.grad for m in mods for p in m.parameters()], want,
                                   rtol=0, atol=1e-12, msg=way)
    # an nn.ReLU(inplace=True) layer: its input, made a leaf for its recompute, raised
    # "a leaf Variable that requires grad is being used in an in-place operation"
    grads = {}
    for layered in (False, True):
        torch.manual_seed(0)
        st = TorchStage(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(inplace=True),
                                            torch.nn.Linear(4, 2)).double(), True,
                        layered=layered)
        for _ in range(2):
            y, ctx = st.forward(x)
            st.backward(ctx, torch.ones_like(y))
        grads[layered] = [g.copy() for g in st.grads()]
    torch.testing.assert_close(grads[True], grads[False], rtol=0, atol=1e-12)


def _batchnorm_model():
    torch.manual_seed(4)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Tanh(),
                               torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8), torch.nn.Tanh(),
                               torch.nn.Linear(8, 2)).double()


def test_a_recomputing_stage_counts_each_micro_batch_once_in_batchnorms_statistics():
    """A forward run again in the backward (whole, split, selective or layer
    by layer) left BatchNorm's running mean, variance and batch count
    updated twice (a model whose eval() then differed from one process's);
    they are now a plain stage's, and so are the gradients."""
    xs = [torch.randn(5, 4, dtype=torch.float64) for _ in range(2)]
    got = {}
    for recompute in (False, True, "*", ("1", "4"), "layered"):
        stage = (TorchStage(_batchnorm_model(), True, layered=True) if recompute == "layered"
                 else TorchStage(_batchnorm_model(), recompute=recompute))
        y, ctx = stage.forward(xs[0])
        y2, ctx2 = stage.forward(xs[1])
        gx = stage.backward(ctx, torch.ones_like(y))
        gx2, wctx = stage.backward_input(ctx2, 2 * torch.ones_like(y2))
        stage.backward_weight(wctx)
        got[recompute] = [y, y2, gx, gx2, *map(torch.from_numpy, stage.grads()),
                          *stage.module.state_dict().values()]
    for k in (True, "*", ("1", "4"), "layered"):
        for a, b in zip(got[False], got[k], strict=True):
            assert torch.equal(a, b), k
    assert stage.module[4].num_batches_tracked == 2      # two forwards, each counted once


def test_the_readme_says_a_recompute_counts_batchnorm_once():
    """The known limits still said a recomputing stage's second forward
    updated BatchNorm's statistics again (as torch.utils.checkpoint's),
    after the test above made it count each micro-batch once."""
    import os
    readme = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "README.md")
    with open(readme, encoding="utf-8") as f:
        limits = " ".join(f.read().split("## Known limits", 1)[1].split())
    assert "again by a recomputing stage's second forward" not in limits
    assert "a recomputing stage's second forward leaves them as its first did" in limits


def _recompute_pipeline(world):
    import mesh
    from engine.executor import stages_for_rank
    grid = mesh.grid(world, pp=2)
    sched = schedules.by_name("1f1b", 2, 4)
    out = {}
    # runs: of 2 layers; per stage: stage 0's 3 layers in runs of 2, stage 1's 4 of 3
    runs = {"layered": True, "runs": 2, "per stage": [2, 3], "one short": [2]}
    for recompute in (False, True, frozenset({0}), ("1", "2"), "3", "9", *runs):
        layers = list(_dropout_model())
        stages = [torch.nn.Sequential(*layers[:3]), torch.nn.Sequential(*layers[3:])]
        try:
            pipe = Pipeline(grid, stages_for_rank(stages, sched, grid.group("pp").rank), sched,
                            loss_fn=torch_loss(torch.nn.functional.mse_loss), timeout=30,
                            recompute=True if recompute in runs else recompute,
                            layered=runs.get(recompute, False))
        except ValueError as e:        # "9": no stage holds it; "one short"
            out[recompute] = str(e)
            continue
        torch.manual_seed(5 + pipe.rank)
        rng = np.random.default_rng(3)
        x, y = rng.standard_normal((8, 4)), rng.standard_normal((8, 2))
        losses = [pipe.step(x, y) for _ in range(2)]
        out[recompute] = (losses, [g.copy() for st in pipe.stages.values() for g in st.grads()],
                          [st.recompute for st in pipe.stages.values()], pipe.checkpointed,
                          [st.layered for st in pipe.stages.values()])
    return out


@pytest.mark.timeout(200)
def test_a_recomputing_pipeline_steps_as_a_plain_one():
    import mesh
    for pp_rank, rank in enumerate(mesh.spawn(_recompute_pipeline, 2, timeout=180)):
        # recompute={0}: only the first stage does
        assert [rank[k][2] for k in (False, True, frozenset({0}))] == [
            [False], [True], [pp_rank == 0]]
        # selective: the submodules named, in the stages that hold them
        assert rank[("1", "2")][3] == {pp_rank: ["1", "2"]}
        assert rank["3"][3] == {pp_rank: ["3"] if pp_rank == 1 else []}
        assert "recompute=['9']: ['9'] match no submodule of any stage" in rank["9"]
        assert rank["layered"][2] == [True] and rank["layered"][4] == [True]
        assert rank["runs"][2] == [True] and rank["runs"][4] == [2]     # (runs of 2 layers)
        assert rank["per stage"][2] == [True] and rank["per stage"][4] == [[2], [3]][pp_rank]
        assert (f"pp rank {pp_rank}: layered=[2]: True (layer by layer), an int N >= 1 (runs "
                f"of N layers), False, or a list of those, one per stage of '1f1b(2,4)' (2; "
                f"None: whole)") in rank["one short"]
        for k in (True, frozenset({0}), ("1", "2"), "3", "layered", "runs", "per stage"):
            assert rank[False][0] == rank[k][0]
            for a, b in zip(rank[False][1], rank[k][1], strict=True):
                np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("recompute, error, words", [
    ({0, 2}, ValueError, "[2] are not stage indices of a 2-stage schedule (0..1)"),
    ("auto", TypeError,
     "True, False, a collection of stage indices or submodule name patterns, not str"),
    (1, TypeError, "not int"),
])
def test_recompute_names_stages_that_are_not_there(recompute, error, words):
    from engine.executor import _recomputing
    with pytest.raises(error) as e:
        _recomputing(recompute, 2)
    assert words in str(e.value)


def test_a_numpy_stage_asked_to_recompute_is_wrapped_or_named():
    """engine.layers' own stages recompute (engine.layers.Recompute); a
    stage of another class is named, with the way to vouch for it."""
    from engine.executor import _as_stage
    from engine.layers import Linear, Recompute, Sequential, Tanh
    wrapped = _as_stage(Sequential(Linear(2, 2), Tanh()), True, 0, {0})
    assert isinstance(wrapped, Recompute) and len(wrapped.layers) == 2
    assert isinstance(_as_stage(Linear(2, 2), False, 1, {0}), Linear)
    assert _as_stage(wrapped, True, 0) is wrapped

    class Mine(Linear):
        pass

    with pytest.raises(TypeError, match=r"recompute=\[0\]: stage 0, a Sequential, is not made "
                                        r"of engine.layers' own layers.*engine.layers.Recompute"):
        _as_stage(Sequential(Linear(2, 2), Mine(2, 2)), True, 0, {0})
    with pytest.raises(TypeError, match=r"recompute=True: stage 1, a Mine"):
        _as_stage(Mine(2, 2), True, 1)
    mine = Recompute(Mine(2, 2))
    assert _as_stage(mine, True, 1) is mine and Recompute(mine).inner is mine.inner


def test_a_recomputing_numpy_stage_gives_the_gradients_of_keeping():
    import numpy as np
    from engine.layers import Linear, Recompute, Sequential, Tanh
    rng = np.random.default_rng(3)
    x, gy = rng.standard_normal((5, 4)), rng.standard_normal((5, 3))
    got = []
    for again in (False, True):
        stage = Sequential(Linear(4, 6, np.random.default_rng(1)), Tanh(),
                           Linear(6, 3, np.random.default_rng(2)))
        stage = Recompute(stage) if again else stage
        y, ctx = stage.forward(x)
        if again:       # only the input is kept
            assert type(ctx).__name__ == "_Input" and ctx.x is x
        gx = stage.backward(ctx, gy)
        y2, ctx2 = stage.forward(x)
        gx2, wctx = stage.backward_input(ctx2, gy)
        stage.backward_weight(wctx)
        got.append([y, gx, y2, gx2, *stage.grads()])
    for a, b in zip(*got):
        np.testing.assert_array_equal(a, b)


def _mixed_recompute(world):
    import mesh
    from engine.layers import Linear, Sequential
    grid = mesh.grid(world, pp=2)
    stage = Sequential(Linear(4, 4)) if world.rank == 0 else torch.nn.Sequential(
        torch.nn.Linear(4, 4))
    try:
        Pipeline(grid, stage, schedules.by_name("1f1b", 2, 2),
                 loss_fn=torch_loss(torch.nn.functional.mse_loss), timeout=30, recompute="0")
    except TypeError as e:
        return str(e)
    return None


@pytest.mark.timeout(120)
def test_names_to_recompute_on_a_numpy_stage_are_refused_on_every_rank():
    import mesh
    for said in mesh.spawn(_mixed_recompute, 2, timeout=90):
        assert said == ("recompute=['0'] (submodules by name): pp rank 0: stage 0, a "
                        "Sequential, is not a torch module"), said


def _layered_job(world, tp):
    """pp=2 (x tp=2: the blocks' MLPs sharded), two transformer blocks a
    stage: under a limit that only recomputing fits, each block recomputed
    on its own holds the least."""
    import engine
    import mesh
    torch.set_num_threads(1)

    def blocks():
        torch.manual_seed(0)
        return torch.nn.Sequential(*[torch.nn.TransformerEncoderLayer(
            16, 2, 32, dropout=0.0, batch_first=True) for _ in range(4)])

    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 6, 16, generator=g), torch.randn(8, 6, 16, generator=g)
    plan = {"*.linear1": "colwise", "*.linear2": "rowwise"} if tp > 1 else None
    args = dict(grid=mesh.grid(world, pp=2, tp=tp), plan=plan, schedule="1f1b", microbatches=2,
                balance="uniform", sample=x, loss_fn=torch.nn.functional.mse_loss,
                timeout=60, reps=1, verbose=False)
    # under a limit every candidate meets, the fastest keeps its activations: that
    # job is the one to train beside (one distribute less than a job of its own)
    kept = engine.distribute(blocks(), **args, recompute="auto", memory_limit=1e12,
                             tag_base=1 << 20)
    peaks = {(c.recompute, c.layered): c.peak_bytes for c in kept.candidates}
    job = engine.distribute(blocks(), **args, recompute="auto",
                            memory_limit=peaks[(True, True)])
    out = {"peaks": peaks, "layered": job.chosen.layered, "again": job.chosen.recompute,
           "kept_as": (kept.chosen.recompute, kept.chosen.layered,
                       [(st.recompute, st.layered) for st in kept.stages]),
           "stages": [(type(st).__name__, getattr(st, "layered", None)) for st in job.stages]}
    jobs = [("job", job), ("kept", kept)]
    if tp == 1:     # asked per stage (layered=[2, True]): stage 0's 2 blocks one run,
        # stage 1's one by one
        runs = engine.distribute(blocks(), **args, recompute=True, layered=[2, True],
                                 tag_base=2 << 20)
        out["runs_as"] = (runs.chosen.layered, [(st.recompute, st.layered, len(st._runs))
                                             for st in runs.stages])
        jobs.append(("runs", runs))
    imported = {}
    for name, j in jobs:
        opt = torch.optim.SGD(j.parameters(), lr=0.1)
        losses = []
        for i in range(2):
            opt.zero_grad()
            had = set(sys.modules)
            losses.append(j.step(x, y))
            if i == 0:
                imported[name] = sorted(set(sys.modules) - had)
            opt.step()
        out[name] = (losses, [p.detach().clone() for p in j.parameters()])
    out["imported"] = imported
    return out


@pytest.mark.timeout(300)
@pytest.mark.parametrize("tp", [1, 2], ids=["pp2", "pp2xtp2"])
def test_distribute_recomputes_transformer_blocks_layer_by_layer(tp):
    import mesh
    for rank, r in enumerate(mesh.spawn(_layered_job, 2 * tp, tp, timeout=280)):
        pp_rank = rank // tp
        # each stage recomputing its two blocks one by one holds less than
        # recomputing both at once would (that way is not kept beside it)
        assert (True, True) in r["peaks"] and (True, False) not in r["peaks"]
        assert r["peaks"][(True, True)] < r["peaks"][(False, False)]
        assert r["layered"] and r["again"]
        again = r["again"] is True or pp_rank in r["again"]
        assert r["stages"] == [("TorchStage", again)]
        assert r["kept_as"] == (False, False, [(False, False)])    # nothing recomputed
        assert r["job"][0] == r["kept"][0]
        for a, b in zip(r["job"][1], r["kept"][1], strict=True):
            assert torch.equal(a, b)
        if tp == 1:     # layered=[2, True]: costed, cut and run so, the same two steps
            assert r["runs_as"] == ((2, 1), [[(True, 2, 1)], [(True, 1, 2)]][pp_rank])
            assert r["runs"][0] == r["kept"][0]
            for a, b in zip(r["runs"][1], r["kept"][1], strict=True):
                assert torch.equal(a, b)
        # a job's first step imports nothing: distribute's profile, dry runs and
        # re-time ran its paths (a first step 3-22 s under load was the first torch
        # optimizer's import of torch._dynamo, made before it: BENCHMARKS.md)
        assert r["imported"] == {"job": [], "kept": [], **({"runs": []} if tp == 1 else {})}, (
            f"rank {rank}", r["imported"])


def test_a_module_inside_one_that_recomputes_is_left_alone():
    """"blocks.*" (fnmatch's * crossing dots) matches each block and its
    submodules: only the blocks recompute; a pattern all of whose modules
    sit inside others that recompute still counts as found."""
    from engine import checkpoint_modules
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Tanh()),
                                torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Tanh()))
    assert checkpoint_modules(model, ["*", "*.0"]) == ["0", "1"]
    assert not hasattr(model[0][0], "_meshrun_checkpointed")
    assert checkpoint_modules(model, "0.1") == []      # inside one wrapped already
    x = torch.randn(3, 2, requires_grad=True)
    model(x).sum().backward()
    assert x.grad is not None


class _NoneBeside(torch.nn.Module):
    """A block returning ``(h, None)`` (a Hugging Face layer's output
    without its attention weights), and taking that tuple as its input."""

    def __init__(self, width, last=False):
        super().__init__()
        self.lin, self.last = torch.nn.Linear(width, width).double(), last

    def forward(self, x):
        if isinstance(x, tuple):
            h, none = x
            assert none is None
            x = h
        h = torch.tanh(self.lin(x))
        return h if self.last else (h, None)


@pytest.mark.parametrize("sched", [schedules.interleaved_1f1b(1, 2, 2), schedules.zb_v(1, 2)],
                         ids=lambda s: s.name)
@pytest.mark.parametrize("way", [False, True, "layered"])
def test_a_boundary_may_carry_a_none_beside_its_tensors(sched, way):
    """A part that is None goes on as None, keeping, recomputing (whole,
    layer by layer) or splitting the backward: one process's loss and
    gradients. It failed on an AttributeError in the forward."""
    rng = np.random.default_rng(4)
    x, y = (torch.from_numpy(rng.standard_normal((5, 3))) for _ in range(2))
    torch.manual_seed(2)
    model = torch.nn.Sequential(_NoneBeside(3), _NoneBeside(3, last=True))
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    torch.manual_seed(2)
    stages = [torch.nn.Sequential(_NoneBeside(3)), torch.nn.Sequential(_NoneBeside(3, True))]
    pipe = Pipeline(_Solo(), stages, sched, loss_fn=torch.nn.functional.mse_loss,
                    recompute=bool(way), layered=way == "layered")
    assert pipe.step(x, y) == pytest.approx(loss.item(), rel=1e-12)
    assert pipe.eval_step(x, y) == pytest.approx(loss.item(), rel=1e-12)
    got = [p.grad for s in stages for p in s.parameters()]
    for a, b in zip(got, [p.grad for p in model.parameters()], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


def test_a_torch_loss_takes_a_tuple_of_targets_weighed_by_rows():
    """A torch loss of a tuple of targets (values and a mask per row): each
    part goes to the loss as a tensor (it failed in numpy, making one array
    of the tuple), and micro-batches of 2 and 3 rows weigh by their rows."""
    def masked(out, target):
        y, mask = target
        return ((out - y) ** 2 * mask).mean()

    rng = np.random.default_rng(5)
    x, y = (torch.from_numpy(rng.standard_normal((5, 3))) for _ in range(2))
    mask = torch.from_numpy(rng.random((5, 1)))
    torch.manual_seed(3)
    model = torch.nn.Sequential(_NoneBeside(3, True), _NoneBeside(3, True))
    loss = masked(model(x), (y, mask))
    loss.backward()
    torch.manual_seed(3)
    stages = [_NoneBeside(3, True), _NoneBeside(3, True)]
    pipe = Pipeline(_Solo(), stages, schedules.zb_v(1, 2), loss_fn=masked)
    assert pipe.step(x, (y, mask)) == pytest.approx(loss.item(), rel=1e-12)
    assert pipe.eval_step(x, (y, mask)) == pytest.approx(loss.item(), rel=1e-12)
    got = [p.grad for s in stages for p in s.parameters()]
    for a, b in zip(got, [p.grad for p in model.parameters()], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


class _Logged(torch.nn.Module):
    """A layer that logs its forwards run with a graph and its backwards."""

    def __init__(self, i, log):
        super().__init__()
        self.i, self.log = i, log
        self.w = torch.nn.Parameter(torch.full((4,), 1.0 + i / 8, dtype=torch.float64))

    def forward(self, x):
        out = torch.tanh(x * self.w)
        if torch.is_grad_enabled():
            self.log.append(("f", self.i))
            out.register_hook(lambda g: self.log.append(("b", self.i)))
        return out


def test_a_stage_recomputes_in_runs_of_n_layers():
    """``layered=N``: the layers in runs of N from the first (the last
    shorter, Megatron's --recompute-num-layers, DeepSpeed's
    activation_checkpoint_interval): each run keeps only its input, and its
    backward runs the run's N forwards again, then their backwards, last run
    first; the gradients are those of keeping, and what it holds from forward
    to backward lies between layer by layer's and whole's."""
    x = torch.randn(3, 4, dtype=torch.float64)
    got, held = {}, {}
    for way, layered in (("keep", 0), ("whole", 0), ("1", 1), ("2", 2), ("3", 3)):
        log = []
        st = TorchStage(torch.nn.Sequential(*[_Logged(i, log) for i in range(5)]),
                        way != "keep", layered=layered)
        for step in range(2):       # (the first forward learns with a graph: the second's)
            del log[:]
            y, ctx = st.forward(x)
            if way != "keep":
                assert log == [] or step == 0, (way, log)
                del log[:]
            gx = st.backward(ctx, torch.ones_like(y))
        got[way] = [gx, *map(torch.from_numpy, st.grads())]
        ins = ctx.ins if layered else [getattr(ctx, "x", x)]
        held[way] = sum(t.nbytes for t in ins)
        if layered:     # the backward: each run's forwards again, then their backwards
            runs = [list(range(5))[b:b + layered] for b in range(0, 5, layered)][::-1]
            assert log == [e for r in runs for e in [("f", i) for i in r]
                           + [("b", i) for i in r[::-1]]], (way, log)
            assert st.layered == layered and len(ctx.ins) == len(runs)
    for way in ("whole", "1", "2", "3"):
        for a, b in zip(got["keep"], got[way], strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12, msg=way)
    assert held["whole"] < held["3"] < held["2"] < held["1"]
    with pytest.raises(ValueError, match=r"layered=-1\): True \(layer by layer\), an int N"):
        TorchStage(torch.nn.Sequential(torch.nn.Linear(2, 2)), True, layered=-1)
    with pytest.raises(TypeError, match=r"layered=2\) recomputes an nn.Sequential's layers "
                                        r"in runs of 2: it needs recompute=True"):
        TorchStage(torch.nn.Sequential(torch.nn.Linear(2, 2)), layered=2)
