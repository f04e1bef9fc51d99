"""Every rank raises at once (engine.agree): a failure on one rank in
engine.distribute's last stretch (the dp broadcasts of replica 0's
weights, the Job made, its re-time), in a user's later job.retime(), in a
Pipeline's making after its exchange, in engine.parallelize, or a
KeyboardInterrupt as it waits in job.state_dict() raises its own error
there and, on every other rank, at once, an error naming it: none waits
in a collective (or for a word) the failed rank will not make until its
timeout.
"""
import importlib
import types

import numpy as np
import pytest

import engine
import mesh
from engine.layers import Linear, Sequential, Tanh, mse_loss
from test_engine_tp_pipeline import interrupt_call


def _model():
    return Sequential(Linear(8, 6, np.random.default_rng(1)), Tanh(),
                      Linear(6, 4, np.random.default_rng(2)),
                      Linear(4, 6, np.random.default_rng(3)), Tanh(),
                      Linear(6, 2, np.random.default_rng(4)))


def _interrupt(module, name, call, rank):
    """The ``call``-th call of ``module.name`` raises a KeyboardInterrupt
    (a negative ``call``: once the real call returned), on this rank only."""
    interrupt_call(module, name, call, f"stopped on purpose on rank {rank}")


def _interrupt_inside_broadcast(rank):
    """distribute's next dp broadcast raises a KeyboardInterrupt inside the
    collective (as it starts, under its tag: Ctrl-C in its wait)."""
    import collectives
    from collectives import runner
    here = importlib.import_module("engine.stage_state")
    real_t = runner.Tuning

    class Interrupted:
        @staticmethod
        def from_env():
            runner.Tuning = real_t
            raise KeyboardInterrupt(f"stopped on purpose on rank {rank}")

    def broadcast(*a, **k):
        here.collectives = collectives
        runner.Tuning = Interrupted
        return collectives.broadcast(*a, **k)
    here.collectives = types.SimpleNamespace(broadcast=broadcast)


def _interrupt_between_broadcasts(rank):
    """distribute's second dp broadcast raises a KeyboardInterrupt before
    it starts (Ctrl-C between two broadcasts, outside any collective)."""
    import collectives
    here = importlib.import_module("engine.stage_state")
    calls = [0]

    def broadcast(*a, **k):
        calls[0] += 1
        if calls[0] == 2:
            here.collectives = collectives
            raise KeyboardInterrupt(f"stopped on purpose on rank {rank}")
        return collectives.broadcast(*a, **k)
    here.collectives = types.SimpleNamespace(broadcast=broadcast)


def _last_stretch_worker(world, cases):
    """dp=2 x pp=2: for each case ``(module, name, call, args)``, distribute
    with that call interrupted on world rank 1 (``module`` "broadcast": its
    dp broadcast, inside the collective; "between": before its second),
    then a step of the job."""
    x = np.random.default_rng(5).standard_normal((4, 8))
    y = np.random.default_rng(6).standard_normal((4, 2))
    grid = mesh.grid(world, dp=2, pp=2)
    said = []
    for module, name, call, args in cases:
        if world.rank == 1 and module == "broadcast":
            _interrupt_inside_broadcast(world.rank)
        elif world.rank == 1 and module == "between":
            _interrupt_between_broadcasts(world.rank)
        elif world.rank == 1 and module is not None:
            _interrupt(module, name, call, world.rank)
        kw = dict(schedule="1f1b", microbatches=2, balance="time", sample=x, reps=1)
        kw.update(args)
        try:
            job = engine.distribute(_model(), grid, loss_fn=mse_loss, verbose=False,
                                    timeout=20, **kw)
            said.append(job.step(x, y))
        except BaseException as e:
            said.append(f"{type(e).__name__}: {e}")
    return said


_UNMEASURED = dict(balance=[3, 3], sample=None)
# where distribute's last stretch runs, after the exchange that follows its Pipeline
_LAST = [("engine.distribute", "_replica_state", 1, {}),   # replica 0's weights, taken
         ("broadcast", None, 0, {}),                        # and sent (inside the collective)
         ("between", None, 0, {}),                          # (between two broadcasts)
         ("engine.distribute", "Job", 1, {}),               # the job made
         ("engine.distribute", "Job", 1, _UNMEASURED),      # so, with nothing measured
         ("engine.job_retime", "retimed", 1, {}),           # the re-time's, after its dry run
         (None, None, 0, {})]


@pytest.mark.timeout(240)
def test_a_failure_in_distributes_last_stretch_fails_every_rank_at_once():
    """A KeyboardInterrupt on one rank after the exchange that follows
    distribute's Pipeline (as it takes or sends replica 0's weights over dp,
    inside a broadcast or between two, makes the Job, or re-times it after
    its dry run) ended its call alone:
    its dp peer waited in the broadcast, the other ranks in the re-time's
    exchange (or, with nothing measured, the last word) until their
    timeout (20 s here), raising a timeout that named neither the rank nor
    its error. Now every rank raises at once, the others DistributeFailed
    naming it, and a job built after trains."""
    results = mesh.spawn(_last_stretch_worker, 4, _LAST, timeout=200)
    for at in range(len(_LAST) - 1):
        assert results[1][at] == "KeyboardInterrupt: stopped on purpose on rank 1", \
            (at, results[1])
        for r in (0, 2, 3):
            assert results[r][at] == (f"DistributeFailed: rank {r}: engine.distribute failed "
                                      f"on rank 1: KeyboardInterrupt: stopped on purpose on "
                                      f"rank 1"), (at, r, results[r])
    for r, said in enumerate(results):
        last = said[-1]
        assert not isinstance(last, str), (r, said)


def _pipeline_worker(world, cases):
    """pp=2 (world rank 1 holds the last stage): for each case ``(module,
    name, call, torch)``, a Pipeline made with that call interrupted on
    world rank 1 (torch stages recomputing their first submodule where
    ``torch``), then a step of it."""
    import torch
    from engine.layers import mlp_stages
    sched = engine.schedules.by_name("1f1b", world.size, 2)
    x = np.random.default_rng(5).standard_normal((4, 3))
    y = np.random.default_rng(6).standard_normal((4, 2))
    said = []
    for module, name, call, is_torch in cases:
        if world.rank == 1 and module is not None:
            _interrupt(module, name, call, world.rank)
        if is_torch:
            torch.manual_seed(0)
            parts = [torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh()),
                     torch.nn.Sequential(torch.nn.Linear(4, 2))]
            kw = dict(loss_fn=torch.nn.functional.mse_loss, recompute="0")
            xs, ys = torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)
        else:
            parts, kw, xs, ys = mlp_stages([3, 4, 2], sched.num_stages, 0), {}, x, y
        kw.setdefault("loss_fn", mse_loss)
        try:
            pipe = engine.Pipeline(world, engine.stages_for_rank(parts, sched, world.rank),
                                   sched, timeout=20, **kw)
            loss = pipe.step(xs, ys)
            said.append(None if loss is None else float(loss))
        except BaseException as e:
            said.append(f"{type(e).__name__}: {e}")
    return said


# where a Pipeline's making runs after its exchange (_given_alike)
_MADE = [("engine.executor", "TiedGrads", 1, False),         # its ties read
         ("engine.executor", "TpSums", 1, False),            # its tp sums
         ("engine.executor", "ReplicaBuffers", 1, False),    # its buffers over dp
         ("engine.pipeline_args", "checkpoint_modules", 1, True),   # its selective recompute
         (None, None, 0, False),
         (None, None, 0, True)]


@pytest.mark.timeout(120)
def test_a_failure_in_a_pipelines_making_after_its_exchange_fails_every_rank_at_once():
    """A KeyboardInterrupt on one rank as its Pipeline is made, after the
    exchange of what every rank was given (its ties read, its tp sums or
    its buffers' replicas set up, its submodules wrapped to recompute),
    raised there alone: the others returned a Pipeline whose first step
    waited for it (or waited in the gather of the recompute's hits) until
    their timeout (20 s here). Now every rank raises at once, the others
    naming it, and a Pipeline made after steps."""
    results = mesh.spawn(_pipeline_worker, 2, _MADE, timeout=100)
    for at in range(len(_MADE) - 2):
        assert results[1][at] == "KeyboardInterrupt: stopped on purpose on rank 1", \
            (at, results[1])
        assert results[0][at] == ("MeshError: rank 0: Pipeline on group world: failed on pp "
                                  "rank 1: KeyboardInterrupt: stopped on purpose on rank 1"), \
            (at, results[0])
    for at in (-2, -1):
        assert isinstance(results[1][at], float) and results[0][at] == results[1][at], results


def _parallelize_worker(world, cases):
    """tp=2 over the world: for each case ``(module, name, call, torch)``,
    engine.parallelize with that call interrupted on rank 1 (``name``
    "state_dict": the module's own, a torch module's that raises there),
    then a forward, whose collectives the tp peers make together."""
    import torch
    x = np.random.default_rng(5).standard_normal((3, 4))
    said = []
    for module, name, call, is_torch in cases:
        if is_torch:
            torch.manual_seed(0)
            model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(),
                                        torch.nn.Linear(6, 2))
        else:
            model = Sequential(Linear(4, 6, np.random.default_rng(1)), Tanh(),
                               Linear(6, 2, np.random.default_rng(2)))
        if world.rank == 1 and name == "state_dict":
            def state_dict(*a, **k):
                del model.state_dict        # (this call only)
                raise KeyboardInterrupt(f"stopped on purpose on rank {world.rank}")
            model.state_dict = state_dict
        elif world.rank == 1 and module is not None:
            _interrupt(module, name, call, world.rank)
        try:
            engine.parallelize(model, world, {"0": "colwise", "2": "rowwise"})
        except BaseException as e:
            said.append(f"{type(e).__name__}: {e}")
            continue
        try:
            if is_torch:
                with torch.no_grad():
                    said.append(model(torch.tensor(x, dtype=torch.float32)).numpy())
            else:
                said.append(model.forward(x)[0])
        except BaseException as e:
            said.append(f"{type(e).__name__}: {e}")
    return said


# where parallelize runs on one rank: before its check's exchange, and after
_PARALLELIZE = [(None, "state_dict", 1, True),                 # the module read
                ("engine.tensor_parallel", "match", 1, True),   # the plan matched
                ("engine.tp_layers", "match", 1, False),        # so, an engine.layers model's
                ("engine.tensor_parallel", "_shard", 2, True),  # a submodule cut (its second)
                ("engine.tp_layers", "_shard", 2, False),       # so, an engine.layers model's
                (None, None, 0, True),
                (None, None, 0, False)]


@pytest.mark.timeout(120)
def test_a_failure_in_parallelize_on_one_tp_rank_fails_its_peers_at_once():
    """A KeyboardInterrupt on one tp rank in engine.parallelize (as it
    reads the module, matches the plan, or cuts a submodule to its shard)
    raised there alone: its peers waited in the check's exchange, or in the
    first collective of their forward, until their timeout. Now they raise
    at once naming it: a PlanError in the exchange (a peer's abort, which
    engine.distribute reports as that rank's error), or their next tp
    collective fails naming it; and a module parallelized after runs."""
    results = mesh.spawn(_parallelize_worker, 2, _PARALLELIZE, timeout=100)
    own = "KeyboardInterrupt: stopped on purpose on rank 1"
    for at in range(3):
        assert results[1][at] == own, (at, results[1])
        assert results[0][at] == ("PlanError: tp rank 0: parallelize failed on tp rank 1 of "
                                  f"group world: {own}"), (at, results[0])
    for at in (3, 4):
        assert results[1][at] == own, (at, results[1])
        assert results[0][at].startswith("MeshError: rank 0: ") and (
            f"parallelize failed on tp rank 1: {own}" in results[0][at]), (at, results[0])
    for at in (5, 6):
        assert np.allclose(results[0][at], results[1][at]), (at, results)


def _distribute_tp_worker(world, cases):
    """tp=2: for each case ``(module, name, call)``, distribute with a plan
    and that call interrupted on world rank 1, then a step of the job."""
    x = np.random.default_rng(5).standard_normal((4, 8))
    y = np.random.default_rng(6).standard_normal((4, 2))
    grid = mesh.grid(world, pp=1, tp=2)
    said = []
    for module, name, call in cases:
        if world.rank == 1 and module is not None:
            _interrupt(module, name, call, world.rank)
        try:
            job = engine.distribute(_model(), grid, plan={"0": "colwise", "2": "rowwise"},
                                    schedule="1f1b", microbatches=2, loss_fn=mse_loss,
                                    sample=x, reps=1, verbose=False, timeout=20)
            said.append(job.step(x, y))
        except BaseException as e:
            said.append(f"{type(e).__name__}: {e}")
    return said


_DISTRIBUTE_TP = [("engine.tp_layers", "match", 1),     # before parallelize's exchange
                  ("engine.tp_layers", "_shard", 2),    # after it, a layer cut
                  (None, None, 0)]


@pytest.mark.timeout(120)
def test_a_failure_in_distributes_parallelize_fails_every_rank_at_once():
    """distribute's plan applied: a KeyboardInterrupt on one tp rank in
    parallelize, before its check's exchange or after it, left its tp peer
    waiting there (or in the first tp collective of its profile) until its
    timeout. Now every rank raises at once, the other DistributeFailed naming
    it, and a job built after trains."""
    results = mesh.spawn(_distribute_tp_worker, 2, _DISTRIBUTE_TP, timeout=100)
    for at in range(len(_DISTRIBUTE_TP) - 1):
        assert results[1][at] == "KeyboardInterrupt: stopped on purpose on rank 1", \
            (at, results[1])
        assert results[0][at] == ("DistributeFailed: rank 0: engine.distribute failed on rank "
                                  "1: KeyboardInterrupt: stopped on purpose on rank 1"), \
            (at, results[0])
    assert all(isinstance(said[-1], float) for said in results), results


def _retime_worker(world):
    """pp=2: a job made, then the user's own job.retime() with its first
    prediction after the dry run interrupted on rank 1, then another
    re-time and a step on every rank; then the same with a job whose costs
    were given (``overhead``: no dry run), with each rank's prediction
    after the interrupted re-time and after the next."""
    x = np.random.default_rng(5).standard_normal((4, 8))
    y = np.random.default_rng(6).standard_normal((4, 2))
    said = []
    for overhead in (None, 1e-4):
        job = engine.distribute(_model(), mesh.grid(world, pp=2), loss_fn=mse_loss, sample=x,
                                schedule="1f1b", microbatches=2, reps=1, verbose=False,
                                timeout=20, overhead=overhead)
        if world.rank == 1:
            _interrupt("engine.job_retime", "retimed", 1, world.rank)
        try:
            said.append(job.retime())
        except BaseException as e:
            said.append(f"{type(e).__name__}: {e}")
        if overhead is not None:
            said.append(job.predicted)
        said.append(job.retime())
        if overhead is not None:
            said.append(job.predicted)
        loss = job.step(x, y)
        said.append(None if loss is None else float(loss))
    return said


@pytest.mark.timeout(120)
def test_a_failure_after_a_users_retime_dry_run_fails_every_rank_at_once():
    """A KeyboardInterrupt on one rank after the dry run of a user's own
    job.retime() (as its figures predict the step again) raised there
    alone: the others returned, and their next collective waited for that
    rank until their timeout. Now every rank raises at once, the others
    DistributeFailed naming it, and the job re-times and steps after. So
    without a dry run (the costs given: the prediction was made on each
    rank alone after the times' exchange, and rank 0 kept a new one that
    rank 1 had not): every rank keeps the prediction before, and the next
    re-time gives every rank the same."""
    results = mesh.spawn(_retime_worker, 2, timeout=100)
    for at in (0, 3):       # (the dry run's re-time, then the given costs')
        assert results[1][at] == "KeyboardInterrupt: stopped on purpose on rank 1", results
        assert results[0][at] == ("DistributeFailed: rank 0: engine.distribute failed on "
                                  "rank 1: KeyboardInterrupt: stopped on purpose on rank 1"), \
            results
    for said in results:
        assert isinstance(said[1], float) and said[1] > 0, results
        assert isinstance(said[5], float) and said[5] > 0 and said[5] == said[6], results
    assert results[0][4] == results[1][4], results      # (as distribute left it, on both)
    assert results[0][6] == results[1][6], results
    assert isinstance(results[1][2], float) and results[0][2] == results[1][2], results
    assert isinstance(results[1][7], float) and results[0][7] == results[1][7], results


def _stop(rank):
    return KeyboardInterrupt(f"stopped on purpose on rank {rank}")


def _answered_then_stopped(rank):
    """Rank ``rank``'s wait for group rank 0's answer (engine.agree._answer)
    answers rank 0's question about its word, then is interrupted."""
    from engine import agree

    def answer(g, n, timeout):
        agree._answer = real
        m, _, asked = g.recv(0, tag=agree._HERE_TAG, timeout=timeout)
        assert asked
        g.send([m, m == n], 0, tag=agree._STILL_TAG, timeout=timeout)
        raise _stop(rank)
    real = agree._answer
    agree._answer = answer


def _stopped_sending(rank, at):
    """This rank's next point-to-point send on tag ``at`` is interrupted."""
    real = mesh.Comm.send

    def send(self, obj, dst, tag=0, timeout=None):
        if tag == at:
            mesh.Comm.send = real
            raise _stop(rank)
        return real(self, obj, dst, tag, timeout)
    mesh.Comm.send = send


def _stopped_receiving(rank, r, at):
    """Group rank 0's next receive of rank ``r``'s state message on tag
    ``at`` in a gather is interrupted (before it takes the message)."""
    from engine import agree
    real = agree._Called.recv

    def recv(self, src, tag):
        if (src, tag) == (r, at):
            agree._Called.recv = real
            raise _stop(rank)
        return real(self, src, tag)
    agree._Called.recv = recv


def _state_said(job):
    """What a ``job.state_dict()`` call gave: None, its keys, or its error."""
    try:
        got = job.state_dict(timeout=10)
        return None if got is None else sorted(got)
    except BaseException as e:
        return f"{type(e).__name__}: {e}"


def _gather_worker(world, cases):
    """pp=3, one stage a rank: for each case ``(who, how, late)``,
    job.state_dict() on every rank, rank ``who`` interrupted ``how``
    ("waiting": in its wait for rank 0's answer, before rank 0 took its
    word; "answered": once it answered rank 0's question; "sending": as it
    sends its state; "word": rank 0 as it takes the second rank's word;
    "receiving": rank 0 as it takes the second rank's state, the first's
    taken), the ranks of ``late`` calling it 0.5 s after the others; then
    another job.state_dict() on every rank, the whole state or None, and
    the tags of the gather's messages left unread (after a barrier)."""
    import time
    from engine import agree
    from engine.layers import Linear, Sequential
    model = Sequential(*[Linear(4, 4, np.random.default_rng(i)) for i in range(3)])
    job = engine.distribute(model, mesh.grid(world, pp=3), balance=[1, 1, 1],
                            schedule="1f1b", microbatches=3, loss_fn=mse_loss,
                            verbose=False, timeout=20)
    import collectives
    said: list = []
    for who, how, late in cases:
        if world.rank == who:
            if how == "waiting":
                interrupt_call("engine.agree", "_answer", 1, str(_stop(who)))
            elif how == "answered":
                _answered_then_stopped(who)
            elif how == "sending":
                _stopped_sending(who, agree._STATE_TAG + 1)
            elif how == "word":
                interrupt_call("engine.agree", "_word", 2, str(_stop(who)))
            elif how == "receiving":
                _stopped_receiving(who, 2, agree._STATE_TAG + 1)
        if world.rank in late:
            time.sleep(0.5)
        for _ in range(2):      # the call the case stops, then the next one
            said.append(_state_said(job))
            collectives.barrier(world)
        pp = job.grid.group("pp")      # (a state's messages: first, two parts; rank 0's word)
        said.append([t - agree._STATE_TAG for t in (agree._TAKEN_TAG, *range(agree._STATE_TAG,
                     agree._STATE_TAG + 3)) if pp.iprobe(mesh.ANY, t) is not None])
    return said


_GATHER = [(1, "waiting", [0]),         # rank 1 alone waiting, rank 0 not come yet
           (1, "answered", [2]),        # rank 1 asked, rank 0 waiting for rank 2's word
           (1, "sending", []),          # rank 1 sending its state
           (0, "word", [0]),            # rank 0 taking rank 2's word
           (0, "receiving", [])]        # rank 0 taking rank 2's state


@pytest.mark.timeout(150)
def test_a_rank_interrupted_in_job_state_dict_fails_the_others_at_once():
    """A rank interrupted (KeyboardInterrupt, on that rank alone) as it
    waited in job.state_dict() for group rank 0's answer, or as it sent its
    state, raised there and left rank 0 waiting for it, and the ranks rank
    0 then did not answer waiting for it, until their timeout; rank 0 so
    interrupted as it took the words left the others waiting for its
    answer; rank 0 so interrupted as it took the others' states left them
    unread (the next call took them for its own) and the others returned
    None. Now the interrupted rank raises its interrupt at once, having
    told the others (rank 0: once it took and dropped the states on their
    way), which raise GatherFailed naming it (a rank whose state was sent
    already too: it waits for rank 0's word that it took every state), the
    next state_dict() on every rank gathers the whole state, and no
    message is left unread."""
    results = mesh.spawn(_gather_worker, 3, _GATHER, timeout=140)
    whole = results[0][1]
    assert isinstance(whole, list) and len(whole) == 6, results[0]
    for at, (who, how, _) in enumerate(_GATHER):
        own = f"KeyboardInterrupt: stopped on purpose on rank {who}"
        for r in range(3):
            got, after, left = results[r][3 * at:3 * at + 3]
            assert after == (whole if r == 0 else None) and left == [], (how, r, after, left)
            if r == who:
                assert got == own, (how, r, got)
            else:
                assert got == (f"GatherFailed: rank {r}: job.state_dict() failed on rank "
                               f"{who}: {own}; nothing was gathered"), (how, r, got)


def _gather_tp_worker(world):
    """pp=2 x tp=2: job.state_dict() with the rank at pp 1, tp 1
    interrupted in its wait for its tp rank 0's answer (which comes 0.5 s
    late), then job.state_dict() and a step on every rank."""
    import time
    x = np.random.default_rng(5).standard_normal((4, 8))
    y = np.random.default_rng(6).standard_normal((4, 2))
    grid = mesh.grid(world, pp=2, tp=2)
    job = engine.distribute(_model(), grid, plan={"0": "colwise", "2": "rowwise"},
                            balance=[3, 3], schedule="1f1b", microbatches=2, loss_fn=mse_loss,
                            verbose=False, timeout=20)
    at = (grid.coord("pp"), grid.coord("tp"))
    if at == (1, 1):
        _interrupt("engine.agree", "_answer", 1, world.rank)
    elif at == (1, 0):
        time.sleep(0.5)
    try:
        got = job.state_dict(timeout=10)
        said = None if got is None else sorted(got)
    except BaseException as e:
        said = f"{type(e).__name__}: {e}"
    got = job.state_dict(timeout=10)
    return at, said, None if got is None else sorted(got), job.step(x, y)


@pytest.mark.timeout(120)
def test_a_tp_rank_interrupted_in_job_state_dict_fails_its_pp_rank_0_at_once():
    """A tp rank interrupted in job.state_dict() as it waited for its tp
    rank 0's answer: now that rank 0 raises GatherFailed naming it, and
    tells its pp rank 0 (which waited for its word until its timeout), which
    raises the same; the next state_dict() gathers the whole state and the
    job steps."""
    results = mesh.spawn(_gather_tp_worker, 4, timeout=100)
    by = {at: (r, said, after, loss) for r, (at, said, after, loss) in enumerate(results)}
    gone = by[(1, 1)][0]
    own = f"KeyboardInterrupt: stopped on purpose on rank {gone}"
    assert by[(1, 1)][1] == own, results
    for at in ((1, 0), (0, 0)):
        assert by[at][1] == (f"GatherFailed: rank {by[at][0]}: job.state_dict() failed on rank "
                             f"{gone}: {own}; nothing was gathered"), (at, results)
    assert by[(0, 1)][1] is None, results
    whole = by[(0, 0)][2]
    assert isinstance(whole, list) and len(whole) == 8, results
    assert all(v[2] is None for at, v in by.items() if at != (0, 0)), results
    assert all(isinstance(v[3], float) for at, v in by.items() if at[0] == 1), results
