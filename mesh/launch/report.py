"""The root-cause report: from how each rank ended and the error records they
wrote, which rank failed first and why, and the exit code meshrun ends with."""
from __future__ import annotations

import re
import signal
import socket
import time
from typing import Any

from .. import errors
from .records import JobOutcome, WorkerExit, signal_name, where_text

__all__ = ["format_report", "exit_code", "cause", "lost_nodes"]

_TIMEOUT_EXIT = 124
_DUMPED = {signal.SIGSEGV, signal.SIGFPE, signal.SIGABRT, signal.SIGBUS, signal.SIGILL}
"""The signals whose Python stacks the bootstrap's faulthandler writes on the rank's stderr."""
_RULE = "=" * 72


def _stamp(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) + f".{int(t * 1000) % 1000:03d}"


def _no_traceback(e: WorkerExit, program: bool = False) -> str:
    if e.returncode is None:
        return "no traceback: the process could not be reaped"
    if e.returncode < 0 and -e.returncode in _DUMPED and not program:
        return (f"no traceback: killed by {signal_name(-e.returncode)} (its threads' Python "
                f"stacks are in its stderr: \"Fatal Python error\")")
    if e.returncode < 0:
        return f"no traceback: killed by {signal_name(-e.returncode)}"
    if program:         # (--no-python: a program of the user's, whose own output says why)
        return f"no traceback: the program exited with code {e.returncode}"
    return (f"no traceback: exited with code {e.returncode} without an uncaught Python "
            f"exception (os._exit, or a crash in native code)")


def _secondary(rec: dict[str, Any] | None) -> bool:
    """Whether an error record is a consequence of another rank's failure (a
    lost peer, an abort relayed from the rank that failed), as mesh.spawn
    tells them: its rank may well exit before the one that failed first."""
    if not rec:
        return False
    kind, said = rec.get("exc_type"), str(rec.get("message", ""))
    return kind == "LostPeerError" or bool(rec.get("from_abort")) or (
        kind in errors.__all__ and " aborted: " in said) or (
        # torch's DDP reducer rethrows a lost peer as RuntimeError("... LostPeerError: ...")
        kind == "RuntimeError" and "LostPeerError: " in said) or (
        # gloo's (a torch script on backend "gloo" under meshrun) for a peer gone
        kind == "RuntimeError" and "gloo/transport/" in said and any(
            w in said for w in _GLOO_GONE))


_GLOO_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")
"""How gloo's tcp transport says a peer's process went away (its pair.cc: ``Connection
closed by peer [ADDR]``, ``Read error [ADDR]: Connection reset by peer``, a write's ``Broken
pipe``), naming no rank: a consequence, not a root cause, that a rank's error record may
carry before meshrun has reaped the rank that died."""


def _failed_itself(e: WorkerExit, outcome: JobOutcome,
                   records: dict[int, dict[str, Any]]) -> bool:
    """Whether rank e's failure is its own: it ended before meshrun stopped
    the job, or after, but with an error of its own recorded before meshrun
    signalled it (a rank slow to end after its error, its mesh closing, that
    another node's word stopped meanwhile: its peers there lost it at once)."""
    if not e.failed or not e.after_stop:
        return e.failed
    rec = records.get(e.rank)
    return (outcome.stop_time is not None and rec is not None and not _secondary(rec)
            and float(rec.get("time", outcome.stop_time)) < outcome.stop_time)


def _exiting(e: WorkerExit, outcome: JobOutcome, rec: dict[str, Any] | None) -> bool:
    """Whether rank e, killed by meshrun's stop, had already recorded its
    uncaught error (its own or a lost peer's) and was only slow to exit (its
    exit handlers, torch's and its libraries' teardown): it did not run on."""
    return (e.after_stop and e.returncode is not None and e.returncode < 0
            and rec is not None and outcome.stop_time is not None
            and float(rec.get("time", outcome.stop_time)) < outcome.stop_time)


def _meant(e: WorkerExit, outcome: JobOutcome, records: dict[int, dict[str, Any]]) -> int | None:
    """The exit code a failed rank recorded it was ending with (its error
    record's, written before meshrun's stop) where that stop then killed it
    as it still exited (its mesh closing, its exit handlers: torch's teardown,
    an ``atexit`` that takes its time; stopped by another node's word): that
    code, not the signal's 128+N, is its failure's, and its error, its own
    or a consequence, not the stop, why it ended; None where it ended as
    meant, or failed only once stopped."""
    rec = records.get(e.rank)
    code = rec.get("exit_code") if rec else None
    return code if type(code) is int and code > 0 and _exiting(e, outcome, rec) else None


_RELAYED = re.compile(r" aborted: rank (\d+) of group (.+?)"
                      r"(?: \(world rank (\d+)[^()]*\)| \(on host [^()]*\))?: ")
"""How an abort a member sent stands in a rank's error (mesh.inbox's
``abort_error`` text, the member named as mesh.inbox's ``_ABORTED_BY`` reads
it, with its host where ``relayed`` added it: its world rank said in a group
other than the world)."""


def _relayed(rank: int, rec: dict[str, Any] | None) -> bool:
    """Whether rank's error is another rank's failure passed on to it (an
    abort a member sent, ``rank 1 of group world: ...`` after its first
    ``aborted: ``; an engine error in its own words, ``engine.distribute
    failed on rank 1: ...``), not a lost peer it saw itself, which the rank
    it learnt of the loss from had first hand (a phase of its own call
    aborted for a peer lost here says ``aborted: peer world rank 2 is
    gone``: its own loss)."""
    if not rec or not _secondary(rec):
        return False
    said = str(rec.get("message", ""))
    at = said.find(" aborted: ")
    found = _RELAYED.match(said, at) if at >= 0 else None
    if found is not None:
        world = found.group(3) or (found.group(1) if found.group(2) == "world" else None)
        if world is None or int(world) != rank:
            return True
    return bool(rec.get("from_abort")) and rec.get("exc_type") != "LostPeerError"


def _root_cause(outcome: JobOutcome, records: dict[int, dict[str, Any]]) -> WorkerExit | None:
    """The rank that failed first: an error of its own before a consequence
    of another's (``_secondary``), and of those a lost peer seen first hand
    before an abort another rank relayed (``_relayed``: where a link is cut,
    the rank told of the loss often raises before the one that saw it, its
    record the earlier); then by the time each rank recorded its error."""
    own = [e for e in outcome.exits if _failed_itself(e, outcome, records)]
    return min(own, key=lambda e: (_secondary(records.get(e.rank)),
                                   _relayed(e.rank, records.get(e.rank)),
                                   records.get(e.rank, {}).get("time", e.time), e.rank),
               default=None)


def _peer(rec: dict[str, Any] | None) -> int | None:
    """The lost peer's world rank a consequence's error record names: its
    LostPeerError's, or where torch's DDP rethrew that as a RuntimeError (no
    peer kept), the one its text names; None for an error of its own."""
    if not rec or not _secondary(rec):
        return None
    peer = rec.get("peer")
    if isinstance(peer, int):
        return peer
    found = next((m for m in map(lambda p: p.search(str(rec.get("message"))), _GONE) if m),
                 None)
    return int(found.group(1)) if found else None


def _left_early(outcome: JobOutcome, root_rec: dict[str, Any] | None) -> WorkerExit | None:
    """The rank whose clean exit the root cause's error tells of (a lost
    peer that closed its mesh and finished), if any: the job's real cause."""
    peer = _peer(root_rec)
    return next((e for e in outcome.exits if e.rank == peer and e.returncode == 0
                 and not e.after_stop), None)


_GONE = [re.compile(p) for p in (r"peer (?:world )?rank (\d+)(?: \([^()]*\))? is gone",
                                 r"\(world rank (\d+)\) \(no such process\)",
                                 r"of rank (\d+) \(no such process\)")]
"""Where a lost peer's world rank stands in an error's text."""


def _lost_elsewhere(outcome: JobOutcome, root_rec: dict[str, Any] | None) -> int | None:
    """The lost peer the root cause's error names when it is no rank of this
    node (a node that died, or was cut off): the job's real cause."""
    peer = _peer(root_rec)
    if peer is None or any(e.rank == peer for e in outcome.exits):
        return None
    return peer


_WHY = "meshrun reports why, unless it is gone too"
_TELLS = f"its node's {_WHY}"
"""(Where no word says that meshrun is gone: a plain job across nodes has no link
between the meshruns, and a rank lost there reads the same whether its meshrun
was killed or reports the rank's failure.)"""
_OF_NODE = re.compile(r"rank \d+ of node (\d+) was lost")
"""Where the node of a rank of another node lost stands in ``JobOutcome.lost``
(mesh.inbox's note to this node's meshrun)."""


def lost_nodes(outcome: JobOutcome, records: dict[int, dict[str, Any]],
               nproc: int) -> list[int]:
    """The other nodes whose lost ranks the report names as the job's cause
    (whose meshruns, where gone, report nothing: ``format_report``'s ``gone``)."""
    found = _OF_NODE.match(outcome.lost) if outcome.reason == "lost" else None
    nodes = [int(found.group(1))] if found and not outcome.told else []
    root = _root_cause(outcome, records)
    peer = _lost_elsewhere(outcome, records.get(root.rank)) if root is not None else None
    return nodes + ([peer // nproc] if peer is not None else [])


def _lost_stopped(outcome: JobOutcome, root_rec: dict[str, Any] | None) -> WorkerExit | None:
    """The lost peer the root cause's error names when it is a rank of this
    node that never ended by itself (stopped, or silent until its peers gave
    it up) and that meshrun then stopped: the job's real cause."""
    peer = _peer(root_rec)
    return next((e for e in outcome.exits if e.rank == peer and e.after_stop
                 and e.returncode != 0), None)


def _exit(e: WorkerExit, outcome: JobOutcome, records: dict[int, dict[str, Any]],
          short: bool = False) -> str:
    """'exit code 3', 'killed by SIGTERM': how rank e ended, as it meant to
    where meshrun's stop killed it as it exited (``_meant``; ``short``: the
    code alone, as another node's meshrun says it)."""
    meant = _meant(e, outcome, records)
    if meant is None:
        return e.describe()
    return f"exit code {meant}" + ("" if short else f" (as it recorded; {e.describe()} by "
                                                    f"meshrun's stop as it was exiting)")


def _error(rec: dict[str, Any], msg: str) -> str:
    """'ValueError: boom'; 'KeyboardInterrupt' for an error that says nothing."""
    return f"{rec.get('exc_type')}: {msg}" if msg else str(rec.get("exc_type"))


def _as_root(msg: str, root_msg: str, root_rank: int) -> str:
    """msg with its last part elided when the root cause's message ends the
    same way (the same mismatch seen from another rank)."""
    head, _, last = msg.rpartition(": ")
    if head and len(last) >= 30 and root_msg.endswith(": " + last):
        return f"{head}: ... (as rank {root_rank})"
    return msg


def _where(e: WorkerExit, outcome: JobOutcome, wheres: dict[int, dict[str, Any]]) -> str:
    """What rank e, asked as meshrun stopped the job, said of where it was
    ('' where it was not asked, or ended without being killed)."""
    if e.rank not in outcome.asked or not e.after_stop or e.returncode == 0:
        return ""
    if e.rank in wheres:
        return where_text(wheres[e.rank])
    return "it gave no word of where it was (busy in native code?)"


def format_report(outcome: JobOutcome, records: dict[int, dict[str, Any]], nproc: int,
                  timeout: float | None = None, program: bool = False,
                  gone: dict[int, str] | None = None,
                  wheres: dict[int, dict[str, Any]] | None = None,
                  hosts: dict[int, tuple[str, int]] | None = None,
                  tails: dict[int, str] | None = None) -> str:
    """The root-cause table: why the job stopped, the first failing rank's
    error, exit and traceback, then one line for every other rank (program:
    the ranks run a program of the user's, --no-python, not Python; ``gone``:
    how the meshrun of a node of ``lost_nodes`` is gone, which says nothing
    of its ranks, by node; ``wheres``: what the ranks meshrun stopped said
    of where they were, by rank: each rank's line says it; ``hosts``: where
    each rank of a job across hosts is, (host, pid) by rank, as its ranks
    said (mesh.rendezvous.read_hosts): a rank is named by its own host, not this
    meshrun's host name, which hosts of one name share); ``tails``: the last
    lines of each rank's stderr that the console did not show
    (--local-ranks-filter, --redirects), by rank: a root cause without a
    traceback (a crash, a program's own message) said why there alone)."""
    gone = gone or {}
    tails = tails or {}
    wheres = wheres or {}
    hosts = hosts or {}
    root = _root_cause(outcome, records)
    lines = [_RULE]
    if outcome.reason == "timeout":
        lines.append(f"meshrun: job timed out after {timeout:g} s; stopped every rank")
    elif outcome.reason == "signal":
        lines.append(f"meshrun: stopped by {signal_name(outcome.signum or 0)}")
    elif outcome.reason == "lost" and outcome.told:     # (another node's meshrun's word)
        lines.append(f"meshrun: {outcome.lost}; stopped every rank here")
    elif outcome.reason == "lost":
        found = _OF_NODE.match(outcome.lost)
        there = gone.get(int(found.group(1))) if found else None
        lines.append(f"meshrun: {outcome.lost}; {there or _TELLS}; stopped every rank here")
    root_rec = records.get(root.rank) if root is not None else None
    left = _left_early(outcome, root_rec)
    elsewhere = _lost_elsewhere(outcome, root_rec)
    stopped = _lost_stopped(outcome, root_rec)
    if root is not None and elsewhere is not None:
        there = gone.get(elsewhere // nproc)
        host, pid = hosts.get(elsewhere, ("", 0))
        at = f", on host {host}" + (f", pid {pid}" if pid else "") if host else ""
        lines.append(f"Root cause: rank {elsewhere} (node {elsewhere // nproc}{at}) was lost, a "
                     f"rank of another node ({there or 'its ' + _WHY}); rank "
                     f"{root.rank} here reported it first:")
    elif root is not None and stopped is not None:
        lines.append(f"Root cause: rank {stopped.rank} was lost (the error below says how) "
                     f"and then stopped by meshrun ({stopped.describe()}); rank {root.rank} "
                     f"reported it first:")
    elif root is not None:
        lines.append(f"Root cause: rank {root.rank} failed first" if left is None else
                     f"Root cause: rank {left.rank} finished ({left.describe()}) while rank "
                     f"{root.rank} still waited for it ("
                     + ("it never joined the mesh" if "before the mesh was complete"
                        in str(root_rec and root_rec.get("message")) else
                        "the ranks did not make the same calls")
                     + f"); rank {root.rank} failed first:")
    if root is not None:
        if root_rec:
            lines.append(f"  error      : {_error(root_rec, str(root_rec.get('message')))}")
        # (this meshrun's ranks' host, as torchrun's says it; as errors name it across hosts)
        host = hosts[root.rank][0] if root.rank in hosts else socket.gethostname()
        lines += [f"  rank       : {root.rank} (node {root.rank // nproc}, local rank "
                  f"{root.local_rank}, pid {root.pid}, host {host})",
                  f"  exit       : {_exit(root, outcome, records)}",
                  f"  time       : {_stamp(root_rec['time'] if root_rec else root.time)}"]
        if _where(root, outcome, wheres):
            lines.append(f"  stopped in : {_where(root, outcome, wheres)}")
        if root_rec and root_rec.get("file"):        # (--log-dir: torchrun's error_file)
            lines.append(f"  error file : {root_rec['file']}")
        if root_rec:
            tb = root_rec.get("brief") or root_rec.get("traceback", "")
            lines.append("  traceback  :")
            lines += ["    " + ln for ln in str(tb).rstrip().splitlines()]
        else:
            lines.append(f"  traceback  : {_no_traceback(root, program)}")
            if tails.get(root.rank):
                lines.append("  stderr     : its last lines (the console did not show them):")
                lines += [("    " + ln).rstrip() for ln in tails[root.rank].splitlines()]
    others = [e for e in sorted(outcome.exits, key=lambda e: e.rank) if e is not root]
    if others:
        lines.append("Other ranks:" if root is not None else "Ranks:")  # (no first one)
    for e in others:
        rec = records.get(e.rank)
        meant = _meant(e, outcome, records)
        if not e.after_stop or meant is not None:
            how = ("failed, a consequence" if _secondary(rec) else
                   "failed on its own") if e.failed else "finished"
        elif _exiting(e, outcome, records.get(e.rank)):
            how = "stopped by meshrun as it exited after its error"
        else:
            how = "stopped by meshrun" if e.returncode != 0 else "finished while stopping"
        if meant is not None:
            how += f"; {e.describe()} by meshrun's stop as it was exiting"
        err = ""
        if rec and e.failed:
            msg = str(rec.get("message")).split("\n", 1)[0]
            if root is not None and root_rec:
                msg = _as_root(msg, str(root_rec.get("message")), root.rank)
            err = f"; {_error(rec, msg)}"
        where = _where(e, outcome, wheres)
        ended = e.describe() if meant is None else f"exit code {meant}"
        lines.append(f"  rank {e.rank:<4} {ended} ({how}){err}"
                     + (f"\n{'':12}{where}" if where else ""))
    lines.append(_RULE)
    return "\n".join(lines) + "\n"


def exit_code(outcome: JobOutcome, records: dict[int, dict[str, Any]]) -> int:
    """meshrun's exit code: the root cause's (128+N for signal N), 124 for a
    timeout, 128+N when meshrun was stopped by signal N."""
    root = _root_cause(outcome, records)
    if outcome.reason == "timeout":
        return _TIMEOUT_EXIT
    if outcome.reason == "signal":
        return 128 + (outcome.signum or 0)
    if root is None or root.returncode is None:
        return 0 if outcome.reason == "ok" else 1
    meant = _meant(root, outcome, records)
    if meant is not None:
        return meant
    return root.returncode if root.returncode > 0 else 128 - root.returncode


def cause(outcome: JobOutcome, records: dict[int, dict[str, Any]],
          timeout: float | None = None) -> tuple[str, bool]:
    """Why the ranks here ended as they did, in a line the other nodes'
    meshruns print: the root cause, or what stopped them ('' for a success);
    and whether that is of this node's own (not a peer lost elsewhere)."""
    if outcome.reason == "timeout":
        return f"the job timed out after {timeout:g} s (--timeout)", True
    if outcome.reason == "signal":
        return f"its meshrun was stopped by {signal_name(outcome.signum or 0)}", True
    root = _root_cause(outcome, records)
    if root is None:
        return outcome.lost, False
    rec = records.get(root.rank)
    said = f": {_error(rec, str(rec.get('message')).split(chr(10), 1)[0][:300])}" if rec else ""
    stopped = _lost_stopped(outcome, rec)
    if stopped is not None:     # (a rank here that never ended: this node's own cause)
        return (f"rank {stopped.rank} was lost and then stopped by meshrun "
                f"({stopped.describe()}); rank {root.rank} reported it{said}", True)
    return (f"rank {root.rank} failed ({_exit(root, outcome, records, short=True)}){said}",
            not _secondary(rec))
