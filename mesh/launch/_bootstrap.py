"""Worker bootstrap: what meshrun runs in every worker process.

    python .../mesh/launch/_bootstrap.py script.py args...
    python .../mesh/launch/_bootstrap.py -m package.module args...
    python .../mesh/launch/_bootstrap.py --exec program args...

It first arms the parent-death signal (SIGKILL when the launcher dies) and
checks that the launcher is still there, then runs the user's program as
``__main__`` with ``sys.argv`` and ``sys.path[0]`` as plain ``python`` would
set them. A crash in native code dumps every thread's Python stack on stderr
(faulthandler). An uncaught exception is printed as usual (without the bootstrap's
own frames) and also written as a JSON record to ``MESH_ERROR_FILE``, so the
launcher can show the rank's own traceback with no decorator in user code.
When that record is written, stderr gets only the error's last line: the
launcher prints the root cause's traceback once, in its report, and a single
line for every other rank (``--log-dir`` keeps every traceback whole). The
error is also left in ``sys.last_value``, as the interpreter leaves one, so
that a mesh the program left open is closed at exit as failed.

It is run as a file, not with ``-m mesh.launch._bootstrap``, and imports
only the standard library: the signal is armed before anything slow is
imported, and the user's program sees neither the mesh package nor its
import errors unless it imports mesh itself.
"""
from __future__ import annotations

import faulthandler
import json
import os
import runpy
import signal
import socket
import sys
import threading
import time
import traceback
from types import FrameType, TracebackType
from typing import Any

__all__ = ["arm_parent_death_signal", "write_error_record", "brief_traceback", "record_first",
           "SAY_WHERE", "where_file", "where", "say_where", "DUMP_STACK", "stack_file",
           "dump_stack", "main"]

_PR_SET_PDEATHSIG = 1
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_OWN = tuple(os.path.join(_ROOT, pkg) + os.sep for pkg in ("mesh", "collectives", "engine"))


def arm_parent_death_signal(parent_pid: int | None) -> None:
    """Have the kernel SIGKILL this process when its parent dies (Linux), and
    die now if the parent is already gone (it may have died before the prctl).
    Elsewhere the launcher's watchdog is the only guard."""
    if sys.platform.startswith("linux"):
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if parent_pid is not None and os.getppid() != parent_pid:
        os.kill(os.getpid(), signal.SIGKILL)


def _user_frames(tb: TracebackType | None) -> TracebackType | None:
    """Drop the leading bootstrap and runpy frames from a traceback."""
    hidden = (globals(), vars(runpy))
    while tb is not None and any(tb.tb_frame.f_globals is g for g in hidden):
        tb = tb.tb_next
    return tb


def brief_traceback(exc: BaseException, tb: TracebackType | None,
                    whole: str = "meshrun --log-dir keeps the whole traceback") -> str:
    """The traceback without its last frames inside meshrun's own packages
    (mesh, collectives, engine), below the user's last call; a line says how
    many are left out (and, ``whole``, where the whole one is). Whole when
    no user frame would remain. An exception it was raised while handling
    (or from) that was raised and handled inside those packages alone (a
    closed link's own exception, turned into the LostPeerError the user
    sees) is left out with them: it says nothing of the user's code."""
    te = traceback.TracebackException(type(exc), exc, tb)
    frames = list(te.stack)
    keep = len(frames)
    while keep > 0 and frames[keep - 1].filename.startswith(_OWN):
        keep -= 1
    text = "".join(te.format())
    if keep == 0 or keep == len(frames):
        return text
    te.stack = traceback.StackSummary.from_list(frames[:keep])
    if _own_only(_chained(te)):
        te.__cause__ = te.__context__ = None
    text, tail = "".join(te.format()), "".join(te.format_exception_only())
    note = (f"  ... {len(frames) - keep} frames inside mesh/collectives/engine left out "
            f"({whole})\n")
    return text[:len(text) - len(tail)] + note + tail


def _chained(te: traceback.TracebackException) -> traceback.TracebackException | None:
    """The exception ``te`` shows before its own (its cause, or the one it
    was raised while handling), if any."""
    return te.__cause__ if te.__cause__ is not None else \
        None if te.__suppress_context__ else te.__context__


def _own_only(te: traceback.TracebackException | None) -> bool:
    """Whether ``te`` and every exception chained before it were raised in
    meshrun's own packages alone (False for none)."""
    if te is None:
        return False
    while te is not None:
        if not te.stack or any(not f.filename.startswith(_OWN) for f in te.stack):
            return False
        te = _chained(te)
    return True


def write_error_record(path: str, exc: BaseException, tb_text: str,
                       brief: str | None = None, code: int | None = None) -> None:
    """Write {rank, exc_type, from_abort, peer, message, traceback, brief,
    time, pid, host, exit_code} atomically: the launcher never reads half a
    record, even if this process is killed. ``brief`` is the traceback to
    show (``tb_text`` by default); ``from_abort``: the error tells of another
    rank's failure (mesh.inbox.abort_error, engine.StepFailed); ``code``: the
    exit code the process is about to end with (what meshrun reports where
    its own stop then killed the process as it was still exiting). An
    error recorded before (``record_first``) keeps its first time."""
    first = getattr(exc, _RECORDED, None)
    record = {
        "rank": int(os.environ.get("RANK", "-1")),
        "exc_type": type(exc).__qualname__,
        "from_abort": bool(getattr(exc, "from_abort", False)),
        "peer": getattr(exc, "peer", None),     # a LostPeerError's lost rank
        "message": str(exc),
        "traceback": tb_text,
        "brief": tb_text if brief is None else brief,
        "time": first if type(first) is float else time.time(),
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "exit_code": code,
    }
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(record, f)
    os.replace(tmp, path)
    try:
        setattr(exc, _RECORDED, record["time"])
    except AttributeError:      # (an exception type with __slots__)
        pass


_RECORDED = "_meshrun_recorded_at"
"""The attribute that holds when an error's record was first written."""


def _record(path: str, exc: BaseException, code: int) -> None:
    """``exc``'s record, its traceback without the bootstrap's frames."""
    tb = _user_frames(exc.__traceback__)
    text = "".join(traceback.format_exception(type(exc), exc, tb))
    write_error_record(path, exc, text, brief_traceback(exc, tb), code)


def _code(exc: BaseException) -> int:
    """The status the bootstrap ends with on ``exc``."""
    if isinstance(exc, SystemExit):
        return _exit_code(exc.code)
    return 130 if isinstance(exc, KeyboardInterrupt) else 1


def record_first(exc: BaseException) -> None:
    """Record ``exc``, the error a mesh closes on, before its goodbye tells
    the peers: they fail at once, and meshrun stops this rank as soon as
    they end (another node's word at once, here after --settle), where the
    error still had its way to go to ``main`` (out of ``with mesh.init()``,
    through the program's own handlers), and the rank's own error went
    unrecorded, its peers' lost-peer errors the root cause. Only in the
    process the bootstrap runs (not a child of the program's); ``main``
    records it again, its traceback whole, with this first time."""
    path = os.environ.get("MESH_ERROR_FILE")
    if path and os.environ.get("MESH_BOOTSTRAP_PID") == str(os.getpid()):
        try:
            _record(path, exc, _code(exc))
        except OSError:
            pass        # (main says why, if it fails again)


SAY_WHERE = signal.SIGRTMAX - 7 if hasattr(signal, "SIGRTMAX") else 0
"""The signal meshrun (and mesh.spawn) sends a rank it is about to stop,
asking where it is (``say_where``): a real-time one, which no program
catches (0: the platform has none; nobody is asked)."""
_FRAMES = 6     # the frames of a rank's stack that ``where`` keeps
_LIB = tuple({os.path.join(p, "") for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)})
"""Where the standard library and installed packages are (a frame in one: ``lib``)."""


def where_file(error_file: str) -> str:
    """Where a rank says where it was (``say_where``): beside its error
    record, ``rank<R>.where.json`` for ``rank<R>.error.json``."""
    if error_file.endswith("error.json"):
        return error_file[:-len("error.json")] + "where.json"
    return error_file + ".where.json"


def where(frame: FrameType | None) -> dict[str, Any]:
    """Where this rank is: the mesh calls it waits in (``mesh.transport.waits``:
    each one's description and seconds), the pipeline step's action it runs
    (engine), and its main thread's innermost frames from ``frame`` on, each
    [file, line, function, own, lib], innermost first (the bootstrap's and
    runpy's left out; a run of frames inside mesh, collectives or engine,
    ``own``, only by its outermost: the call the program made; ``lib``: in
    the standard library or an installed package)."""
    transport = sys.modules.get("mesh.transport")
    calls = [[what, round(waited, 3)] for what, waited in transport.waits()] \
        if transport is not None else []
    hidden = (globals(), vars(runpy))
    frames: list[list[Any]] = []
    step = None
    while frame is not None and len(frames) < _FRAMES:
        code = frame.f_code
        own = code.co_filename.startswith(_OWN)
        if own and code.co_name == "_drive" and code.co_filename.endswith("executor.py"):
            got = frame.f_locals      # (engine.Pipeline's step: its program, the action at)
            if "a" in got and "st" in got:
                step = f"action {got['a']} ({got.get('at', 0) + 1} of {len(got['st'].program)})"
        if not any(frame.f_globals is g for g in hidden):
            this = [code.co_filename, frame.f_lineno, code.co_name, own,
                    not own and code.co_filename.startswith(_LIB)]
            if own and frames and frames[-1][3]:
                frames[-1] = this
            else:
                frames.append(this)
        frame = frame.f_back
    return {"rank": int(os.environ.get("RANK", "-1")), "pid": os.getpid(), "time": time.time(),
            "calls": calls, "step": step, "stack": frames}


def say_where(path: str) -> None:
    """Have this process write ``where`` (JSON, atomically) to ``path`` when
    sent ``SAY_WHERE``: meshrun asks it as it stops the job, and reports it.
    The handler runs in the main thread, between two of its bytecodes: a
    rank wedged in native code says nothing (meshrun waits a bounded time,
    then has faulthandler dump its stack: ``dump_stack``)."""
    if not SAY_WHERE:
        return
    me = os.getpid()

    def said(signum: int, frame: FrameType | None) -> None:
        if os.getpid() != me:       # (a child the program forked: not the rank)
            return
        try:
            tmp = f"{path}.{me}.tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(where(frame), f, default=str)
            os.replace(tmp, path)
        except Exception:     # (never an error of the program's)
            pass
    signal.signal(SAY_WHERE, said)


DUMP_STACK = signal.SIGRTMAX - 8 \
    if hasattr(signal, "SIGRTMAX") and hasattr(faulthandler, "register") else 0
"""The signal meshrun sends a rank that gave no word of where it was
(``SAY_WHERE``) in its time: faulthandler's handler (``dump_stack``) runs
in C, without the GIL, and so answers a rank wedged in native code too."""


def stack_file(error_file: str) -> str:
    """Where a rank's Python stack is dumped (``dump_stack``): beside its
    error record, ``rank<R>.stack.txt`` for ``rank<R>.error.json``."""
    return where_file(error_file)[:-len("where.json")] + "stack.txt"


def dump_stack(path: str) -> None:
    """Have faulthandler write every thread's Python stack to ``path`` when
    this process is sent ``DUMP_STACK``, after a first line naming the main
    thread ('main thread 0x7f...': faulthandler's thread ids). A child the
    program forks unregisters it and closes the file, so that nothing it
    does writes into the rank's."""
    if not DUMP_STACK:
        return
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        os.write(fd, f"main thread 0x{threading.get_ident():x}\n".encode())
        faulthandler.register(DUMP_STACK, file=fd, all_threads=True, chain=False)
    except (OSError, RuntimeError, ValueError):
        return
    held = [fd]     # (a child's child: the child closed it already)

    def forked() -> None:
        if held:
            faulthandler.unregister(DUMP_STACK)
            os.close(held.pop())
    os.register_at_fork(after_in_child=forked)


def _set_path0(entry: str) -> None:
    """Put the program's directory first on sys.path, where python would, in
    place of this file's directory (unless -P / PYTHONSAFEPATH is in force)."""
    if getattr(sys.flags, "safe_path", False):
        return
    here = os.path.dirname(os.path.abspath(__file__))
    if sys.path and os.path.abspath(sys.path[0] or ".") == here:
        sys.path[0] = entry
    else:
        sys.path.insert(0, entry)


def _zipped(path: str) -> bool:
    import zipfile         # (only here: the bootstrap imports little before the user's code)
    return zipfile.is_zipfile(path)


def _run(argv: list[str]) -> None:
    if argv[0] == "--exec":
        os.execvp(argv[1], argv[1:])
    if argv[0] == "-m":
        _set_path0(os.getcwd())
        sys.argv = argv[1:]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        # a folder or a zip file with a __main__.py is sys.path[0] itself, as under python
        whole = os.path.isdir(argv[0]) or not argv[0].endswith(".py") and _zipped(argv[0])
        _set_path0(os.path.abspath(argv[0]) if whole else
                   os.path.dirname(os.path.abspath(argv[0])))
        sys.argv = list(argv)
        runpy.run_path(argv[0], run_name="__main__")


def _one_line(exc: BaseException) -> str:
    """'ValueError: boom', as the last line of its traceback (first line of a long message)."""
    name = type(exc).__qualname__
    if type(exc).__module__ not in ("builtins", "__main__"):
        name = f"{type(exc).__module__}.{name}"
    msg = str(exc).splitlines()
    return f"{name}: {msg[0]}" if msg else name


def _set_last(exc: BaseException) -> None:
    """Leave the error where the interpreter leaves an uncaught one, so that
    exit handlers (mesh closes a mesh left open) know the program failed."""
    sys.last_type, sys.last_value, sys.last_traceback = type(exc), exc, exc.__traceback__
    sys.last_exc = exc  # type: ignore[attr-defined]  # Python 3.12's name


def _exit_code(code: object) -> int:
    """The status a process that raised SystemExit(code) ends with, as the
    interpreter makes it: an int's low 8 bits, 1 for anything else printed."""
    if code is None:
        return 0
    return code & 0xFF if isinstance(code, int) else 1


def main(argv: list[str] | None = None) -> None:
    """Arm the parent-death signal, run the program, record an uncaught error."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or (argv[0] in ("-m", "--exec") and len(argv) < 2):
        sys.exit("usage: _bootstrap.py script.py args... | -m module args... | --exec prog args...")
    parent = os.environ.get("MESH_LAUNCHER_PID")
    arm_parent_death_signal(int(parent) if parent else None)
    if not faulthandler.is_enabled():
        # a crash in native code (SIGSEGV, SIGABRT...) shows where Python was, in every
        # thread, on the rank's stderr, as torchrun's @record does: it showed nothing
        faulthandler.enable(all_threads=True)
    me = os.getpid()
    try:
        if argv[0] != "--exec":     # (a program exec'd in its place has no bootstrap)
            os.environ["MESH_BOOTSTRAP_PID"] = str(me)
            if os.environ.get("MESH_ERROR_FILE"):
                say_where(where_file(os.environ["MESH_ERROR_FILE"]))
                dump_stack(stack_file(os.environ["MESH_ERROR_FILE"]))
        _run(argv)
    except SystemExit as exc:
        if exc.code not in (None, 0):
            _set_last(exc)
        path = os.environ.get("MESH_ERROR_FILE") if os.getpid() == me else None
        if path and exc.code not in (None, 0):
            # sys.exit("why") (the interpreter prints the why and exits 1), sys.exit(3):
            # recorded, the report's table says it and where (it said "no traceback ...
            # without an uncaught Python exception", with no error line)
            try:
                _record(path, exc, _code(exc))
            except OSError as err:
                sys.stderr.write(f"meshrun bootstrap: cannot write {path}: {err}\n")
        raise
    except BaseException as exc:
        _set_last(exc)
        tb = _user_frames(exc.__traceback__)
        text = "".join(traceback.format_exception(type(exc), exc, tb))
        # (a child the program forked that raised: the rank's record is not
        # its to write, and meshrun reports no child: its traceback, here)
        path = os.environ.get("MESH_ERROR_FILE") if os.getpid() == me else None
        recorded = False
        code = _code(exc)
        if path:
            try:
                write_error_record(path, exc, text, brief_traceback(exc, tb), code)
                recorded = True
            except OSError as err:
                sys.stderr.write(f"meshrun bootstrap: cannot write {path}: {err}\n")
        if recorded:
            sys.stderr.write(f"{_one_line(exc)}  (uncaught: meshrun reports it at the end)\n")
        else:
            sys.stderr.write(text)
        sys.exit(code)


if __name__ == "__main__":
    main()
