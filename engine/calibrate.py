"""What the executor itself costs: per action and per message, measured.

The layer costs engine.choose measures leave out the executor's own work:
the Python around each action (the loop, the trace's clock, posting and
matching messages) and a message's time from one rank's send to its
neighbour's receive (serialisation, the mesh's threads, the OS waking the
receiver). ``calibrate`` runs a dry pipeline, no-op stages handing on an
array of the activation's size, over the pp group and measures both: the
executor's fixed cost per compute action (each rank's step time outside its
receives, over its compute actions) and, given that, the message time that
makes the simulator's step of the dry run as long as the measured one.
engine.distribute adds them to the simulated costs (``overhead`` and
``send`` of engine.choose.candidates), so the prediction covers what a real
step pays besides its layers.

A third figure is the CPU of the mesh's own threads (the progress thread and
ZeroMQ's I/O thread) per message end (a send or a receive of this rank): a
real step's messages arrive while the main thread computes, so these threads
read them, and on a host with no spare core (as many ranks as cores, or
more) that CPU comes out of a computing rank. A second dry run, whose stages
keep the main thread busy (``_Spin``), measures it from
``/proc/self/task/*/schedstat``; ``helper`` is that figure where some host
of the job is crowded, else 0 (a spare core takes it).
"""
from __future__ import annotations

import contextlib
import functools
import gc
import os
import socket
import statistics
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

import collectives
from mesh import Comm, Grid

from .agree import _raised, _told
from .executor import Pipeline
from .ir import B, F, I, RECV_B, RECV_F, SEND_B, SEND_F, W, Schedule
from .layers import _Activation
from .schedules import one_f_one_b
from .simulate import simulate

__all__ = ["calibrate", "dry_run", "DryRun", "Calibration", "crowded",
           "shared_cores", "message_times", "step_record", "step_figures", "StepFigures",
           "collected", "hosts"]

_COMPUTE = (F, B, I, W)


@contextlib.contextmanager
def collected() -> Iterator[None]:
    """Python's garbage collector run once, then held off while a
    measurement runs, as timeit does; on again after if it was on. A full
    collection that fell inside one (a process that has just built and
    profiled a torch model holds a large heap: 135-267 ms a rank at eight
    ranks on two cores, every rank of a dp replica in the same dry step)
    made a dry step three to four times as long and Job.retime's
    prediction up to twice the steps (BENCHMARKS.md, eighteenth session)."""
    on = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if on:
            gc.enable()


def _buffer(nbytes: int, tensors: bool = False, dtype: Any = np.float64) -> Any:
    """A stand-in message or gradient of about ``nbytes``: zeros of
    ``dtype``, or float32 torch zeros where the job's stages are torch
    modules (its steps send tensors, which the executor and the mesh handle
    otherwise than arrays: BENCHMARKS.md, eighteenth session)."""
    if tensors:
        import torch
        return torch.zeros(max(1, nbytes // 4))
    return np.zeros(max(1, nbytes // np.dtype(dtype).itemsize), dtype)


class _Noop(_Activation):
    """A stage that computes nothing and hands on ``out`` forward and
    ``back`` (default ``out``) backward, its backward split or not (the
    split as any parameter-free layer's), with stand-in gradients of
    ``grads`` bytes each (float32; torch tensors with ``tensors``), which
    a dp axis averages as the step's."""

    def __init__(self, out: Any, back: Any = None, grads: Sequence[int] = (),
                 tensors: bool = False) -> None:
        self.out = out
        self.back = out if back is None else back
        self._grads = [_buffer(n, tensors, np.float32) for n in grads]

    def grads(self) -> list[Any]:
        return self._grads

    def forward(self, x: Any) -> tuple[Any, Any]:
        return self.out, None

    def backward(self, ctx: Any, gy: Any) -> Any:
        return self.back


class _Spin(_Noop):
    """A no-op stage that keeps its thread busy ``seconds`` of CPU per action
    (one figure, or one per kind: ``{"F": ..., "B": ..., "I": ..., "W":
    ...}``), with small matmuls (which let go of the GIL, as a real stage's
    do)."""

    def __init__(self, out: Any, seconds: float | Mapping[str, float], back: Any = None,
                 tp: tuple[Comm, Mapping[str, Sequence[int]]] | None = None,
                 grads: Sequence[int] = (), tensors: bool = False) -> None:
        super().__init__(out, back, grads, tensors)
        self.seconds = ({k: float(seconds) for k in "FBIW"} if isinstance(seconds, (int, float))
                        else dict(seconds))
        self._a = np.ones((64, 64))
        self.tp = tp[0] if tp else None     # tensor-parallel stages' collectives, per kind
        self.calls = {k: [np.zeros(max(1, n // 4), np.float32) for n in tp[1].get(k, ())]
                      for k in "FBIW"} if tp else {}

    def _spin(self, kind: str) -> None:
        """Burn the action's CPU; with ``tp``, in even parts between
        all-reduces of its collectives' sizes on the tp group (its peers run
        the same program), so they wait for each other as the step's do.
        The all-reduces' own CPU (a wait polls a while before it sleeps)
        counts toward the action's: the thread CPU the re-time measured
        held the real collectives' (a spin that burnt its figure besides
        ran 20-30% long: BENCHMARKS.md, seventeenth session)."""
        calls = self.calls.get(kind, [])
        part = self.seconds[kind] / (len(calls) + 1)
        start = time.thread_time()
        for i, buf in enumerate([*calls, None]):
            end = start + (i + 1) * part      # the collectives' own CPU counted in
            while time.thread_time() < end:
                self._a @ self._a
            if buf is not None:
                assert self.tp is not None
                collectives.all_reduce(self.tp, buf)

    def forward(self, x: Any) -> tuple[Any, Any]:
        self._spin("F")
        return self.out, None

    def backward(self, ctx: Any, gy: Any) -> Any:
        self._spin("B")
        return self.back

    def backward_input(self, ctx: Any, gy: Any) -> tuple[Any, Any]:
        self._spin("I")
        return self.back, None

    def backward_weight(self, wctx: Any) -> None:
        self._spin("W")


@dataclass(frozen=True)
class Calibration:
    """What engine.distribute adds to the layers' costs: the executor's
    seconds per compute action, each message's seconds of flight, the
    mesh threads' CPU seconds per message end charged to the computing rank
    (``helper_measured`` where a host is ``crowded``, else 0), and the
    seconds a receive takes when its message is due (``receive``)."""

    action: float
    message: float
    helper: float = 0.0
    helper_measured: float = 0.0
    crowded: bool = False
    receive: float = 0.0      # a receive's own time once its message is due (message_times)
    cores: float | None = None   # pp ranks that compute at once at full speed (shared_cores)
    load: float = 0.0            # others' processes on those cores, pp ranks' worth (fitted_load)


def _helpers() -> dict[int, int]:
    """CPU nanoseconds so far of each of this process's threads other than
    the calling one (Linux: /proc/self/task/*/schedstat; none elsewhere)."""
    me, out = threading.get_native_id(), dict[int, int]()
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return out
    for t in tasks:
        if int(t) == me:
            continue
        try:
            with open(f"/proc/self/task/{t}/schedstat") as f:
                out[int(t)] = int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return out


def _helper_since(before: dict[int, int]) -> float:
    """CPU seconds the threads other than the calling one have taken since
    ``before`` (``_helpers()`` then), each thread's own: a thread that ended
    meanwhile takes its CPU out of a total (a dp group's lane going idle:
    the difference of two totals came out negative, and with it a stage's
    cost)."""
    return sum(max(0, ns - before.get(t, 0)) for t, ns in _helpers().items()) / 1e9


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _here() -> tuple[str, int]:
    """This rank's host name and the cores this process may use."""
    return socket.gethostname(), _cores()


def hosts(world: Comm) -> list[tuple[str, int]]:
    """``_here()`` of every rank of ``world`` (collective), as ``crowded``
    and ``shared_cores`` take them."""
    return [(str(h), int(c)) for h, c in collectives.all_gather_object(world, _here())]


def crowded(hosts: list[tuple[str, int]]) -> bool:
    """Whether some host runs at least as many ranks as it has cores, given
    ``(host, cores)`` of every rank: then no core is spare for the mesh's
    threads."""
    ranks: dict[str, int] = {}
    for host, _ in hosts:
        ranks[host] = ranks.get(host, 0) + 1
    return any(ranks[host] >= cores for host, cores in hosts)


def shared_cores(hosts: list[tuple[str, int]], pp: int) -> float | None:
    """How many of a pipeline's ``pp`` ranks can compute at once at full
    speed, given ``(host, cores)`` of every rank of the job, when its ranks
    outnumber some host's cores (else None: each has one). Each simulated
    pp rank stands for the job's ranks that run its program (dp replicas,
    tp peers), which compute when it does: on a host with ``cores`` cores
    and ``ranks`` ranks, ``cores * pp / ranks`` pp ranks' worth (pp=2 x
    tp=2 on two cores: one; dp=2 x pp=2 x tp=2: a half)."""
    ranks: dict[str, int] = {}
    for host, _ in hosts:
        ranks[host] = ranks.get(host, 0) + 1
    least = min(cores * pp / ranks[host] for host, cores in hosts)
    return least if least < pp else None


def _messages(program: Any) -> int:
    """Message ends (sends and receives) of one rank's lowered program."""
    return sum(1 for a in program if a.kind in (SEND_F, SEND_B, RECV_F, RECV_B))


def _busy(events: list[list[Any]], wall: float) -> tuple[float, int]:
    """A rank's step time outside its receives and its compute actions (the
    executor's own), and its compute actions."""
    waits = sum(e[3] - e[2] for e in events if e[1] in (RECV_F, RECV_B, *_COMPUTE)) / 1e9
    return wall - waits, sum(1 for e in events if e[1] in _COMPUTE)


def calibrate(world: Comm, pp: Comm, m: int, nbytes: int, steps: int = 5,
              tag_base: int = 0, timeout: float | None = None, spin: float = 1e-3,
              busy_steps: int = 2, busy_nbytes: int | None = None,
              tensors: bool = False, grid: Grid | None = None,
              grads: Mapping[int, Sequence[int]] | None = None) -> Calibration:
    """The executor's own costs on ``pp`` (``dry_run`` of 1F1B over ``m``
    micro-batches, messages of ``nbytes``): seconds per compute action and
    per message; then the mesh threads' CPU per message end over
    ``busy_steps`` steps (after one more) of 1F1B over 2p micro-batches
    whose stages spin ``spin`` seconds of CPU per action (as long as the
    real actions: those threads' CPU grows with the time between messages,
    100, 229 and 391 us per message end at 0.3, 1 and 3 ms here, not only
    with their count), with messages of ``busy_nbytes`` (default
    ``nbytes``); ``tensors``, ``grid`` and ``grads``: as ``dry_run``'s
    (the first dry run's: with a dp axis, the step's end in ``action``).
    Collective over ``world`` (every pp group of it runs its own dry
    pipeline): every rank gets the same figures."""
    dry = dry_run(world, pp, one_f_one_b(pp.size, m), nbytes, steps, tag_base, timeout,
                  tensors=tensors, grid=grid, grads=grads)
    busy_m = 2 * pp.size       # the same tags as the dry run's first steps, all done by now
    failed: BaseException | None = None     # this rank's own, told where the ranks meet
    try:
        out = _buffer(nbytes if busy_nbytes is None else busy_nbytes, tensors)
        busy = Pipeline(pp, _Spin(out, spin), one_f_one_b(pp.size, busy_m),
                        loss_fn=lambda y, t: (0.0, y), timeout=timeout, tag_base=tag_base)
    except BaseException as e:
        failed = e
    dummy = np.zeros((busy_m, 1))
    _told(world, failed, timeout)       # (a barrier)
    try:        # (a step's failure: every rank's, told next)
        busy.step(dummy, dummy)
        _, h0 = _started(busy)
        for _ in range(busy_steps):
            busy.step(dummy, dummy)
        ends = _messages(busy.program) * busy_steps
        helper = _helper_since(h0) / ends if ends else 0.0
        mine = (helper, _here())
    except BaseException as e:
        failed = e
    _told(world, failed, timeout)
    helpers, hosts = [], []
    for h, host in collectives.all_gather_object(world, mine):
        helpers.append(h)
        hosts.append(tuple(host))
    try:
        measured, full = statistics.median(helpers), crowded(hosts)
        made = Calibration(dry.action, dry.message, measured if full else 0.0, measured, full,
                           dry.receive, shared_cores(hosts, pp.size))
    except BaseException as e:
        failed = e
    _told(world, failed, timeout)
    return made


@dataclass(frozen=True)
class DryRun:
    """What ``dry_run`` measured: the executor's seconds per compute action
    (outside the stages' own time), each message's seconds, and the mesh
    threads' CPU seconds per message end of a rank."""

    action: float
    message: float
    helper: float
    span: float = 0.0       # the median dry step, latest end less earliest start
    receive: float = 0.0    # a receive's own time when its message is due (message_times)
    simulated: float = 0.0  # the simulated dry step: its actions as they ran, these figures
    compute: dict[str, list[float]] | None = None   # each stage's action per kind, wall (StepFigures)


def dry_run(world: Comm, pp: Comm, sched: Schedule, nbytes: int | Sequence[tuple[int, int]],
            steps: int = 5, tag_base: int = 0, timeout: float | None = None,
            costs: Mapping[str, Sequence[float]] | None = None,
            tp: tuple[Comm, Mapping[tuple[int, str], Sequence[int]]] | None = None,
            grid: Grid | None = None, grads: Mapping[int, Sequence[int]] | None = None,
            tensors: bool = False, then: Callable[[DryRun], None] | None = None) -> DryRun:
    """The executor running ``sched`` on ``pp`` with stages that compute
    nothing, or, with ``costs`` (seconds per stage of each kind, as the
    simulator takes them), that keep the core busy that long per action
    (``_Spin``), so the messages come and go while the ranks compute, as in
    a real step; the medians of ``steps`` dry steps after one to warm up.
    ``action``: each rank's step time outside its compute actions and its
    receives, over its compute actions (the sends, the start and the end of
    a step, the executor's dispatch, spread over the compute actions);
    ``message``: the median, over the messages whose receive was waiting
    before the send started, of the send's start to the receive's end (the
    executor's trace clock, shared by the processes of a host), less
    ``action`` (the simulator starts a send after the compute action and
    its ``action``, which already carries the sender's share of the send), else
    (none waited) the message time at which the simulated dry step (its
    compute actions as long as they ran, plus ``action``) lasts as long as
    the measured one; ``helper``: the CPU of every thread but the main one
    per message end (engine.calibrate's module docstring). ``nbytes``:
    every message's size, or per stage the bytes it sends forward and
    backward (its output's and its input's). These depend on the schedule's
    mix of actions and messages, its micro-batch count and the actions'
    length: ``Job.retime`` measures them on the chosen schedule itself,
    with its own message sizes and its stages' times. ``tp``: ``(tp group,
    {(stage, kind): bytes of each collective of such an action})``, for
    tensor-parallel stages: each action (with ``costs``) makes collectives
    of those sizes on the tp group between parts of its CPU (``_Spin``).
    ``grid`` (the job's, with a dp axis) and ``grads`` (per stage of this
    rank, its gradients' bytes): the dry pipeline runs on the grid, its
    stages' stand-in gradients averaged over dp as the step's are, so
    ``action`` holds the step's end (the averages' waits, the loss's and
    the outcome's all-reduces) as it holds the rest of the executor's own.
    ``tensors``: messages and stand-in gradients are torch tensors, as a
    torch job's are (the executor's own time grows with them: a torch
    step's CPU outside its actions was 1.3-1.6 ms at pp=2 x tp=2 where the
    arrays' dry run's was 0.8-0.9). ``then``: the caller's own work on the
    figures (engine.measured_choice's ranking), done before the last word,
    so that its error (a KeyboardInterrupt) is told there too. Collective
    over ``world`` (every pp group of it runs its own); an error of any
    rank's part, a dry step's included, raises on every rank at once, the
    others DistributeFailed naming it (``_told``)."""
    sizes = ([(nbytes, nbytes)] * sched.num_stages if isinstance(nbytes, int)
             else list(nbytes))

    def stage(s: int) -> _Noop:
        out, back = (_buffer(n, tensors) for n in sizes[s])
        if costs is None:
            return _Noop(out, back, (grads or {}).get(s, ()), tensors)
        return _Spin(out, {k: float(costs[k][s]) if k in costs else 0.0 for k in "FBIW"}, back,
                     (tp[0], {k: tp[1].get((s, k), ()) for k in "FBIW"}) if tp else None,
                     (grads or {}).get(s, ()), tensors)

    m = sched.num_microbatches
    failed: BaseException | None = None     # this rank's own, told where the ranks meet
    try:
        pipe = Pipeline(pp if grid is None else grid,
                        [stage(s) for s in sched.stages_of(pp.rank)], sched,
                        loss_fn=lambda y, t: (0.0, y), timeout=timeout, tag_base=tag_base)
    except BaseException as e:
        failed = e
    dummy = np.zeros((m, 1))
    rows: list[Any] = []
    ran: list[list[tuple[Any, ...]]] = []
    helper, ends = 0.0, 0
    for i in range(steps + 1):
        _told(world, failed, timeout)       # (a barrier)
        t0, h0 = _started(pipe)
        try:        # (a step's failure, or one before it: every rank's, told next)
            pipe.step(dummy, dummy)
            t1 = time.time()
            if i:
                helper += _helper_since(h0)
                ends += _messages(pipe.program)
                row, acts = step_record(pipe, t0, t1)
                rows.append(row)
                ran.append(acts)
        except BaseException as e:
            failed = e
    _told(world, failed, timeout)
    gathered = collectives.all_gather_object(
        world, (pp.ranks, rows, ran, helper / ends if ends else 0.0, socket.gethostname()))
    try:
        mine = [(ranks, r, acts, host) for ranks, r, acts, _, host in gathered]
        fig = step_figures(sched, mine)
        made = DryRun(fig.action, fig.message, statistics.median(g[3] for g in gathered),
                      fig.span, fig.receive, fig.simulated, fig.compute)
        if then is not None:
            then(made)
    except BaseException as e:
        failed = e
    _told(world, failed, timeout)
    return made


def _started(pipe: Pipeline) -> tuple[float, dict[int, int]]:
    """A dry step's start (its clock, the mesh threads' CPU); an error here
    (a KeyboardInterrupt) fails the step on every rank at once, raised
    before it starts (``before_step``), as any error of a step does."""
    try:
        h0 = _helpers()
        return time.time(), h0
    except BaseException as e:
        pipe.before_step = functools.partial(_raised, e)
        return 0.0, {}


def step_record(pipe: Pipeline, t0: float, t1: float) -> tuple[tuple[Any, ...], list[Any]]:
    """One step's record on this rank, for ``step_figures``: ``(t0, t1,
    time outside compute and receives, compute actions)`` and each compute
    action's ``(stage, kind, seconds)`` and message end's ``(flow id, "s" or
    "f", start ns, end ns)``, from the pipeline's trace of its last step
    (``t0``, ``t1``: the step's start and end, ``time.time()``)."""
    row = (t0, t1, *_busy(pipe.events, t1 - t0))
    acts: list[Any] = [(a.stage, a.kind, (e[3] - e[2]) / 1e9)
                       for a, e in zip(pipe.program, pipe.events) if a.kind in _COMPUTE]
    acts += [(e[5], e[4], e[2], e[3]) for e in pipe.events if e[4]]
    return row, acts


@dataclass(frozen=True)
class StepFigures:
    """The simulator's figures as steps ran them (``step_figures``): the
    executor's seconds per compute action, per message and per due receive,
    each stage's compute action of each kind (``{"F": [stage 0, ...],
    ...}``, 0 where it ran none: per step the mean of its actions, since a
    step pays their sum, then the median over the steps), the median step
    (latest end less earliest start) and the step the simulator gives from
    these figures. The mean, not the median action: an action preempted
    now and then (the mesh threads reading a message, others' load) costs
    its step all of that time, and the actions' walls are skewed (at load
    3-7 here, mean over median action 1.11 in the median over 90 stages
    and kinds, 0.99-1.31 in 8 of 10, up to 1.94; the bench's steps simulated
    from their own figures, 36 rows of 9 runs: meas/sim median 1.12 with
    the median action, 14 rows within 1.1x; median 1.00 and 31 within
    1.1x with this: BENCHMARKS.md, eleventh session)."""

    action: float
    message: float
    receive: float
    compute: dict[str, list[float]]
    span: float
    simulated: float


def step_figures(sched: Schedule, records: Sequence[tuple[Any, Sequence[Any], Sequence[Any], str]]
                 ) -> StepFigures:
    """The figures of steps of ``sched`` (a dry run's or real ones), from
    every rank's ``(pp ranks, rows, actions, host)``: its ``step_record``s,
    step by step (dry_run's docstring says how each figure is taken)."""
    groups: dict[tuple[int, ...], list[Any]] = {}
    took: dict[tuple[int, str, int], list[float]] = {}
    ends_of: dict[tuple[Any, ...], list[int]] = {}
    hosts: dict[tuple[int, ...], set[str]] = {}
    for ranks, mine, acts, host in records:
        groups.setdefault(tuple(ranks), []).append(mine)
        hosts.setdefault(tuple(ranks), set()).add(host)
        for n, step in enumerate(acts):
            for st, kind, *rest in step:
                if len(rest) == 1:
                    took.setdefault((int(st), str(kind), n), []).append(rest[0])
                else:          # a message end: (flow id, "s" or "f", start, end)
                    ends_of.setdefault((tuple(ranks), n, st, kind), rest)
    pairs = [(t0 / 1e9, ends_of[(g, n, fid, "f")][0] / 1e9, ends_of[(g, n, fid, "f")][1] / 1e9)
             for (g, n, fid, d), (t0, _) in ends_of.items()
             if d == "s" and (g, n, fid, "f") in ends_of and len(hosts[g]) == 1]  # one clock
    per_action, spans = [], []
    for members in groups.values():
        for s in range(min(len(r) for r in members)):
            busy = sum(r[s][2] for r in members)
            count = sum(r[s][3] for r in members)
            per_action.append(busy / max(1, count))
            spans.append(max(r[s][1] for r in members) - min(r[s][0] for r in members))
    action, span = statistics.median(per_action), statistics.median(spans)
    compute = {k: [0.0] * sched.num_stages for k in "FBIW"}
    for s, k in {(s, k) for s, k, _ in took}:
        compute[k][s] = statistics.median(statistics.fmean(v) for (t, j, _), v in took.items()
                                          if (t, j) == (s, k))
    base = {k: [action + compute[k][s] if compute[k][s] else 0.0
                for s in range(sched.num_stages)] for k in "FBIW"}
    timed = message_times(pairs, action)
    message, receive = timed if timed is not None else (_message_time(sched, base, span), 0.0)
    fit = simulate(sched, {**base, "send": message, "recv": receive}).makespan
    return StepFigures(action, message, receive, compute, span, fit)


def message_times(pairs: Sequence[tuple[float, float, float]], action: float
                  ) -> tuple[float, float] | None:
    """The simulator's message and receive times from measured messages
    (``(send start, receive start, receive end)`` each, one clock), or None
    when no receive was waiting before its send started. ``message``: the
    median, over those receives, of the send's start to the receive's end,
    less ``action`` (the simulator starts a send after its compute action
    and ``action``, which carries the send call). ``receive``: the mean
    time spent in the receives that began once their message was due by
    that figure (the send's start plus the median flight), which the
    simulator would end at once: a large message sent while its receiver
    computes is not all read by then (the receiver's mesh threads wait for
    a core, or for the GIL), and its receive pays the rest (quiet ZB-V(2,2)
    steps: mostly 0.01-0.5 ms, a few 2-3 ms). The mean, since a step pays
    the sum over its receives."""
    flights = [end - sent for sent, began, end in pairs if began <= sent]
    if not flights:
        return None
    flight = statistics.median(flights)
    late = [end - began for sent, began, end in pairs if began >= sent + flight]
    return max(0.0, flight - action), (statistics.fmean(late) if late else 0.0)


def _message_time(sched: Any, base: float | Mapping[str, Any], span: float) -> float:
    """The message time at which the simulated dry step lasts ``span``
    (0 when the actions alone make it that long), every compute action
    costing ``base`` (one figure, or the simulator's per-kind costs): by
    bisection, the simulated step growing with the message time."""
    costs: dict[str, Any] = ({k: base for k in "FBIW"} if isinstance(base, (int, float))
                             else dict(base))

    def predicted(send: float) -> float:
        return simulate(sched, {**costs, "send": send}).makespan

    if sched.num_ranks == 1 or predicted(0.0) >= span:
        return 0.0
    lo, hi = 0.0, span
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if predicted(mid) < span else (lo, mid)
    return (lo + hi) / 2
