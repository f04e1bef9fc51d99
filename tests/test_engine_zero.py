"""engine.ZeroRedundancyOptimizer (ZeRO stage 1 over a job's dp axis,
stage 2: the gradients too, stage 3: the parameters too) trains as the
same job with the whole optimizer on every replica, keeps a share of its
state (and under stage 2 of the gradients, under stage 3 of the
parameters) per replica, and checkpoints the same whole state.

One spawn per layout runs five jobs of the same model on the grid, one
with AdamW, the others with AdamW under ZeRO stages 1, 2 and 3 (and 3
with DeepSpeed's stage3_param_persistence_threshold: the biases whole),
clipping every step; the parent compares their weights, their gathered
optimizer states and the state (gradients, parameters) each rank held.
The other tests run stage 3 beside stage 2 in their spawns.
"""
import math

import numpy as np
import pytest

import collectives
import engine
import mesh
from engine.zero import shares
from engine.zero_args import _elements

WIDTHS = [6, 16, 12, 16, 8, 4]       # 5 Linear layers, 9 layers with the Tanh between
TP_PLAN = {"0": "colwise", "2": "rowwise", "4": "colwise", "6": "rowwise"}
ROWS, STEPS, LR, SEED = 24, 2, 0.05, 7
PATIENT = {"MESH_PEER_TIMEOUT": "60"}


def test_shares_deal_the_largest_first_to_the_emptiest():
    assert shares([10, 1, 8, 3], 2) == [0, 0, 1, 1]
    assert shares([4, 4, 4], 2) == [0, 1, 0]
    assert shares([5], 3) == [0]
    assert shares([], 2) == []
    sizes = [64 * 32, 32, 32 * 32, 32, 32 * 8, 8]
    held = [sum(s for s, r in zip(sizes, shares(sizes, 4)) if r == k) for k in range(4)]
    assert sorted(held) == [32 + 32 + 8, 256, 1024, 2048]


def test_stage3_element_counts_are_ints_or_deepspeeds_floats():
    """stage3_prefetch_bucket_size and the like, as DeepSpeed's JSON gives
    them (5e7): an int >= 0 or a float that is one; else refused, naming
    the knob and what it counts."""
    assert _elements("w", "stage3_prefetch_bucket_size", 5e7) == 50_000_000
    assert _elements("w", "stage3_max_live_parameters", 0) == 0
    for v, error in ((-1, ValueError), (1.5, ValueError), (float("inf"), ValueError),
                     ("1e5", TypeError), (True, TypeError), (None, TypeError)):
        with pytest.raises(error, match=f"w: stage3_param_persistence_threshold={v!r}: a "
                                        f"parameter of at most this many elements kept whole "
                                        f"on every replica .*; an int >= 0"):
            _elements("w", "stage3_param_persistence_threshold", v)


def _model():
    import torch
    torch.manual_seed(SEED)
    mods = []
    for i, (a, b) in enumerate(zip(WIDTHS, WIDTHS[1:])):
        mods += [torch.nn.Linear(a, b)] + ([] if i == len(WIDTHS) - 2 else [torch.nn.Tanh()])
    return torch.nn.Sequential(*mods)


def _data(step):
    import torch
    rng = np.random.default_rng(100 + step)
    return (torch.from_numpy(rng.standard_normal((ROWS, WIDTHS[0])).astype(np.float32)),
            torch.from_numpy(rng.standard_normal((ROWS, WIDTHS[-1])).astype(np.float32)))


def _groups(named):
    """Weights decayed, biases not: two groups, as one process's AdamW would take them."""
    return [{"params": [p for n, p in named if "bias" not in n]},
            {"params": [p for n, p in named if "bias" in n], "weight_decay": 0.0}]


def _numpy(state):
    return None if state is None else {k: v.detach().numpy().copy() for k, v in state.items()}


def _optim_numpy(optim):
    if optim is None:
        return None
    return {"state": {n: {k: np.asarray(v) for k, v in own.items()}
                      for n, own in optim["state"].items()},
            "param_groups": optim["param_groups"]}


def _held(opt):
    import torch
    return sum(v.numel() * v.element_size() for own in opt.state.values()
               for v in own.values() if torch.is_tensor(v))


def _worker(world, axes, plan):
    import torch
    torch.set_num_threads(1)
    grid = mesh.grid(world, **axes)
    d, dp = grid.coord("dp"), grid.size("dp")
    pp = axes.get("pp", 1)

    def part(a):
        return a[d * len(a) // dp:(d + 1) * len(a) // dp]

    def build(tag_base):
        return engine.distribute(_model(), grid, plan=plan, schedule="1f1b", microbatches=2,
                                 balance=[5, 4] if pp == 2 else "uniform",
                                 sample=part(_data(0)[0]), loss_fn=torch.nn.functional.mse_loss,
                                 overhead=0.0, verbose=False, timeout=60, tag_base=tag_base)
    whole, zjob, z2job, z3job, z3pjob = (build(k << 20) for k in range(5))
    # every bias (16 elements at most) whole on every replica (DeepSpeed's persistence)
    knobs = {"stage3_param_persistence_threshold": 16}
    opt = torch.optim.AdamW(_groups(whole.named_parameters()), lr=LR)
    zopt = engine.ZeroRedundancyOptimizer(_groups(zjob.named_parameters()), torch.optim.AdamW,
                                          zjob, lr=LR)
    z2opt = engine.ZeroRedundancyOptimizer(_groups(z2job.named_parameters()),
                                           torch.optim.AdamW, z2job, stage=2, lr=LR)
    z3opt = engine.ZeroRedundancyOptimizer(_groups(z3job.named_parameters()),
                                           torch.optim.AdamW, z3job, stage=3, lr=LR)
    z3popt = engine.ZeroRedundancyOptimizer(_groups(z3pjob.named_parameters()),
                                            torch.optim.AdamW, z3pjob, stage=3, lr=LR, **knobs)
    _refused_stages(world, grid, z2job, d)
    if pp > 1:      # over the whole world: each pp rank's stages differ, every rank says so
        with pytest.raises(ValueError, match=r"the parameters given differ between ranks 0 "
                                             r"and 1 .*process_group=job"):
            engine.ZeroRedundancyOptimizer(zjob.parameters(), torch.optim.AdamW, world)
    elif world.size == 2:   # one replica's own error: the other raises naming it, no wait
        with pytest.raises(ValueError, match="empty parameter list" if d else
                           r"not made, rank 1 could not: ValueError: .*empty parameter list"):
            engine.ZeroRedundancyOptimizer([] if d else zjob.parameters(), torch.optim.AdamW,
                                           zjob)
        # over a group of one (pp here): its share is the whole, state_dict() gives it
        w = torch.nn.Parameter(torch.ones(3))
        lone = engine.ZeroRedundancyOptimizer([w], torch.optim.AdamW, grid.group("pp"))
        w.grad = torch.ones(3)
        lone.step()
        assert sorted(lone.state_dict()["state"][0]) == ["exp_avg", "exp_avg_sq", "step"]
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    zsched = torch.optim.lr_scheduler.StepLR(zopt, 1, gamma=0.5)
    z2sched = torch.optim.lr_scheduler.StepLR(z2opt, 1, gamma=0.5)
    z3sched = torch.optim.lr_scheduler.StepLR(z3opt, 1, gamma=0.5)
    z3psched = torch.optim.lr_scheduler.StepLR(z3popt, 1, gamma=0.5)
    norms = []
    ways = ((whole, opt, sched), (zjob, zopt, zsched), (z2job, z2opt, z2sched),
            (z3job, z3opt, z3sched), (z3pjob, z3popt, z3psched))
    # stage 3: at rest each replica holds its share's values only (the others empty)
    at_rest = [_param_bytes(z3job)]
    for step in range(STEPS):
        x, y = (part(a) for a in _data(step))
        for job, o, s in ways:
            o.zero_grad()
            job.step(x, y)
            norms.append(job.clip_grad_norm_(0.2))
            o.step()
            s.step()
        at_rest.append(_param_bytes(z3job))
    # stage 2: after the step each replica holds its share's gradients only
    grads = [sum(p.grad.numel() * p.grad.element_size() for p in o.params
                 if p.grad is not None) for o in (zopt, z2opt)]
    out = {"rank": world.rank, "norms": norms, "held": _held(opt),
           "zero_held": zopt.state_bytes(), "shared": len(zopt.optim.state),
           "params": len(zopt.params), "zero2_held": z2opt.state_bytes(),
           "grads": grads[0], "zero2_grads": grads[1], "zero2_grad_bytes": z2opt.grad_bytes(),
           "zero2_kept": all((p.grad is not None) == z2opt.holds(p) for p in z2opt.params),
           "weights": _numpy(whole.state_dict()), "zero_weights": _numpy(zjob.state_dict()),
           "zero2_weights": _numpy(z2job.state_dict()),
           "zero3_weights": _numpy(z3job.state_dict()), "whole_bytes": _param_bytes(whole),
           "zero3_at_rest": at_rest + [_param_bytes(z3job)],
           "zero3_kept": all((p.numel() > 0) == z3opt.holds(p) and
                             (p.grad is not None) == z3opt.holds(p) for p in z3opt.params),
           "zero3_held": z3opt.state_bytes(), "zero3_param_bytes": z3opt.param_bytes(),
           "zero3_peak": z3opt.peak_gathered_bytes(),
           # the biases persistent: whole on every replica, their gradient and state on their
           # owner alone, and not gathered (fewer values received a step)
           "zero3p_kept": all((p.numel() > 0) == (z3popt.holds(p) or z3popt.persists(p)) and
                              (p.grad is not None) == z3popt.holds(p) for p in z3popt.params),
           "zero3p_persist": [z3popt.persists(p) for p in z3popt.params],
           "zero3p_held": z3popt.state_bytes(),
           "zero3p_gathers": [z3popt.gathers_received(), z3opt.gathers_received()],
           "zero3p_weights": _numpy(z3pjob.state_dict()),
           "zero3p_optim": _optim_numpy(z3pjob.optimizer_state_dict(z3popt)),
           "zero3_optim": _optim_numpy(z3job.optimizer_state_dict(z3opt)),
           "optim": _optim_numpy(whole.optimizer_state_dict(opt)),
           "zero_optim": _optim_numpy(zjob.optimizer_state_dict(zopt)),
           "zero2_optim": _optim_numpy(z2job.optimizer_state_dict(z2opt))}
    # a whole state loads into a new ZeRO optimizer (each replica keeps its share) and
    # trains on as the whole optimizer does
    saved = collectives.broadcast_state(world, whole.optimizer_state_dict(opt))
    again = engine.ZeroRedundancyOptimizer(_groups(zjob.named_parameters()),
                                           torch.optim.AdamW, zjob, lr=LR)
    # (each rank cuts its share's state only, not a copy of the whole first)
    cut = zjob._checked_cut(again, saved, "cut")
    out["cut"], out["held_n"] = len(cut["state"]), len(again.optim.param_groups[0]["params"]) \
        + len(again.optim.param_groups[1]["params"])
    zjob.load_optimizer_state_dict(again, saved)
    out["loaded_held"] = again.state_bytes()
    again2 = engine.ZeroRedundancyOptimizer(_groups(z2job.named_parameters()),
                                            torch.optim.AdamW, z2job, stage=2, lr=LR)
    z2job.load_optimizer_state_dict(again2, saved)
    again3 = engine.ZeroRedundancyOptimizer(_groups(z3job.named_parameters()),
                                            torch.optim.AdamW, z3job, stage=3, lr=LR)
    z3job.load_optimizer_state_dict(again3, saved)
    again3p = engine.ZeroRedundancyOptimizer(_groups(z3pjob.named_parameters()),
                                             torch.optim.AdamW, z3pjob, stage=3, lr=LR, **knobs)
    z3pjob.load_optimizer_state_dict(again3p, saved)
    # (and the whole model's state, saved and loaded: each replica keeps its share's)
    z3job.load_state_dict(collectives.broadcast_state(world, z3job.state_dict()))
    z3pjob.load_state_dict(collectives.broadcast_state(world, z3pjob.state_dict()))
    x, y = (part(a) for a in _data(STEPS))
    for job, o in ((whole, opt), (zjob, again), (z2job, again2), (z3job, again3),
                   (z3pjob, again3p)):
        o.zero_grad()
        job.step(x, y)
        o.step()
    out["resumed"] = _numpy(whole.state_dict())
    out["zero_resumed"] = _numpy(zjob.state_dict())
    out["zero2_resumed"] = _numpy(z2job.state_dict())
    out["zero3_resumed"] = _numpy(z3job.state_dict())
    out["zero3p_resumed"] = _numpy(z3pjob.state_dict())
    # gradients accumulated over two steps (no zero_grad between): stage 2's owner adds
    # the second step's average to the first's, as every replica does without ZeRO
    for job, o in ((whole, opt), (z2job, again2), (z3job, again3), (z3pjob, again3p)):
        o.zero_grad()
        for step in (STEPS + 1, STEPS + 2):
            job.step(*(part(a) for a in _data(step)))
        job.clip_grad_norm_(0.2)
        o.step()
    out["accumulated"] = _numpy(whole.state_dict())
    out["zero2_accumulated"] = _numpy(z2job.state_dict())
    out["zero3_accumulated"] = _numpy(z3job.state_dict())
    out["zero3p_accumulated"] = _numpy(z3pjob.state_dict())
    by_hand = z3job.pipeline.first and plan is None     # (a tp module makes collectives)
    with z3job.gathered(), z3pjob.gathered():   # (a user reading the weights: whole, freed)
        out["zero3_gathered"] = _param_bytes(z3job) == _param_bytes(whole) == \
            _param_bytes(z3pjob)
        if by_hand:
            z3job.stages[0].module(x)       # (whole: it runs)
    out["zero3_called"] = None
    if by_hand:     # a stage's module called by hand between steps: refused, naming the fix
        try:
            z3job.stages[0].module(x)
            out["zero3_called"] = "ran"
        except RuntimeError as e:
            out["zero3_called"] = str(e)
    out["zero3_after"] = _param_bytes(z3job) <= _param_bytes(z3pjob) < _param_bytes(whole)
    with pytest.raises(RuntimeError, match="consolidate_state_dict"):
        again.state_dict()
    if world.size == 2:     # torch's own ZeRO (its shares in .optim): refused, not {"state": {}}
        import torch.distributed as dist
        from torch.distributed.optim import ZeroRedundancyOptimizer

        from collectives import torchdist      # (registers "meshrun")
        dist.init_process_group(torchdist.BACKEND)
        try:
            theirs = ZeroRedundancyOptimizer(whole.parameters(), torch.optim.AdamW, lr=LR)
            theirs.zero_grad()
            whole.step(x, y)
            theirs.step()
            with pytest.raises(TypeError, match=r"torch's ZeroRedundancyOptimizer keeps each "
                                                r"rank's share .* engine.ZeroRedundancyOpt"):
                whole.optimizer_state_dict(theirs)
        finally:
            dist.destroy_process_group()
    return out


def _param_bytes(job):
    return sum(p.numel() * p.element_size() for p in job.parameters())


def _refused_stages(world, grid, job, d):
    """A stage other than 1 or 2, stage 2 over a mesh group (the job must
    know the shares), stage 2 of a tensor not the job's, replicas given
    other stages, stage3_per_layer not a bool, stage3_prefetch not an int
    >= 0 (DeepSpeed's element counts alike), and any other on the
    replicas: each refused, every replica raising at once."""
    import torch
    with pytest.raises(ValueError, match=r"stage=4: 1 .*, 2 .* or 3 \(its share's "
                                         r"parameters too\)"):
        engine.ZeroRedundancyOptimizer(job.parameters(), torch.optim.AdamW, job, stage=4)
    for stage in (2, 3):
        with pytest.raises(ValueError, match=f"stage={stage} needs process_group=job .*not "
                                             f"the mesh group .*the job must know the shares"):
            engine.ZeroRedundancyOptimizer(job.parameters(), torch.optim.AdamW,
                                           grid.group("dp"), stage=stage)
    with pytest.raises(ValueError, match=r"stage=2: the optimizer holds a \(3,\) tensor that "
                                         r"is not in job.parameters\(\)"):
        engine.ZeroRedundancyOptimizer([*job.parameters(), torch.nn.Parameter(torch.ones(3))],
                                       torch.optim.AdamW, job, stage=2)
    with pytest.raises(TypeError, match=r"stage3_per_layer='yes': True \(a step gathers "
                                        r"each module's parameters as it runs\) or False"):
        engine.ZeroRedundancyOptimizer(job.parameters(), torch.optim.AdamW, job, stage=3,
                                       stage3_per_layer="yes")
    for ahead, error in ((-1, ValueError), (1.5, TypeError), (True, TypeError)):
        with pytest.raises(error, match=f"stage3_prefetch={ahead}: the modules gathered ahead "
                                        f"of the one running, an int >= 0"):
            engine.ZeroRedundancyOptimizer(job.parameters(), torch.optim.AdamW, job, stage=3,
                                           stage3_prefetch=ahead)
    with pytest.raises(ValueError, match=r"stage3_prefetch_bucket_size=-1: the elements "
                                         r"gathered ahead of the module running .* an int >= 0"):
        engine.ZeroRedundancyOptimizer(job.parameters(), torch.optim.AdamW, job, stage=3,
                                       stage3_prefetch_bucket_size=-1)
    if world.size == 2:
        with pytest.raises(ValueError, match=f"stage={1 + d} here but stage={2 - d} on rank "
                                             f"{1 - d}: every replica passes the same"):
            engine.ZeroRedundancyOptimizer(job.parameters(), torch.optim.AdamW, job,
                                           stage=1 + d)
        # (the replicas' gathers pair up only when all gather alike)
        with pytest.raises(ValueError, match=f"stage3_per_layer={bool(d)} here but "
                                             f"{not d} on rank {1 - d}: every replica"):
            engine.ZeroRedundancyOptimizer(job.parameters(), torch.optim.AdamW, job, stage=3,
                                           stage3_per_layer=bool(d))
        with pytest.raises(ValueError, match=f"stage3_prefetch={d} here but {1 - d} on rank "
                                             f"{1 - d}: every replica"):
            engine.ZeroRedundancyOptimizer(job.parameters(), torch.optim.AdamW, job, stage=3,
                                           stage3_prefetch=d)
        with pytest.raises(ValueError, match=f"stage3_max_live_parameters={d} here but "
                                             f"{1 - d} on rank {1 - d}: every replica"):
            engine.ZeroRedundancyOptimizer(job.parameters(), torch.optim.AdamW, job, stage=3,
                                           stage3_max_live_parameters=d)


def _same(got, want, what):
    """Bit for bit: the same gradients, and each parameter's AdamW update
    computed alike, on its owner (reductions over two ranks add in either
    order alike)."""
    assert list(got) == list(want), what
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=f"{what} {k}")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("axes,plan,n", [
    ({"dp": 2, "pp": 1}, None, 2),
    ({"dp": 2, "pp": 2}, None, 4),
    pytest.param({"dp": 2, "pp": 1, "tp": 2}, TP_PLAN, 4, marks=pytest.mark.slow),
], ids=["dp2", "dp2xpp2", "dp2xtp2"])
def test_zero_trains_and_checkpoints_as_the_whole_optimizer(axes, plan, n):
    pytest.importorskip("torch")
    results = mesh.spawn(_worker, n, axes, plan, timeout=280, env=PATIENT)
    for res in results:     # clipped alike (stage 2's and 3's norm: the same bit for bit)
        assert res["norms"][0::5] == res["norms"][1::5] == res["norms"][2::5] == \
            res["norms"][3::5] == res["norms"][4::5], res["norms"]
        assert res["norms"][0] > 0.2                                       # (it clipped)
        # each replica keeps the state of its share only, and the shares cover it all
        assert 0 < res["zero_held"] < res["held"], res
        assert res["zero2_held"] == res["zero_held"], res
        assert res["loaded_held"] == res["zero_held"]
        assert res["cut"] == res["held_n"] == res["shared"] < res["params"], res
        # stage 2: its share's gradients only (stage 1's: every one, as the weights')
        assert res["zero2_kept"], res
        assert 0 < res["zero2_grads"] == res["zero2_grad_bytes"] < res["grads"], res
        # stage 3: its share's values only at rest (and gradients, and state), whole inside
        # job.gathered()
        assert res["zero3_kept"] and res["zero3_held"] == res["zero_held"], res
        assert res["zero3_gathered"] and res["zero3_after"], res
        if res["zero3_called"] is not None:     # (stage 0's ranks: its module called by hand)
            assert "called outside job.step() and eval_step(): under ZeRO stage 3" in \
                res["zero3_called"] and "job.gathered()" in res["zero3_called"], res
        assert len(set(res["zero3_at_rest"])) == 1, res["zero3_at_rest"]
        assert 0 < res["zero3_at_rest"][0] == res["zero3_param_bytes"] < res["whole_bytes"], res
        # a step gathers module by module, never more than the others' whole parameters (on
        # this small model the modules gathered ahead may make them all: _layered_zero3
        # compares layer by layer with the whole gather)
        others = res["whole_bytes"] - res["zero3_param_bytes"]
        assert 0 < res["zero3_peak"] <= others, (res["zero3_peak"], others)
        # persistent biases: whole everywhere, the state still dealt as stage 1's, and the
        # step gathers only the weights
        assert res["zero3p_kept"] and res["zero3p_held"] == res["zero_held"], res
        assert any(res["zero3p_persist"]) and not all(res["zero3p_persist"]), res
        assert 0 < res["zero3p_gathers"][0] <= res["zero3p_gathers"][1], res["zero3p_gathers"]
    # (a replica owning every bias of its stages received none of them before either)
    assert sum(res["zero3p_gathers"][0] for res in results) < \
        sum(res["zero3p_gathers"][1] for res in results), [r["zero3p_gathers"] for r in results]
    assert sum(res["zero3_called"] is not None for res in results) == (2 if plan is None
                                                                         else 0)
    for res in results:     # a replica's share and its mate's make the whole state
        mate = results[(res["rank"] + n // 2) % n]
        assert res["zero_held"] + mate["zero_held"] == res["held"], (res, mate)
        assert res["zero2_grads"] + mate["zero2_grads"] == res["grads"], (res, mate)
        assert res["zero3_at_rest"][0] + mate["zero3_at_rest"][0] == res["whole_bytes"]
    root = results[0]
    for way in ("zero", "zero2", "zero3", "zero3p"):
        _same(root[f"{way}_weights"], root["weights"], f"{way} weights")
        _same(root[f"{way}_resumed"], root["resumed"], f"{way} resumed")
        got, want = root[f"{way}_optim"], root["optim"]
        assert got["param_groups"] == want["param_groups"]
        assert list(got["state"]) == list(want["state"])
        for name, own in want["state"].items():
            _same(got["state"][name], own, f"{way} state {name}")
    _same(root["zero2_accumulated"], root["accumulated"], "zero2 accumulated")
    _same(root["zero3_accumulated"], root["accumulated"], "zero3 accumulated")
    _same(root["zero3p_accumulated"], root["accumulated"], "zero3 persistent accumulated")


def _consolidate_fails_worker(world):
    """dp=2: rank 1's own error as it gives its share (a KeyboardInterrupt),
    then rank 0's as it reads rank 1's (a MemoryError at its first tensor);
    each followed by a step and a whole checkpoint."""
    import torch
    torch.set_num_threads(1)
    job = engine.distribute(_model(), mesh.grid(world, dp=2, pp=1), schedule="1f1b",
                            microbatches=2, balance="uniform", verbose=False, timeout=20,
                            loss_fn=torch.nn.functional.mse_loss)
    z = engine.ZeroRedundancyOptimizer(_groups(job.named_parameters()), torch.optim.AdamW, job,
                                       lr=LR)
    names = {id(p): n for n, p in job.named_parameters()}
    x, y = _data(0)
    said = []
    for bad in (1, 0):
        z.zero_grad()
        job.step(x, y)
        z.step()
        if world.rank == bad == 1:
            def interrupted():
                del z._index        # (this call only)
                raise KeyboardInterrupt("stopped on purpose")
            z._index = interrupted
        if world.rank == bad == 0:
            g, calls = z.group, [0]

            def recv(*args, **kwargs):
                calls[0] += 1
                if calls[0] == 2:       # rank 1's share's list read, its first tensor not
                    del g.recv
                    raise MemoryError("no memory on purpose")
                return type(g).recv(g, *args, **kwargs)
            g.recv = recv
        _failed_then_whole(job, z, x, y, names, said)
    return said


def _failed_then_whole(job, z, x, y, names, said):
    """What the call meant to fail said (or its type, returned), then a step
    and the whole optimizer state with this rank's own exp_avg, into ``said``."""
    try:
        said.append(f"returned {type(job.optimizer_state_dict(z)).__name__}")
    except BaseException as e:
        said.append(f"{type(e).__name__}: {e}")
    z.zero_grad()
    job.step(x, y)
    z.step()
    whole = job.optimizer_state_dict(z)
    said.append({"whole": None if whole is None else
                 {n: own["exp_avg"].numpy().copy() for n, own in whole["state"].items()},
                 "mine": {names[id(p)]: own["exp_avg"].numpy().copy()
                          for p, own in z.optim.state.items()}})


@pytest.mark.timeout(120)
def test_a_consolidation_failing_on_one_replica_fails_both_at_once_and_leaves_nothing():
    """A replica's own error as it gave its share left rank 0 waiting for it
    until its timeout ("every rank must call it"); rank 0's own as it read
    a share left the rest unread, and its next checkpoint took them: that
    replica's state as it was then, no error. Now both raise at once, and
    the next checkpoint is the optimizer's state as it is."""
    pytest.importorskip("torch")
    results = mesh.spawn(_consolidate_fails_worker, 2, timeout=100, env=PATIENT)
    assert results[1][0] == "KeyboardInterrupt: stopped on purpose", results[1][0]
    assert results[0][0].startswith(
        "GatherFailed: rank 0: ZeroRedundancyOptimizer on group world/[0, 1]: "
        "consolidate_state_dict failed on rank 1: KeyboardInterrupt: stopped on purpose"), \
        results[0][0]
    assert results[0][2] == "MemoryError: no memory on purpose", results[0][2]
    assert results[1][2] == "returned NoneType", results[1][2]      # (its share was sent)
    for at in (1, 3):
        whole = results[0][at]["whole"]
        mine = {**results[0][at]["mine"], **results[1][at]["mine"]}
        assert results[1][at]["whole"] is None and sorted(whole) == sorted(mine)
        for n, v in mine.items():
            np.testing.assert_array_equal(whole[n], v, err_msg=n)


def _consolidate_beside_worker(world, axes, plan):
    """dp=2 beside pp=2 or tp=2: the dp-0 rank of the second stage (tp
    shard) fails as it gives its share (a KeyboardInterrupt), then a step
    and a whole checkpoint."""
    import torch
    torch.set_num_threads(1)
    grid = mesh.grid(world, **axes)
    job = engine.distribute(_model(), grid, plan=plan, schedule="1f1b", microbatches=2,
                            balance=[5, 4] if axes.get("pp", 1) == 2 else "uniform",
                            overhead=0.0, verbose=False, timeout=20,
                            loss_fn=torch.nn.functional.mse_loss)
    z = engine.ZeroRedundancyOptimizer(_groups(job.named_parameters()), torch.optim.AdamW, job,
                                       lr=LR)
    names = {id(p): n for n, p in job.named_parameters()}
    x, y = _data(0)
    other = "pp" if "pp" in axes and axes["pp"] > 1 else "tp"
    bad = grid.coord("dp") == 0 and grid.coord(other) == 1
    said = [world.rank if bad else None]
    z.zero_grad()
    job.step(x, y)
    z.step()
    if bad:
        def interrupted():
            del z._index        # (this call only)
            raise KeyboardInterrupt("stopped on purpose")
        z._index = interrupted
    _failed_then_whole(job, z, x, y, names, said)
    return said


@pytest.mark.timeout(120)
@pytest.mark.parametrize("axes,plan", [({"dp": 2, "pp": 2}, None),
                                       ({"dp": 2, "pp": 1, "tp": 2}, TP_PLAN)],
                         ids=["dp2xpp2", "dp2xtp2"])
def test_a_consolidation_failing_beside_pp_or_tp_fails_every_rank_at_once(axes, plan):
    """With pp or tp beside dp, a dp-0 rank whose consolidation failed
    raised before job.optimizer_state_dict's gather of the stages (and of
    the tp shards): rank 0 (its tp peer) waited for it there until the
    timeout (20 s here), saying every rank must call it. Now every rank
    raises at once naming it, and the next checkpoint holds the state as
    it is."""
    pytest.importorskip("torch")
    results = mesh.spawn(_consolidate_beside_worker, 4, axes, plan, timeout=100, env=PATIENT)
    bad = next(r for r, said in enumerate(results) if said[0] is not None)
    assert results[bad][1] == "KeyboardInterrupt: stopped on purpose", results[bad]
    if plan is None:    # rank 0, waiting for stage 1's state: told
        assert results[0][1].startswith(
            f"GatherFailed: rank 0: job.optimizer_state_dict(opt) failed on rank {bad}: "
            f"KeyboardInterrupt: stopped on purpose"), results[0][1]
    else:       # its tp peer, in its first gather of the shards: aborted, naming it
        assert results[0][1].startswith("MeshError: rank 0: all_gather") and \
            f"(world rank {bad}): job.optimizer_state_dict(opt) failed on tp rank 1: " \
            "KeyboardInterrupt: stopped on purpose" in results[0][1], results[0][1]
    mate = next(r for r in range(1, 4) if r != bad and results[r][1] != "returned NoneType")
    assert results[mate][1].startswith(
        f"GatherFailed: rank {mate}: ZeroRedundancyOptimizer on group ") and \
        f"consolidate_state_dict failed on rank {bad}: KeyboardInterrupt" in results[mate][1], \
        results[mate][1]
    whole = results[0][2]["whole"]
    mine = {k: v for said in results for k, v in said[2]["mine"].items()}
    assert all(said[2]["whole"] is None for said in results[1:])
    assert sorted(whole) == sorted(mine), (sorted(whole), sorted(mine))
    if plan is None:        # (tp: each rank's share is of its shards, gathered whole)
        for n, v in mine.items():
            np.testing.assert_array_equal(whole[n], v, err_msg=n)


def _tied_sequence_worker(world):
    """dp=2 x pp=2 with the embedding and the head tied (summed over pp
    after the dp average), then dp=2 x tp=2 under sequence parallelism (the
    norms' gradients summed over tp after it): AdamW whole and under ZeRO
    stage 2, two steps clipped; the weights, the norms, and which
    gradients each replica kept."""
    import torch

    import tp_models
    torch.set_num_threads(1)
    out = {}
    for name, axes, plan, tied in [("tied", {"dp": 2, "pp": 2}, None, True),
                                   ("sequence", {"dp": 2, "pp": 1, "tp": 2},
                                    tp_models.SEQUENCE, False)]:
        grid = mesh.grid(world, **axes)
        d = grid.coord("dp")

        def model():
            m = tp_models.model(3)
            if tied:            # the head's weight is the embedding's
                m[-1].head.weight = m[0].embed.weight
            return m
        jobs = [engine.distribute(model(), grid, plan=plan, schedule="1f1b", microbatches=2,
                                  balance="uniform", loss_fn=tp_models.cross_entropy,
                                  verbose=False, overhead=0.0, timeout=60, tag_base=t)
                for t in (0, 1 << 20, 2 << 20)]
        params = jobs[1].parameters()
        tie = next((i for i, (n, _) in enumerate(jobs[1].named_parameters())
                    if n.endswith(("embed.weight", "head.weight"))), None)
        if tied:        # its copies dealt to replica 0 on one pp rank, to 1 on the other
            want = grid.coord("pp")
            rest = params[:tie] + params[tie + 1:]
            at = next(k for k in range(len(params))
                      if shares([p.numel() for p in rest[:k] + [params[tie]] + rest[k:]],
                                2)[k] == want)
            params = rest[:at] + [params[tie]] + rest[at:]
        # (stage 3 dealt as stage 2: its job's parameters in the same order)
        same = {id(p): q for p, q in zip(jobs[1].parameters(), jobs[2].parameters())}
        opts = [torch.optim.AdamW(jobs[0].parameters(), lr=LR),
                engine.ZeroRedundancyOptimizer(params, torch.optim.AdamW, jobs[1], stage=2,
                                               lr=LR),
                engine.ZeroRedundancyOptimizer([same[id(p)] for p in params], torch.optim.AdamW,
                                               jobs[2], stage=3, lr=LR)]
        norms = []
        for step in range(2):
            x, y = (a[d::2] for a in tp_models.tokens(300 + step, 8))
            for job, o in zip(jobs, opts):
                o.zero_grad()
                job.step(x, y)
                norms.append(job.clip_grad_norm_(0.5))
                o.step()
        z, z3 = opts[1], opts[2]
        out[name] = {"norms": norms, "weights": [_numpy(job.state_dict()) for job in jobs],
                     "kept": all((p.grad is not None) == z.holds(p) for p in z.params) and
                     all((p.grad is not None) == (p.numel() > 0) == z3.holds(p)
                         for p in z3.params),
                     "freed": sum(not z.holds(p) for p in z.params),
                     "tie": None if not tied else (grid.coord("pp"), z.owner[at])}
    return out


@pytest.mark.timeout(200)
def test_zero2_with_tied_weights_and_sequence_parallel_trains_as_the_whole_optimizer():
    """A tied copy's and a sequence-parallel norm's gradients are summed
    over pp or tp after the dp average, which they need on every replica:
    stage 2 averages them on every replica as before, and frees them on
    the replicas that do not own them after those sums, as the rest; stage
    3 beside it, its parameters gathered for the step and dropped after."""
    pytest.importorskip("torch")
    results = mesh.spawn(_tied_sequence_worker, 4, timeout=180, env=PATIENT)
    for name in ("tied", "sequence"):
        for res in results:
            got = res[name]
            assert got["norms"][0::3] == got["norms"][1::3] == got["norms"][2::3], \
                (name, got["norms"])
            assert got["norms"][0] > 0.5, (name, got["norms"])
            assert got["kept"] and got["freed"] > 0, (name, got)
            if got["tie"] is not None:      # (pp rank 0's copy on replica 0, 1's on 1)
                assert got["tie"][0] == got["tie"][1], got["tie"]
        whole, zero, zero3 = results[0][name]["weights"]
        _same(zero, whole, f"{name} weights")
        _same(zero3, whole, f"{name} stage 3 weights")


def _failed_step_worker(world):
    """dp=2, the whole AdamW and ZeRO stages 2 and 3: a step, then one whose loss
    raises on rank 1 only (rank 0's reduces to the owners are under way or
    done), then a step on and AdamW's."""
    import torch
    torch.set_num_threads(1)
    grid = mesh.grid(world, dp=2, pp=1)
    d = grid.coord("dp")
    jobs = [engine.distribute(_model(), grid, schedule="1f1b", microbatches=2,
                              balance="uniform", loss_fn=torch.nn.functional.mse_loss,
                              overhead=0.0, verbose=False, timeout=30, tag_base=t)
            for t in (0, 1 << 20, 2 << 20)]
    opts = [torch.optim.AdamW(jobs[0].parameters(), lr=LR)] + [
        engine.ZeroRedundancyOptimizer(job.parameters(), torch.optim.AdamW, job, stage=stage,
                                       lr=LR) for job, stage in zip(jobs[1:], (2, 3))]
    z, z3 = opts[1], opts[2]
    out = {}
    for step in range(3):
        x, y = (a[d::2] for a in _data(step))
        for job, o in zip(jobs, opts):
            if step != 1:
                o.zero_grad()
                job.step(x, y)
                o.step()
                continue
            before = [None if p.grad is None else p.grad.clone() for p in o.param_groups[0]
                      ["params"]]
            try:        # (rank 1's targets one column short: its loss raises)
                job.step(x, y[:, :-1] if d else y)
            except Exception as e:
                out.setdefault("raised", []).append(type(e).__name__)
                out.setdefault("said", []).append(str(e))
            after = [p.grad for p in o.param_groups[0]["params"]]
            out.setdefault("rolled_back", []).append(all(
                (a is None) == (b is None) and (a is None or torch.equal(a, b))
                for a, b in zip(after, before)))
    out["kept"] = all((p.grad is not None) == z.holds(p) for p in z.params) and \
        all((p.grad is not None) == (p.numel() > 0) == z3.holds(p) for p in z3.params)
    out["weights"] = [_numpy(job.state_dict()) for job in jobs]
    out.update(_per_token_zero3(grid, d))
    out.update(_layered_zero3(grid, d))
    return out


def _layered_model():
    """Blocks that read their own scale and their child's weight outside
    the child's forward (x @ lin.weight.T), a norm, a weight tied into two
    modules of the stage, two Linear run in the order ``flip`` says."""
    import torch
    torch.manual_seed(SEED)

    class Pair(torch.nn.Module):
        def __init__(self, n):
            super().__init__()
            self.a, self.b, self.flip = torch.nn.Linear(n, n), torch.nn.Linear(n, n), False

        def forward(self, x):
            first, then = (self.b, self.a) if self.flip else (self.a, self.b)
            return then(torch.tanh(first(x)))

    class Block(torch.nn.Module):
        def __init__(self, n):
            super().__init__()
            self.lin = torch.nn.Linear(n, n)
            self.scale = torch.nn.Parameter(torch.full((n,), 0.9))

        def forward(self, x):
            return torch.tanh(self.lin(x)) * self.scale + 0.1 * (x @ self.lin.weight.t())
    mods = [torch.nn.Linear(6, 8), Block(8), Block(8), torch.nn.LayerNorm(8), Block(8),
            torch.nn.Linear(8, 8), Pair(8), torch.nn.Linear(8, 4)]
    mods[5].weight = mods[1].lin.weight
    return torch.nn.Sequential(*mods)


def _layered_zero3(grid, d):
    """dp=2: ZeRO stage 3 gathering each module's parameters as it runs
    (the default: the next two modules' gathers posted ahead, in the
    order the last step ran them), the same with none ahead
    (stage3_prefetch=0) and a stage's whole weights for the step
    (stage3_per_layer=False), and layer by layer with DeepSpeed's bounds
    set small (stage3_max_live_parameters=1: none ahead, the backward
    keeping one module; stage3_prefetch_bucket_size=1: one module ahead)
    beside the whole AdamW, two of the three
    blocks recomputed (torch.utils.checkpoint: a block's own scale read
    again in the backward), with eval_step between the steps; the third
    step runs two modules in the other order (the prefetch's order left,
    the fourth's prefetch following the third's order)."""
    import torch
    ways = [(True, 2, {}), (False, 2, {}), (True, 0, {}),
            (True, 2, {"stage3_max_live_parameters": 1}),
            (True, 2, {"stage3_prefetch_bucket_size": 1})]
    jobs = [engine.distribute(_layered_model(), grid, schedule="1f1b", microbatches=2,
                              balance="uniform", loss_fn=torch.nn.functional.mse_loss,
                              overhead=0.0, verbose=False, timeout=30, tag_base=t << 20,
                              recompute=["1", "4"], sample=_data(0)[0][d::2])
            for t in (5, 6, 7, 9, 10, 11)]
    opts = [torch.optim.AdamW(jobs[0].parameters(), lr=LR)] + [
        engine.ZeroRedundancyOptimizer(job.parameters(), torch.optim.AdamW, job, stage=3,
                                       stage3_per_layer=layered, stage3_prefetch=ahead, lr=LR,
                                       **knobs)
        for job, (layered, ahead, knobs) in zip(jobs[1:], ways)]
    pairs = [m for job in jobs for m in job.stages[0].module.modules() if hasattr(m, "flip")]
    out = {"layered_evals": [], "layered_peaks": [], "ahead": []}
    for step in range(4):
        x, y = (a[d::2] for a in _data(step))
        for m in pairs:
            m.flip = step >= 2
        for job, o in zip(jobs, opts):
            o.zero_grad()
            job.step(x, y[:, :4])
            if o is not opts[0] and o.stage3_per_layer:     # (what the step prefetched)
                ahead = job.pipeline.owned_params.layers.ahead
                out["ahead"].append([opts.index(o), step, ahead.used, ahead.missed,
                                     [o.peak_gathered_bytes(), o.gathers_received()]])
            out["layered_evals"].append(job.eval_step(x, y[:, :4]))
            o.step()
        out["layered_peaks"].append([o.peak_gathered_bytes() for o in opts[1:]])
    out["layered_others"] = sum(4 * math.prod(jobs[2].pipeline.owned_params.shape_of(p))
                                for p in opts[2].params if not opts[2].holds(p))
    kept = jobs[1].pipeline.owned_params     # (the others' bytes of the largest module's)
    out["layered_unit"] = max(sum(4 * math.prod(kept.shape_of(p)) for p in own
                                  if not opts[1].holds(p)) for own in kept.layers.units.values())
    out["layered_weights"] = [_numpy(job.state_dict()) for job in jobs]
    # a module called on replica 1 only: its gather of the part replica 0 owns times out,
    # saying why; replica 0, told, fails the step too
    side = torch.nn.Linear(8, 8)

    class Gate(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.side, self.on = side, d == 1

        def forward(self, x):
            return x + self.side(x) if self.on else x
    odd = engine.distribute(torch.nn.Sequential(torch.nn.Linear(6, 8), Gate(),
                                                torch.nn.Linear(8, 4)),
                            grid, schedule="1f1b", microbatches=2, balance="uniform",
                            loss_fn=torch.nn.functional.mse_loss, overhead=0.0,
                            verbose=False, timeout=1.0, tag_base=8 << 20)
    engine.ZeroRedundancyOptimizer(odd.parameters(), torch.optim.AdamW, odd, stage=3, lr=LR)
    x, y = (a[d::2] for a in _data(0))
    try:
        odd.step(x, y[:, :4])
    except Exception as e:
        out["odd"] = [type(e).__name__, " ".join(getattr(e, "__notes__", []))]
    return out


def _per_token_zero3(grid, d):
    """dp=2, a per-token loss (torch's mean cross entropy, ignored targets:
    the replicas' micro-batches count other tokens), the whole AdamW and
    ZeRO stage 3: steps with eval_step between, job.retime(), then a plain
    AdamW over the stage-3 job's parameters (refused), then a stage-1
    optimizer over them (every replica holds every value again)."""
    import torch
    loss = torch.nn.CrossEntropyLoss(ignore_index=-1)
    jobs = [engine.distribute(_model(), grid, schedule="1f1b", microbatches=2,
                              balance="uniform", loss_fn=loss, overhead=None, verbose=False,
                              timeout=30, tag_base=t, sample=_data(0)[0][d::2])
            for t in (3 << 20, 4 << 20)]
    opts = [torch.optim.AdamW(jobs[0].parameters(), lr=LR),
            engine.ZeroRedundancyOptimizer(jobs[1].parameters(), torch.optim.AdamW, jobs[1],
                                           stage=3, lr=LR)]
    out = {"evals": [], "retimed": []}
    for step in range(2):
        x = _data(step)[0][d::2]
        y = torch.from_numpy(np.random.default_rng(step).integers(-1, WIDTHS[-1], ROWS))[d::2]
        for job, o in zip(jobs, opts):
            o.zero_grad()
            job.step(x, y)
            out["evals"].append(job.eval_step(x, y))
            if o is opts[1]:
                sizes = [p.numel() for p in job.parameters()]
                job.retime()
                out["retimed"].append(sizes == [p.numel() for p in job.parameters()])
            job.clip_grad_norm_(0.3)
            o.step()
    out["token_weights"] = [_numpy(job.state_dict()) for job in jobs]
    plain = torch.optim.AdamW(jobs[1].parameters(), lr=LR)
    try:
        plain.step()
        out["plain"] = "stepped"
    except RuntimeError as e:
        out["plain"] = str(e)
    engine.ZeroRedundancyOptimizer(jobs[1].parameters(), torch.optim.AdamW, jobs[1], lr=LR)
    out["whole_again"] = [p.numel() for p in jobs[1].parameters()] == \
        [p.numel() for p in jobs[0].parameters()]
    # the stage-3 optimizer stepped still: its share sent to the others, now whole again
    opts[1].zero_grad()
    jobs[1].step(x, y)
    opts[1].step()
    out["sums"] = [float(p.detach().double().sum()) for p in jobs[1].parameters()]
    return out


@pytest.mark.timeout(150)
def test_zero2_step_failing_on_one_replica_rolls_back_and_trains_on():
    """A step that fails on one replica (its loss raising) while the other's
    gradients are being reduced to their owners: both raise, each puts its
    gradients back as they were (the others' shares' None), and the next
    step trains as the whole AdamW's does; under stage 3 too, the gathered
    parameters dropped again, the replica waiting for a gather told at once.
    Then stage 3 with a per-token loss, eval_step and job.retime() trains as
    the whole AdamW; a plain AdamW over its parameters is refused, a stage-1
    optimizer made over them gives every replica their values again, and
    the stage-3 one stepped then sends its share (it sent none: the replicas
    parted). Then stage 3 layer by layer and whole, with a module's weight
    read outside its forward, a tie and checkpointed blocks, trains as the
    whole AdamW, layer by layer holding less of the others' at once, and so
    with DeepSpeed's stage3_max_live_parameters and
    stage3_prefetch_bucket_size set small (none, or one module, ahead)."""
    pytest.importorskip("torch")
    results = mesh.spawn(_failed_step_worker, 2, timeout=140, env=PATIENT)
    for res in results:
        assert len(res["raised"]) == 3 and res["rolled_back"] == [True] * 3, res
        assert res["kept"], res
    # stage 3 gathers layer by layer: replica 0, waiting in its backward for a parameter
    # replica 1 owns, is told of replica 1's failure at once (its gathers' tags aborted)
    said = results[0]["said"][2]
    assert "recv from rank 1" in said and "aborted" in said and "The size of tensor" in said, \
        said
    whole, zero, zero3 = results[0]["weights"]
    _same(zero, whole, "weights after a failed step")
    _same(zero3, whole, "stage 3 weights after a failed step")
    # stage 3 with a per-token loss, eval_step and job.retime(): the whole AdamW's weights
    for res in results:
        assert res["evals"][0::2] == res["evals"][1::2], res["evals"]
        assert res["retimed"] == [True, True], res["retimed"]
        assert "is kept by dp replica" in res["plain"], res["plain"]
        assert res["whole_again"], res
    assert results[0]["sums"] == results[1]["sums"], (results[0]["sums"], results[1]["sums"])
    _same(*reversed(results[0]["token_weights"]), "per-token stage 3 weights")
    # stage 3 layer by layer and whole: the whole AdamW's weights; a step held a module's
    # or two of the others' parameters at once, not the stage's (the whole gather's)
    whole, layered, at_once, one_by_one, lively, bucketed = results[0]["layered_weights"]
    _same(layered, whole, "stage 3 weights, layer by layer")
    _same(at_once, whole, "stage 3 weights, gathered whole")
    _same(one_by_one, whole, "stage 3 weights, layer by layer, none gathered ahead")
    _same(lively, whole, "stage 3 weights, stage3_max_live_parameters=1")
    _same(bucketed, whole, "stage 3 weights, stage3_prefetch_bucket_size=1")
    # a module called on one replica only: a gather that waited out the timeout (replica
    # 1's of that module, or replica 0's of the next, which replica 1 never reached) says
    # why; the other replica, if told first, fails the step too
    timed_out = [res["odd"][1] for res in results if res["odd"][0] == "MeshTimeoutError"]
    assert timed_out and all(
        "ZeRO stage 3 gathering a module's parameters (" in note and
        "every dp replica runs the same modules in the same order" in note
        for note in timed_out), [res["odd"] for res in results]
    for res in results:
        evals = res["layered_evals"]
        assert all(evals[k::6] == evals[0::6] for k in range(1, 6)), evals
        for peak, whole_peak, alone, lively, bucketed in res["layered_peaks"]:
            assert whole_peak == res["layered_others"], (whole_peak, res["layered_others"])
            assert 0 < alone < whole_peak, (alone, whole_peak)
            # (each step's eval_step's: two modules gathered ahead at most)
            assert alone <= peak <= min(whole_peak, alone + 2 * res["layered_unit"]), \
                (peak, alone, res["layered_unit"])
            # one element live outside the module running: nothing gathered ahead; one
            # module's elements ahead at a time: at most the two modules' window
            assert lively == alone <= bucketed <= peak, (lively, alone, bucketed, peak)
        # (the second step's eval: the two modules' window held more than one module ahead)
        assert res["layered_peaks"][1][4] < res["layered_peaks"][1][0], res["layered_peaks"]
        # the first step records the order; the second gathers ahead by it; the third runs
        # two modules the other way round (the rest gathered as each runs); the fourth
        # gathers ahead by the third's order; stage3_prefetch=0 never ahead
        ahead = {(n, step): (used, missed) for n, step, used, missed, _ in res["ahead"]}
        assert ahead[1, 0] == (0, 0) and ahead[1, 1][0] > 0 and ahead[1, 1][1] == 0, ahead
        assert ahead[1, 2][1] == 1 and ahead[1, 3][0] == ahead[1, 1][0], ahead
        assert ahead[1, 3][1] == 0 and all(ahead[3, k] == (0, 0) for k in range(4)), ahead
        # the bounds: stage3_max_live_parameters=1 gathers none ahead (its step's peak none
        # ahead's), its backward keeping one module (gathering some again: more values
        # received), stage3_prefetch_bucket_size=1 one module at a time (its step's less)
        trained = {(n, step): got for n, step, _, _, got in res["ahead"]}
        assert all(ahead[4, k][0] == 0 and trained[4, k][0] == trained[3, k][0] and
                   trained[4, k][1] > trained[3, k][1] for k in range(4)), trained
        assert ahead[5, 1][0] > 0 and trained[5, 1][0] < trained[1, 1][0], (ahead, trained)



def _spare_model(dtype):
    """_model in ``dtype``, its first Linear holding a parameter its forward
    never uses (no gradient from the backward: the stage makes it zeros)."""
    import torch

    class Spare(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.spare = inner, torch.nn.Parameter(torch.ones(3))

        def forward(self, x):
            return self.inner(x)
    m = _model()
    m[0] = Spare(m[0])
    return m.to(dtype)


def _combined_worker(world):
    """dp=2 x pp=2: jobs under ZeRO stage 1 and stage 2 side by side, each
    way in its own pair (stage 1's job, stage 2's; in "zb-v" and
    "interleaved" a stage-3 job's too), two steps:
    - "zb-v": two stages a rank, W actions apart from B; eval_step between
      the step and the clip, two job.step calls before opt.step after
      opt.zero_grad(set_to_none=False), the infinity norm clipped;
    - "interleaved": two stages a rank, recompute, bfloat16, a parameter
      its forward never uses;
    - "switched": a stage-2 optimizer over every parameter, then a stage-2
      one over the weights and a stage-1 one over the biases (the newest
      decides: the biases averaged and kept everywhere), measured overhead
      (job.retime() re-times it after a step), and the whole state saved,
      broadcast (tuples as lists) and loaded into the same optimizers each
      step, then saved again;
    then a plain AdamW over the "zb-v" stage-2 job's parameters."""
    import torch
    torch.set_num_threads(1)
    grid = mesh.grid(world, dp=2, pp=2)
    d = grid.coord("dp")
    out = {"rank": world.rank}

    def make(job, params, stage):
        return engine.ZeroRedundancyOptimizer(params, torch.optim.AdamW, job, stage=stage,
                                              lr=LR)

    def split(job):
        named = job.named_parameters()
        return [p for n, p in named if "bias" not in n], [p for n, p in named if "bias" in n]
    for t, (way, sched, extra) in enumerate([
            ("zb-v", "zb-v", {}),
            ("interleaved", "interleaved", {"recompute": True}),
            ("switched", "1f1b", {"overhead": None})]):
        dtype = torch.bfloat16 if way == "interleaved" else torch.float32
        jobs = [engine.distribute(_spare_model(dtype) if way == "interleaved" else _model(),
                                  grid, schedule=sched, microbatches=4, balance="uniform",
                                  sample=_data(0)[0][d::2].to(dtype),
                                  loss_fn=lambda y, t: torch.nn.functional.mse_loss(
                                      y.float(), t.float()),
                                  **{"overhead": 0.0, **extra}, verbose=False, timeout=60,
                                  tag_base=(3 * t + k) << 20)
                for k in ((0, 1) if way == "switched" else (0, 1, 2))]
        if way == "switched":
            make(jobs[1], jobs[1].parameters(), 2)
            opts = [[make(jobs[0], ps, 1) for ps in split(jobs[0])],
                    [make(j_ps[0], j_ps[1], s) for j_ps, s in zip(
                        [(jobs[1], ps) for ps in split(jobs[1])], (2, 1))]]
        else:
            opts = [[make(job, job.parameters(), s)] for job, s in zip(jobs, (1, 2, 3))]
        norms, retimed = [], []
        for step in range(2):
            x, y = (a[d::2].to(dtype) for a in _data(step))
            for job, os_ in zip(jobs, opts):
                for o in os_:
                    o.zero_grad(set_to_none=way != "zb-v")
                job.step(x, y)
                if way == "zb-v":
                    job.eval_step(x, y)
                    job.step(*(a[d::2] for a in _data(step + 10)))
                if way == "switched" and os_ is opts[1]:
                    freed = [p.grad is None for p in job.parameters()]
                    job.retime()
                    retimed.append(freed == [p.grad is None for p in job.parameters()])
                norms.append(job.clip_grad_norm_(0.1, norm_type=float("inf") if way == "zb-v"
                                                 else 2.0))
                for o in os_:
                    o.step()
                if way == "switched":
                    whole = collectives.broadcast_state(world, job.optimizer_state_dict(os_))
                    job.load_optimizer_state_dict(os_, whole)
        z = opts[1]
        whole = [job.state_dict() for job in jobs]      # (bfloat16 widened: exactly)
        out[way] = {"norms": norms, "weights": [_numpy(None if w is None else {
                        k: v.float() for k, v in w.items()}) for w in whole],
                    "kept": all((p.grad is not None) == (o.stage == 1 or o.holds(p))
                                for o in z for p in o.params),
                    "freed": sum(p.grad is None for o in z for p in o.params),
                    "retimed": retimed, "n": len(jobs)}
        if len(jobs) == 3:      # stage 3: its share's values and gradients only, at rest
            out[way]["kept"] &= all((p.grad is not None) == (p.numel() > 0) == o.holds(p)
                                    for o in opts[2] for p in o.params)
        if way == "zb-v":   # a plain AdamW over the stage-2 job's parameters: refused
            plain = torch.optim.AdamW(jobs[1].parameters(), lr=LR)
            for then in ("refused", "stepped"):
                plain.zero_grad()
                jobs[1].step(x, y)
                try:
                    plain.step()
                    out[then] = "stepped"
                except RuntimeError as e:
                    out[then] = str(e)
                make(jobs[1], jobs[1].parameters(), 1)     # (the average everywhere again)
            out["sums"] = [float(p.double().sum()) for p in jobs[1].parameters()]
    return out


@pytest.mark.timeout(240)
def test_zero2_in_the_schedules_and_ways_a_user_reaches_trains_as_stage_1():
    """Stage 2's weights and norms equal stage 1's bit for bit in schedules
    holding two stages a rank (zb-v's W actions apart from B, interleaved),
    with eval_step, accumulation into zeroed gradients, the infinity norm,
    recompute, bfloat16, a parameter given no gradient, optimizers switched
    and over disjoint groups, job.retime(), and a whole state broadcast and
    loaded each step. job.retime() made the freed gradients whole again
    (its dry run's sizes read through grads()); a state broadcast (tuples
    as lists) and loaded was then refused by optimizer_state_dict at pp=2
    ("betas is (0.9, 0.999) on rank 0 but [0.9, 0.999] on rank 1"); a plain
    AdamW over a stage-2 job's parameters stepped each replica's share only,
    the replicas' weights parting silently: now refused on every replica."""
    pytest.importorskip("torch")
    results = mesh.spawn(_combined_worker, 4, timeout=220, env=PATIENT)
    for way in ("zb-v", "interleaved", "switched"):
        for res in results:
            got = res[way]
            n = got["n"]
            assert got["norms"][0::n] == got["norms"][1::n] == got["norms"][n - 1::n], \
                (way, got["norms"])
            assert got["kept"], (way, got)
            assert all(got["retimed"]), (way, got["retimed"])
        # each pp rank's replicas free some (the biases of "switched" kept everywhere)
        assert all(sum(res[way]["freed"] for res in results[k::2]) > 0 for k in (0, 1)), way
        stage1, stage2, *stage3 = results[0][way]["weights"]
        _same(stage2, stage1, f"{way} weights")
        for w in stage3:
            _same(w, stage1, f"{way} stage 3 weights")
    assert results[0]["switched"]["retimed"] == [True] * 2
    # a plain optimizer stepping what a stage-2 one dealt would skip the freed gradients,
    # each replica stepping its share only: refused on every replica, nothing stepped;
    # after a stage-1 one over them, it steps, the replicas alike
    for res in results:
        assert res["refused"].startswith(f"rank {res['rank']}: AdamW.step(): the gradient "
                                         f"of its ") and "is kept by dp replica" in \
            res["refused"] and "nothing stepped" in res["refused"], res["refused"]
        assert res["stepped"] == "stepped", res["stepped"]
    for r in (0, 1):
        assert results[r]["sums"] == results[r + 2]["sums"], (results[r], results[r + 2])
