"""engine.ZeroRedundancyOptimizer (ZeRO stage 1 over a job's dp axis) trains
as the same job with the whole optimizer on every replica, keeps a share of
its state per replica, and checkpoints the same whole state.

One spawn per layout runs two jobs of the same model on the grid, one with
AdamW, one with AdamW under ZeRO, clipping every step; the parent compares
their weights, their gathered optimizer states and the state each rank held.
"""
import numpy as np
import pytest

import collectives
import engine
import mesh
from engine.zero import shares

WIDTHS = [6, 16, 12, 16, 8, 4]       # 5 Linear layers, 9 layers with the Tanh between
TP_PLAN = {"0": "colwise", "2": "rowwise", "4": "colwise", "6": "rowwise"}
ROWS, STEPS, LR, SEED = 24, 3, 0.05, 7
PATIENT = {"MESH_PEER_TIMEOUT": "60"}


def test_shares_deal_the_largest_first_to_the_emptiest():
    assert shares([10, 1, 8, 3], 2) == [0, 0, 1, 1]
    assert shares([4, 4, 4], 2) == [0, 1, 0]
    assert shares([5], 3) == [0]
    assert shares([], 2) == []
    sizes = [64 * 32, 32, 32 * 32, 32, 32 * 8, 8]
    held = [sum(s for s, r in zip(sizes, shares(sizes, 4)) if r == k) for k in range(4)]
    assert sorted(held) == [32 + 32 + 8, 256, 1024, 2048]


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
    whole, zjob = build(0), build(1 << 20)
    opt = torch.optim.AdamW(_groups(whole.named_parameters()), lr=LR)
    zopt = engine.ZeroRedundancyOptimizer(_groups(zjob.named_parameters()), torch.optim.AdamW,
                                          zjob, lr=LR)
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
    norms = []
    for step in range(STEPS):
        x, y = (part(a) for a in _data(step))
        for job, o, s in ((whole, opt, sched), (zjob, zopt, zsched)):
            o.zero_grad()
            job.step(x, y)
            norms.append(job.clip_grad_norm_(0.2))
            o.step()
            s.step()
    out = {"rank": world.rank, "norms": norms, "held": _held(opt),
           "zero_held": zopt.state_bytes(), "shared": len(zopt.optim.state),
           "params": len(zopt.params),
           "weights": _numpy(whole.state_dict()), "zero_weights": _numpy(zjob.state_dict()),
           "optim": _optim_numpy(whole.optimizer_state_dict(opt)),
           "zero_optim": _optim_numpy(zjob.optimizer_state_dict(zopt))}
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
    x, y = (part(a) for a in _data(STEPS))
    for job, o in ((whole, opt), (zjob, again)):
        o.zero_grad()
        job.step(x, y)
        o.step()
    out["resumed"] = _numpy(whole.state_dict())
    out["zero_resumed"] = _numpy(zjob.state_dict())
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
    for res in results:
        assert res["norms"][0::2] == res["norms"][1::2], res["norms"]    # clipped alike
        assert res["norms"][0] > 0.2                                       # (it clipped)
        # each replica keeps the state of its share only, and the shares cover it all
        assert 0 < res["zero_held"] < res["held"], res
        assert res["loaded_held"] == res["zero_held"]
        assert res["cut"] == res["held_n"] == res["shared"] < res["params"], res
    for res in results:     # a replica's share and its mate's make the whole state
        mate = results[(res["rank"] + n // 2) % n]
        assert res["zero_held"] + mate["zero_held"] == res["held"], (res, mate)
    root = results[0]
    _same(root["zero_weights"], root["weights"], "weights")
    _same(root["zero_resumed"], root["resumed"], "resumed")
    got, want = root["zero_optim"], root["optim"]
    assert got["param_groups"] == want["param_groups"]
    assert list(got["state"]) == list(want["state"])
    for name, own in want["state"].items():
        _same(got["state"][name], own, f"state {name}")


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
