"""Checks of the vocab-parallel cross entropy's class weights, probabilities
as targets and torch.compile, run inside test_engine_tp's torch spawn (tp=2,
the vocabulary of 8 split 4 and 4): each returns the names of its checks,
each True, and adds what it expected to raise to ``errors``."""
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import engine
import tp_models
from engine import gather_state_dict, parallelize


def matches_unsharded(world, plan, ids, targets, done, cases):
    """Each ``(name, loss_fn)`` of ``cases`` on the output of
    tp_models.model(1) parallelized by ``plan`` gives one process's loss,
    and its backward every gradient (gathered), to float32's tolerance:
    ``done[name]``; the last pair of models (one process's, the tp one) returned."""
    for how, loss_fn in cases:
        ref, tp = tp_models.model(1), parallelize(tp_models.model(1), world, plan)
        losses = [loss_fn(m(ids), targets) for m in (ref, tp)]
        for loss in losses:
            loss.backward()
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
        grads = gather_state_dict(tp, grads=True)
        for k, p in ref.named_parameters():
            torch.testing.assert_close(grads[k], p.grad, rtol=1e-4, atol=1e-6, msg=how + k)
        done[how] = True
    return ref, tp


def weights_and_probabilities(world, errors):
    """engine.vocab_parallel_cross_entropy (torch and numpy) with ``weight=``
    and probabilities as targets against F.cross_entropy of the whole
    logits, every reduction, label smoothing and ignore_index, to float64's
    rounding; then a head planned colwise under the user's own calls of
    them, its per-token form (a pipeline's nn.CrossEntropyLoss(weight=))
    included, to float32's."""
    done = {}
    g = torch.Generator().manual_seed(12)
    x = torch.randn(6, 3, 8, generator=g, dtype=torch.float64)        # (rows, positions, V)
    t = torch.randint(0, 8, (6, 3), generator=g)
    t[1, 2] = t[4, 0] = -100
    t[0, 0] = 6
    p = torch.softmax(3 * torch.randn(6, 3, 8, generator=g, dtype=torch.float64), -1)
    w = torch.rand(8, generator=g, dtype=torch.float64) + 0.25
    part = slice(4 * world.rank, 4 * world.rank + 4)
    for kind, target, weight in [("weight", t, w), ("probabilities", p, None),
                                 ("weighted probabilities", p, w)]:
        for reduction in ("mean", "sum", "none"):
            for eps in (0.0, 0.2):
                whole = x.clone().requires_grad_(True)
                shard = x[..., part].clone().requires_grad_(True)
                kw = dict(weight=weight, reduction=reduction, label_smoothing=eps)
                want = F.cross_entropy(whole.flatten(0, 1), target.flatten(0, 1), **kw)
                got = engine.vocab_parallel_cross_entropy(
                    shard.flatten(0, 1), target.flatten(0, 1), world, **kw)
                (want * 1.5).sum().backward()
                (got * 1.5).sum().backward()
                torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
                torch.testing.assert_close(shard.grad, whole.grad[..., part], rtol=1e-12,
                                           atol=1e-12)
                if reduction != "none":
                    loss, grad = engine.vocab_parallel_cross_entropy(
                        x[..., part].numpy(), target.numpy(), world, reduction=reduction,
                        label_smoothing=eps, weight=None if weight is None else weight.numpy())
                    np.testing.assert_allclose(loss, want.item(), rtol=1e-12)
                    np.testing.assert_allclose(grad * 1.5, whole.grad[..., part].numpy(),
                                               rtol=1e-12, atol=1e-14)
        done[f"function {kind}"] = True
    for key, target, weight in [("loss probabilities split", p[..., part], None),
                                ("loss weight split", t, w[part])]:
        try:
            engine.vocab_parallel_cross_entropy(x[..., part], target, world, weight=weight)
        except ValueError as e:
            errors[key] = f"{type(e).__name__}: {e}"
    done.update(_head(world))
    return done


def _head(world):
    """A head planned colwise (its logits left sharded) under the user's
    F.cross_entropy with weight= and with probabilities (logits (N, V, T)
    too), and the per-token form a pipeline makes of a weighted
    nn.CrossEntropyLoss: one process's loss and gradients."""
    from engine.torch_stage import _detached, torch_loss
    done = {}
    plan = {**tp_models.PLAIN, "*.head": "colwise"}
    ids, targets = (torch.from_numpy(a) for a in tp_models.tokens(4, 4))
    targets[0, 0] = -100
    g = torch.Generator().manual_seed(13)
    w = torch.rand(tp_models.VOCAB, generator=g) + 0.25
    probs = torch.softmax(torch.randn(4, tp_models.SEQ, tp_models.VOCAB, generator=g), -1)
    ref, tp = matches_unsharded(world, plan, ids, targets, done, [
            ("head weight", lambda o, y: F.cross_entropy(
                o.flatten(0, 1), y.flatten(), weight=w, label_smoothing=0.1)),
            ("head probabilities", lambda o, y: torch.nn.CrossEntropyLoss(
                weight=w, reduction="sum", label_smoothing=0.1)(
                    o.transpose(1, 2), probs.transpose(1, 2)))])
    part = slice(4 * world.rank, 4 * world.rank + 4)
    criterion = torch.nn.CrossEntropyLoss(weight=w, label_smoothing=0.1)
    logits = ref(ids).detach().flatten(0, 1)
    for target, count_want in [(targets.flatten(), w[targets.flatten()[1:]].sum()),
                               (probs.flatten(0, 1), float(len(logits)))]:
        whole = logits.clone().requires_grad_(True)
        want = F.cross_entropy(whole, target, weight=w, reduction="sum", label_smoothing=0.1)
        want.backward()
        y = _detached(tp(ids).flatten(0, 1))        # (a stage's output, as a pipeline's)
        loss_sum, grad, count = torch_loss(criterion)(y, target)
        np.testing.assert_allclose(loss_sum, want.item(), rtol=1e-5)
        np.testing.assert_allclose(float(count), float(count_want), rtol=1e-6)
        torch.testing.assert_close(grad, whole.grad[:, part], rtol=1e-4, atol=1e-6)
    done["per-token weight"] = True
    return done


def compiled(world):
    """torch.compile of a model whose head is planned colwise: its logits
    came back plain, and F.cross_entropy of them took this rank's 4 columns
    for the vocabulary (targets below 4: no IndexError, a wrong loss); now
    watched, vocab-parallel. fullgraph=True compiles it whole (it raised)."""
    torch.manual_seed(0)
    x, t = torch.randn(6, 4), torch.tensor([0, 3, 1, 2, 3, 0])

    def make():
        torch.manual_seed(1)
        return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 8))
    ref = make()
    want = F.cross_entropy(ref(x), t)
    want.backward()
    for fullgraph in (False, True):
        tp = parallelize(make(), world, {"2": "colwise"})
        got = F.cross_entropy(torch.compile(tp, backend="eager", fullgraph=fullgraph)(x), t)
        got.backward()
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        grads = gather_state_dict(tp, grads=True)
        for k, p in ref.named_parameters():
            torch.testing.assert_close(grads[k], p.grad, rtol=1e-5, atol=1e-6, msg=k)
        torch._dynamo.reset()
    return {"compiled": True, "compiled fullgraph": True, "compiled dropout":
            _compiled_dropout(world, x), **_compiled_rowwise(world)}


def _compiled_dropout(world, x):
    """A dropout of a colwise output, traced, runs eagerly on the rank's own
    stream: the compiled model's masks are the eager one's."""
    def make():
        torch.manual_seed(1)
        return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.5),
                                   torch.nn.Linear(8, 4))
    ys = []
    for compile in (False, True):
        tp = parallelize(make(), world, {"0": "colwise", "2": "rowwise"})
        torch.manual_seed(7)
        ys.append((torch.compile(tp, backend="eager") if compile else tp)(x))
    torch._dynamo.reset()
    return torch.equal(ys[0], ys[1])


def _compiled_rowwise(world):
    """A transformer's rowwise layers (an all-reduce forward) and vocab
    embedding compiled: dynamo followed the edge's collective into the
    transport and failed ("Guard failed on the same frame it was
    created", where the collective set up its group's board); the edges
    ran eagerly, a graph break each and one for each function of a colwise
    output. Now one graph (fullgraph=True: the edges torch's functional
    collectives, the watch traced), the loss and gradients one process's,
    with AOT autograd too; a loss compiled with the model runs eagerly (a
    graph break), and a token id outside the vocabulary raises in the graph.
    Under a sequence plan its all-gathers and reduce-scatters are in the
    graph too, and its norms on the rank's own stream (a graph break each:
    the generators' states), torch's LayerNorm drawing nothing, its stream
    the default one's one draw, traced: one graph, the default stream
    after it where eager mode leaves it."""
    from torch._dynamo.utils import counters
    ids, t = (torch.from_numpy(a) for a in tp_models.tokens(5, 3))
    ref = tp_models.model(blocks=1)
    want = F.cross_entropy(ref(ids).flatten(0, 1), t.flatten())
    want.backward()
    group = world.dup()         # (its first all-reduce, under the trace, set up its board)
    plan = {**tp_models.PLAIN, "*.head": "colwise"}
    done = {}
    for how in ("eager", "aot_eager", "with its loss", "sequence"):
        tp = parallelize(tp_models.model(blocks=1), group, plan if how != "sequence" else
                         tp_models.SEQUENCE)       # (its all-gathers and reduce-scatters)
        counters.clear()
        if how == "sequence":   # (its norms on the rank's own stream: a graph break each)
            torch.manual_seed(5)
            with torch.no_grad():
                tp(ids)
            drawn = torch.rand(1)           # (the default stream after eager mode's forward)
            torch.manual_seed(5)
            got = F.cross_entropy(torch.compile(tp, backend="eager", fullgraph=True)(
                ids).flatten(0, 1), t.flatten())
            done["compiled sequence stream"] = torch.equal(torch.rand(1), drawn)
        elif how == "with its loss":
            step = torch.compile(lambda i, y: F.cross_entropy(tp(i).flatten(0, 1), y.flatten()),
                                 backend="eager")
            got = step(ids, t)
        else:
            got = F.cross_entropy(torch.compile(tp, backend=how, fullgraph=True)(ids).flatten(
                0, 1), t.flatten())
        got.backward()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        grads = gather_state_dict(tp, grads=True)
        for k, p in ref.named_parameters():
            torch.testing.assert_close(grads[k], p.grad, rtol=1e-4, atol=1e-5, msg=how + k)
        breaks = sum(counters["graph_break"].values())
        done[f"compiled rowwise {how}"] = (counters["stats"]["unique_graphs"], breaks > 0)
        if how == "eager":
            with torch.no_grad():       # (no gradient: the edges without their backward)
                again = F.cross_entropy(torch.compile(tp, backend=how, fullgraph=True)(
                    ids).flatten(0, 1), t.flatten())
            torch.testing.assert_close(again, want.detach(), rtol=1e-5, atol=1e-6)
            import collectives.torchdist  # noqa: F401
            dist.init_process_group("meshrun")     # (its destroy dropped every name torch
            dist.destroy_process_group()           # had registered, the tp group's: the
            with torch.no_grad():                  # compiled graph's next call failed)
                again = torch.compile(tp, backend=how, fullgraph=True)(ids)
            torch.testing.assert_close(F.cross_entropy(again.flatten(0, 1), t.flatten()),
                                       want.detach(), rtol=1e-5, atol=1e-6)
            try:
                torch.compile(tp, backend=how, fullgraph=True)(torch.full_like(ids, 8))
                done["compiled id"] = "no error"
            except RuntimeError as e:      # (the same on every rank but its number)
                done["compiled id"] = str(e).replace(f"tp rank {world.rank}:", "tp rank r:")
        torch._dynamo.reset()
    return done
