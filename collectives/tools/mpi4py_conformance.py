"""mpi4py's own test suite on collectives.MPI, beside real mpi4py under mpirun.

    python -m collectives.tools.mpi4py_conformance --tests DIR --world-sizes 1,2,3

runs the test modules of mpi4py's test folder (its sdist's test/: main.py,
mpiunittest.py, arrayimpl.py, test_*.py) with ``from mpi4py import MPI``
resolving to collectives.MPI: a shim package ``mpi4py`` in a temporary
folder, first on sys.path, whose ``MPI`` is collectives.MPI, with an
``mpi4py.rc`` of mpi4py's defaults and ``mpi4py.util``, whose dtlib, pool,
sync and pkl5 are collectives.util's (pkl5 raises NotImplementedError: not
provided). Each module runs under meshrun
(``python -m mesh.launch -n N``) at each world size, one job a module,
and the same module under ``mpirun -n N`` with real mpi4py (``--reference
mpirun``, the default where mpirun and mpi4py are installed; ``none``:
meshrun alone). Every rank runs the module's tests in unittest's order
and writes one JSON line a test; a test's result is its worst rank's.

Results: pass, fail (an assertion), error (another exception), skip,
"notprov" (a NotImplementedError of collectives.MPI's, or its
AttributeError for a name it has not: what README says is not provided,
counted apart from the failures), timeout (the test a rank was in when
the module's job passed ``--timeout``; the tests after it did not run)
and, for a module that did not import, one "module" record. Each job's
blocking operations time out after ``--op-timeout`` seconds (meshrun's
MESH_TIMEOUT), so that a test whose ranks disagree fails rather than
stalls the module.
"""
from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import unittest
from typing import Any, Iterable

from mesh.cliargs import names_in, positive_float, positive_list

from . import conformance

__all__ = ["SIDES", "KINDS", "FAKE_GPU", "shim", "modules", "run_module", "merge", "classify",
           "counts", "table", "failures", "reason", "main"]

SIDES = ("meshrun", "mpirun")
KINDS = ("pass", "fail", "error", "skip", "notprov", "timeout")
_RANK_ORDER = ("notprov", "timeout", "error", "fail", "skip", "pass")
"""Which rank's result is the test's: the first of these any rank had."""

_INIT = '''"""mpi4py's package surface over collectives.MPI (mpi4py_conformance's shim)."""
import sys
import types

from collectives import MPI

__version__ = "4.1.2"
sys.modules[__name__ + ".MPI"] = MPI


class _Rc:
    initialize = True
    threads = True
    thread_level = "multiple"
    finalize = None
    fast_reduce = True
    recv_mprobe = True
    irecv_bufsz = 32768
    errors = "exception"

    def __call__(self, **kwargs):
        for k, v in kwargs.items():
            setattr(self, k, v)


rc = _Rc()
sys.modules[__name__ + ".rc"] = rc  # type: ignore[assignment]


def get_include():
    raise NotImplementedError("collectives.MPI: mpi4py.get_include: not provided")


def get_config():
    return {}


def profile(*args, **kwargs):
    raise NotImplementedError("collectives.MPI: mpi4py.profile: not provided")
'''

_UTIL = '''"""mpi4py.util over collectives.MPI: collectives.util."""
'''

_UTIL_MODULE = '''import sys
from collectives.util import {name} as _module
sys.modules[__name__] = _module
'''


def shim(folder: str) -> str:
    """Write the ``mpi4py`` shim package into ``folder``; returns it."""
    pkg = os.path.join(folder, "mpi4py")
    os.makedirs(os.path.join(pkg, "util"), exist_ok=True)
    with open(os.path.join(pkg, "__init__.py"), "w") as f:
        f.write(_INIT)
    with open(os.path.join(pkg, "util", "__init__.py"), "w") as f:
        f.write(_UTIL)
    for name in ("dtlib", "pkl5", "pool", "sync"):
        with open(os.path.join(pkg, "util", name + ".py"), "w") as f:
            f.write(_UTIL_MODULE.format(name=name))
    return folder


def modules(tests: str, only: Iterable[str] | None = None) -> list[str]:
    """The test modules of the folder ``tests`` (test_*.py, sorted), those named in ``only``
    (with or without "test_") if given."""
    found = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(tests, "test_*.py")))
    if not found:
        raise ValueError(f"no test_*.py in {tests!r}: not mpi4py's test folder")
    if only is None:
        return found
    want = [m if m.startswith("test_") else "test_" + m for m in only]
    unknown = [m for m in want if m not in found]
    if unknown:
        raise ValueError(f"no such module in {tests}: {', '.join(unknown)}")
    return want


def classify(exc_type: str, text: str, assertion: bool) -> str:
    """A test's result from its exception: "notprov" for collectives.MPI's
    NotImplementedError, which names the call (or its AttributeError "not
    provided"), else
    "fail" for an assertion, "error" for the rest."""
    if "collectives.MPI" in text and ("NotImplementedError" in exc_type or
                                      "AttributeError" in exc_type and "not provided" in text):
        return "notprov"
    return "fail" if assertion else "error"


def reason(text: str) -> str:
    """One line out of a traceback: its last ``SomeError: ...`` line."""
    return conformance.reason(text)


class _Record(conformance.Record):
    """One JSON line a test, written as it ends (a "start" line before it)."""

    def startTest(self, test: Any) -> None:
        super().startTest(test)
        self._put(test, "start")

    def failed(self, kind: type[BaseException], text: str, assertion: bool) -> tuple[str, str]:
        return classify(kind.__name__, text, assertion), reason(text)


def _rank_main(module: str, out_dir: str) -> None:
    """A rank: import ``module`` (the test folder on sys.path), run its
    tests, one JSON line each in out_dir/rank<R>.jsonl."""
    rank = os.environ.get("OMPI_COMM_WORLD_RANK", os.environ.get("RANK", "0"))
    with open(os.path.join(out_dir, f"rank{rank}.jsonl"), "a") as out:
        try:
            drop = [n for n in os.environ.get("MPI4PY_CONFORMANCE_DROP", "").split(",") if n]
            if drop:
                import arrayimpl
                arrayimpl.ArrayBackends[:] = [b for b in arrayimpl.ArrayBackends
                                              if b.__name__ not in drop]
            mod = __import__(module)
            suite = unittest.defaultTestLoader.loadTestsFromModule(mod)
        except BaseException as e:  # noqa: B036 (a module's SystemExit, a skip, too)
            text = traceback.format_exc()
            if isinstance(e, unittest.SkipTest):
                result = "skip"
            else:
                result = classify(type(e).__name__, text, False)
            out.write(json.dumps({"test": module, "result": result, "module": True,
                                  "reason": reason(text)}) + "\n")
            return
        suite.run(_Record(out))
    try:      # (mpi4py's main.py ends with a barrier: no rank leaves a peer mid-test)
        from mpi4py import MPI
        MPI.COMM_WORLD.Barrier()
    except BaseException:  # noqa: B036
        pass


_RANK_SCRIPT = """import sys
sys.path[:0] = {paths!r}
from collectives.tools.mpi4py_conformance import _rank_main
_rank_main(sys.argv[1], sys.argv[2])
"""


def _root() -> str:
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


FAKE_GPU = ("FakeGPUArrayBasic", "FakeGPUArrayNumPy")
"""mpi4py's arrayimpl backends of host memory behind ``__cuda_array_interface__``
(a GPU array's interface: collectives.MPI's buffers are host memory, and a
real GPU array's pointer is no host address); ``--no-fake-gpu`` drops them."""


def run_module(side: str, module: str, world_size: int, tests: str, timeout: float,
               op_timeout: float = 30.0, quiet: bool = True,
               drop: Iterable[str] = ()) -> dict[str, Any]:
    """Run ``module`` of the folder ``tests`` at ``world_size`` on ``side``
    ("meshrun": collectives.MPI by the shim; "mpirun": real mpi4py), without
    the arrayimpl backends (class names) in ``drop``; returns {"tests": {id:
    {"result", "reason"}}, "secs", "exit"} (merge's)."""
    with tempfile.TemporaryDirectory(prefix="meshrun-mpi4py-") as tmp:
        out_dir = os.path.join(tmp, "out")
        os.makedirs(out_dir)
        tests = os.path.abspath(tests)
        paths = ([shim(os.path.join(tmp, "shim"))] if side == "meshrun" else []) + [tests, _root()]
        script = os.path.join(tmp, "rank.py")
        with open(script, "w") as f:
            f.write(_RANK_SCRIPT.format(paths=paths))
        env = dict(os.environ, TMPDIR=tmp, MESH_TIMEOUT=str(op_timeout),
                   MPI4PY_RC_THREAD_LEVEL="serialized", MPI4PY_CONFORMANCE_DROP=",".join(drop),
                   PYTHONPATH=os.pathsep.join(p for p in (_root(), os.environ.get("PYTHONPATH"))
                                              if p))
        if side == "meshrun":
            cmd = [sys.executable, "-m", "mesh.launch", "-n", str(world_size),
                   "--timeout", str(int(timeout)), "--grace", "2", script, module, out_dir]
        else:
            # (btl self,tcp: nothing of Open MPI's left in /dev/shm by a rank killed on a timeout;
            # osc pt2pt: Open MPI 4's windows over tcp)
            cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "--bind-to", "none",
                   "--mca", "btl", "self,tcp", "--mca", "osc", "pt2pt",
                   "--timeout", str(int(timeout)), "-n", str(world_size),
                   sys.executable, script, module, out_dir]
        t0 = time.monotonic()
        log = subprocess.DEVNULL if quiet else None
        try:
            code = subprocess.run(cmd, env=env, cwd=tests, stdout=log, stderr=log,
                                  stdin=subprocess.DEVNULL, timeout=timeout + 60,
                                  start_new_session=True).returncode
        except subprocess.TimeoutExpired:
            code = 124
        secs = time.monotonic() - t0
        ranks = []
        for r in range(world_size):
            path = os.path.join(out_dir, f"rank{r}.jsonl")
            recs = []
            if os.path.exists(path):
                with open(path) as f:
                    recs = [json.loads(ln) for ln in f if ln.strip()]
            ranks.append(recs)
    return {"tests": merge(ranks, module, code), "secs": round(secs, 1), "exit": code}


def merge(ranks: list[list[dict[str, Any]]], module: str, code: int) -> dict[str, dict[str, Any]]:
    """Each test's result from every rank's lines: a test a rank started
    and never ended is "timeout" (the job was stopped in it); a job that
    ended without any rank's line a "module" error; a test's result the
    first of _RANK_ORDER that a rank had, with the lowest such rank's
    reason."""
    per: dict[str, list[tuple[int, dict[str, Any]]]] = {}
    order: list[str] = []
    for r, recs in enumerate(ranks):
        open_: dict[str, dict[str, Any]] = {}
        for rec in recs:
            name = rec["test"]
            if name not in per:
                per[name] = []
                order.append(name)
            if rec["result"] == "start":
                open_[name] = rec
                continue
            open_.pop(name, None)
            per[name].append((r, rec))
        for name in open_:
            if not any(rr == r for rr, _ in per[name]):
                per[name].append((r, {"result": "timeout", "reason":
                                      f"rank {r} never ended it (the job ended, exit {code})"}))
    got: dict[str, dict[str, Any]] = {}
    for name in order:
        if not per[name]:
            continue
        best = min(per[name], key=lambda x: (_RANK_ORDER.index(x[1]["result"]), x[0]))
        rec = {"result": best[1]["result"], "reason": best[1].get("reason", "")}
        if best[1]["result"] not in ("pass", "skip") and len(ranks) > 1:
            rec["reason"] = f"rank {best[0]}: {rec['reason']}"
        if best[1].get("module"):
            rec["module"] = True
        got[name] = rec
    if not got:
        got[module] = {"result": "timeout" if code == 124 else "error", "module": True,
                       "reason": f"no rank reported (exit {code})"}
    return got


def counts(recs: dict[str, dict[str, Any]]) -> dict[str, int]:
    """ran (tests that have a result, not a module's import), and each kind's count."""
    c = {"ran": sum(1 for r in recs.values() if not r.get("module"))}
    for kind in KINDS:
        c[kind] = sum(1 for r in recs.values() if r["result"] == kind)
    return c


def table(results: dict[str, dict[str, dict[str, Any]]], mods: Iterable[str]) -> str:
    """One row a module: each side's ran/pass/fail/error/skip/not provided/timeout."""
    sides = [s for s in SIDES if s in results]
    head = "| module | " + " | ".join(f"{s} ran/pass/fail/err/skip/np/to" for s in sides) + " |"
    rows = [head, "|---" * (len(sides) + 1) + "|"]
    for m in mods:
        cells = []
        for s in sides:
            run = results[s].get(m)
            if run is None:
                cells.append("-")
                continue
            c = counts(run["tests"])
            mod = next((r for r in run["tests"].values() if r.get("module")), None)
            cell = "/".join(str(c[k]) for k in ("ran", "pass", "fail", "error", "skip",
                                                 "notprov", "timeout"))
            if mod is not None:
                cell += f" (module {mod['result']})"
            cells.append(cell)
        rows.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def failures(results: dict[str, dict[str, dict[str, Any]]], mods: Iterable[str],
             side: str = "meshrun") -> list[str]:
    """Each of ``side``'s tests that did not pass or skip: "id result [reference's]: reason"."""
    lines = []
    ref = next((s for s in SIDES if s != side and s in results), None)
    for m in mods:
        run = results.get(side, {}).get(m)
        if run is None:
            continue
        other = results.get(ref, {}).get(m, {}).get("tests", {}) if ref else {}
        for name, rec in run["tests"].items():
            if rec["result"] in ("pass", "skip"):
                continue
            was = other.get(name, {}).get("result", "-") if ref else ""
            lines.append(f"{name} {rec['result']}" + (f" [{ref}: {was}]" if ref else "")
                         + f": {rec['reason']}")
    return lines


def _have_reference() -> bool:
    return shutil.which("mpirun") is not None and importlib.util.find_spec("mpi4py") is not None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m collectives.tools.mpi4py_conformance",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--tests", default=os.environ.get("MPI4PY_TESTS"),
                    help="mpi4py's test folder (default: $MPI4PY_TESTS)")
    ap.add_argument("--world-sizes", default=[1, 2, 3], type=positive_list)
    ap.add_argument("--modules", default=None, help="comma-separated (default: every test_*.py)")
    ap.add_argument("--reference", default=None, type=names_in(("mpirun", "none")),
                    help="mpirun (real mpi4py beside; the default where installed) or none")
    ap.add_argument("--timeout", type=positive_float, default=300, help="seconds per module job")
    ap.add_argument("--op-timeout", type=positive_float, default=30,
                    help="each blocking operation's (meshrun's MESH_TIMEOUT)")
    ap.add_argument("--no-fake-gpu", action="store_true",
                    help="drop arrayimpl's FakeGPUArray backends on both sides (FAKE_GPU)")
    ap.add_argument("--json", default=None, help="write all records here")
    ap.add_argument("--verbose", action="store_true", help="show the jobs' output")
    a = ap.parse_args(argv)
    if not a.tests:
        ap.error("--tests DIR (or MPI4PY_TESTS): mpi4py's test folder")
    try:
        mods = modules(a.tests, a.modules.split(",") if a.modules else None)
    except ValueError as e:
        ap.error(str(e))
    ref = a.reference[0] if a.reference else ("mpirun" if _have_reference() else "none")
    if ref == "mpirun" and not _have_reference():
        ap.error("--reference mpirun: mpirun or mpi4py is not installed")
    sides = ["meshrun"] + (["mpirun"] if ref == "mpirun" else [])
    everything: dict[str, Any] = {}
    status = 0
    for ws in a.world_sizes:
        results: dict[str, dict[str, Any]] = {s: {} for s in sides}
        for m in mods:
            for s in sides:
                run = results[s][m] = run_module(s, m, ws, a.tests, a.timeout, a.op_timeout,
                                                 quiet=not a.verbose,
                                                 drop=FAKE_GPU if a.no_fake_gpu else ())
                print(f"# {ws} {s} {m}: {counts(run['tests'])} in {run['secs']} s", flush=True)
        print(f"\n## world size {ws}\n\n{table(results, mods)}\n", flush=True)
        for line in failures(results, mods):
            print(line)
        everything[str(ws)] = results
        if any(r["result"] in ("fail", "error", "timeout")
               for run in results["meshrun"].values() for r in run["tests"].values()):
            status = 1
    if a.json:
        with open(a.json, "w") as f:
            json.dump(everything, f, indent=1)
    return status


if __name__ == "__main__":
    sys.exit(main())
