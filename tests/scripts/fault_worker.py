"""A rank for tests/test_mesh_faults.py, started the way any launcher starts one
(environment variables, mesh.init), so that the test, not a supervisor,
decides when ranks die:

    fault_worker.py OUTDIR SCENARIO VICTIM

Every rank writes OUTDIR/<rank>.ready once it is about to start the
scenario's communication; every survivor writes OUTDIR/<rank>.json with what
it saw: each operation that failed, its error type, the peer the error names,
and the time (CLOCK_MONOTONIC, shared by all processes of the machine).
"""
import faulthandler
import json
import os
import signal
import sys
import time

import numpy as np

import collectives
import mesh

OUTDIR, SCENARIO, VICTIM = sys.argv[1], sys.argv[2], int(sys.argv[3])
BIG = 4 << 20                      # float32 elements: 16 MiB, the ring/large path


def _write(name, obj):
    tmp = os.path.join(OUTDIR, f".{name}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, os.path.join(OUTDIR, name))


def _ready(world):
    _write(f"{world.rank}.ready", {"pid": os.getpid()})


def _failure(op, e):
    return {"op": op, "type": type(e).__name__, "peer": getattr(e, "peer", None),
            "msg": str(e), "t": time.monotonic()}


def _attempt(op, fn):
    """Run a follow-up operation that involves the dead rank: it must fail fast."""
    t0 = time.monotonic()
    try:
        fn()
    except mesh.MeshError as e:
        rec = _failure(op, e)
        rec["took"] = time.monotonic() - t0
        return rec
    return {"op": op, "type": None, "took": time.monotonic() - t0}


def _all_reduce_loop(world, seen):
    """Checked all_reduce of 16 MiB until one fails; wrong results are recorded."""
    a = np.empty(BIG, np.float32)
    i = 0
    while True:
        a.fill(world.rank + i)
        collectives.all_reduce(world, a)
        want = sum(range(world.size)) + world.size * i
        if a[0] != want or a[-1] != want:
            seen["wrong"] = seen.get("wrong", 0) + 1
        i += 1
        seen["rounds"] = i


def _p2p_loop(world, seen):
    """The victim streams 8 MiB arrays to rank 0; the other ranks wait for it."""
    chunk = np.ones(2 << 20, np.float32)
    if world.rank == VICTIM:
        while True:
            world.send(chunk, 0, tag=1)
    if world.rank == 0:
        while True:
            world.recv(VICTIM, tag=1, out=chunk)
            seen["rounds"] = seen.get("rounds", 0) + 1
    world.recv(VICTIM, tag=2)


def _idle(world, seen):
    """Nobody is talking: survivors have a receive posted on the victim and
    wait on it; the victim sleeps."""
    if world.rank == VICTIM:
        time.sleep(120)
    req = world.irecv(VICTIM, tag=3)
    req.wait(timeout=60)


def _pipeline(world, seen):
    """dp=2 x pp=2 training steps (1F1B, gradients all-reduced over dp)."""
    import engine
    from engine.layers import mlp_stages, mse_loss, sgd

    grid = mesh.grid(world, dp=2, pp=2)
    sched = engine.schedules.one_f_one_b(2, 8)
    stages = engine.stages_for_rank(mlp_stages([64, 256, 256, 256, 8], sched.num_stages),
                                    sched, grid.coord("pp"))
    pipe = engine.Pipeline(grid, stages, sched, loss_fn=mse_loss)
    rng = np.random.default_rng(grid.coord("dp"))
    seen["rounds"] = 0
    while True:
        x, y = rng.standard_normal((128, 64)), rng.standard_normal((128, 8))
        pipe.step(x if pipe.first else None, y if pipe.last else None)
        sgd(stages, 0.01)
        seen["rounds"] += 1
        if seen["rounds"] == 1:
            _ready(world)


SCENARIOS = {"idle": _idle, "p2p": _p2p_loop, "all_reduce": _all_reduce_loop,
             "pipeline": _pipeline}


def main():
    faulthandler.register(signal.SIGUSR1)   # the test dumps stacks of a rank that hangs
    seen = {}
    with mesh.init(timeout=60) as world:
        collectives.barrier(world)
        if SCENARIO != "pipeline":       # it is ready once its first step is done
            _ready(world)
        try:
            SCENARIOS[SCENARIO](world, seen)
        except mesh.MeshError as e:
            seen["first"] = _failure(SCENARIO, e)
        if SCENARIO == "pipeline":
            # leave at once, as a failed rank would: the ranks that share no
            # group with the victim learn of it through their partners' exit
            seen.update(rank=world.rank, later=[], state=world._t.peer_state(VICTIM))
            _write(f"{world.rank}.json", seen)
            os._exit(0)
        later = [_attempt("recv", lambda: world.recv(VICTIM, tag=9, timeout=30)),
                 _attempt("send", lambda: world.send(np.ones(4), VICTIM, tag=9, timeout=30)),
                 _attempt("all_reduce", lambda: collectives.all_reduce(world, np.ones(8)))]
        seen.update(rank=world.rank, later=later, state=world._t.peer_state(VICTIM))
        _write(f"{world.rank}.json", seen)
        # stay until every survivor has written: a same-host collective reads
        # its peers' memory, and a survivor that left would look lost too
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and sum(
                n.endswith(".json") for n in os.listdir(OUTDIR)) < world.size - 1:
            time.sleep(0.02)
        os._exit(0)   # closing would wait on the dead rank's share of the goodbye


if __name__ == "__main__":
    main()
