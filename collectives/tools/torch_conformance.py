"""torch's own distributed suite on the "meshrun" backend, beside gloo.

    python -m collectives.tools.torch_conformance --world-sizes 2,3 --filter all_reduce

runs ``DistributedTest._DistTestBase`` from the torch wheel
(torch/testing/_internal/distributed/distributed_test.py) as torch's
test/distributed/test_distributed_spawn.py wires it: one
MultiProcessTestCase per test, WORLD_SIZE spawned ranks, file:// init,
``BACKEND`` read from the environment when the suite is imported. So each
(backend, world size) runs in a suite process of its own, serially, and
the table puts each test's gloo result beside meshrun's.

INIT_METHOD is file:// when the suite is imported, as in torch's own
file-init configuration (test/run_test.py), so the tests that need it run.

What the runner adds for a third-party backend (torch's tables name only
its own): "meshrun" goes into ``DistTestCases.backend_feature`` "plugin"
(else ``require_backend_is_available`` skips every test), "ddp",
"subgroup", "gpu" and "cuda" (the features the backend claims), before the
suite module is imported, since its decorators read the tables then. The
rank processes import this module to find the test class, and so import
collectives.torchdist, which registers the backend. Tests the suite gates
on a backend's name (``BACKEND != "gloo"``, ``require_backend_is_available
({"gloo"})``) are skipped on meshrun with torch's reason; ``--ungate`` runs
them on meshrun too (marked "ungated" in the table), and the tests whose
body builds its model only for gloo or MPI (``AS_GLOO``) with the suite's
BACKEND reading "gloo" in the body, the group still meshrun's.

Each test has a timeout (torch's own join loop, ``--timeout``; the suite
process has a watchdog on top). Results are one JSON line per test.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import unittest
from typing import Any, Iterable

from mesh.cliargs import checked, names_in, positive, positive_float, positive_list

from . import conformance

__all__ = ["FEATURES", "UNGATE", "AS_GLOO", "suite_class", "test_names", "run_suite", "reason",
           "table", "counts", "main"]

FEATURES = ("plugin", "ddp", "subgroup", "gpu", "cuda")
"""DistTestCases.backend_feature entries "meshrun" is added to."""

_CLASS = "TestDistBackendWithSpawn"
_built: dict[str, Any] = {}


def suite_class() -> Any:
    """torch's spawn test class for the BACKEND of this process's
    environment (built once; importing the suite reads BACKEND)."""
    if "cls" in _built:
        return _built["cls"]
    backend = os.environ["BACKEND"]
    import torch
    from torch.testing._internal import common_distributed as cd

    if backend == "meshrun":
        import collectives.torchdist  # noqa: F401  (registers the backend)
        for feature in FEATURES:
            cd.DistTestCases.backend_feature[feature].add("meshrun")
    limit = int(os.environ.get("DISTRIBUTED_TESTS_DEFAULT_TIMEOUT", "300"))
    for name, secs in list(cd.TIMEOUT_OVERRIDE.items()):
        cd.TIMEOUT_OVERRIDE[name] = min(secs, limit)
    from torch.testing._internal.distributed.distributed_test import (
        DistributedTest, TestDistBackend)

    class TestDistBackendWithSpawn(TestDistBackend, DistributedTest._DistTestBase):  # type: ignore[misc,name-defined]
        def setUp(self) -> None:
            super().setUp()
            self._spawn_processes()
            torch.backends.cudnn.flags(enabled=True, allow_tf32=False).__enter__()

        def _spawn_processes(self) -> None:
            """Ranks forked from this process (torch and the suite already
            imported: what took most of a test's 10-45 s under load, each rank
            importing them afresh) unless CONFORMANCE_START=spawn."""
            method = os.environ.get("CONFORMANCE_START", "fork")
            if method == "spawn":
                super()._spawn_processes()
            else:
                ctx: Any = torch.multiprocessing.get_context(method)
                self._start_processes(ctx.Process)

        @classmethod
        def _run(cls, *args: Any, **kwargs: Any) -> None:
            """A forked rank sees the suite's INIT_METHOD as this test's setUp
            set it, as a spawned rank that imports the suite afresh does."""
            suite: Any = sys.modules[DistributedTest.__module__]
            suite.INIT_METHOD = os.environ.get("INIT_METHOD", suite.INIT_METHOD)
            super()._run(*args, **kwargs)

        def run_test(self, test_name: str, parent_pipe: Any) -> None:
            """A rank's skip reason goes to a file the parent reads (torch
            only logs it and reports a generic skip)."""
            fn = getattr(self, test_name)
            if test_name in _built.get("as_gloo", ()):
                fn = _as_gloo(fn, sys.modules[DistributedTest.__module__])

            def noting() -> None:
                try:
                    fn()
                except unittest.SkipTest as e:
                    with open(_skip_file(), "w") as f:
                        f.write(str(e).splitlines()[0] if str(e) else "")
                    raise
            setattr(self, test_name, noting)
            super().run_test(test_name, parent_pipe)

    if backend == "meshrun" and os.environ.get("CONFORMANCE_UNGATE") == "1":
        _built["ungated"] = _ungate(TestDistBackendWithSpawn)
        _built["as_gloo"] = {n for n in unittest.TestLoader().getTestCaseNames(
            TestDistBackendWithSpawn) if AS_GLOO.search(n)}
        _built["ungated"] |= _built["as_gloo"]
    TestDistBackendWithSpawn.__module__ = __name__
    TestDistBackendWithSpawn.__qualname__ = _CLASS
    _built["cls"] = TestDistBackendWithSpawn
    return TestDistBackendWithSpawn


UNGATE = re.compile(r"gloo|Only MPI supports (CPU )?all_to_all", re.IGNORECASE)
"""--ungate: the skips the suite decides by the backend's name alone (gloo's
features, and all_to_all that only MPI runs on the CPU), lifted for meshrun."""


AS_GLOO = re.compile(r"^test_accumulate_gradients_no_sync")
"""--ungate: tests whose body builds its CPU model only ``if BACKEND ==
"mpi" or BACKEND == "gloo"`` (and fails on any other name for want of
one); their body runs with the suite's BACKEND reading "gloo", the process
group meshrun's (made in setUp, before it)."""


def _as_gloo(fn: Any, suite: Any) -> Any:
    def body() -> None:
        was, suite.BACKEND = suite.BACKEND, "gloo"
        try:
            fn()
        finally:
            suite.BACKEND = was
    return body


def _ungate(cls: Any) -> set[str]:
    """Run the tests the suite skips only because BACKEND is not "gloo"
    (the rank processes run a test whatever its skip marks say)."""
    lifted = set()
    for name in unittest.TestLoader().getTestCaseNames(cls):
        fn = getattr(cls, name)
        if getattr(fn, "__unittest_skip__", False) and UNGATE.search(
                str(getattr(fn, "__unittest_skip_why__", ""))):
            fn.__unittest_skip__ = False
            lifted.add(name)
    return lifted


def _skip_file() -> str:
    return os.path.join(os.path.dirname(os.environ["CONFORMANCE_OUT"]), "skip-reason")


def __getattr__(name: str) -> Any:
    """The rank processes unpickle the test class by this name."""
    if name == _CLASS:
        return suite_class()
    raise AttributeError(name)


def test_names(pattern: str | None = None) -> list[str]:
    """The suite's test names (sorted, as unittest loads them), those matching ``pattern``
    (a regular expression searched in the name) if given."""
    os.environ.setdefault("BACKEND", "gloo")
    os.environ.setdefault("WORLD_SIZE", "2")
    cls = suite_class()
    names = unittest.TestLoader().getTestCaseNames(cls)
    rx = re.compile(pattern) if pattern else None
    return [n for n in names if rx is None or rx.search(n)]


def reason(err: str) -> str:
    """One line out of a test's error text: the last ``SomeError: ...`` line
    of the first failing rank's traceback (or of the parent's), or the line
    saying it timed out."""
    return conformance.reason(err, _Record.width, timeouts=True, processes=True)


class _Record(conformance.Record):
    """One JSON line a test (its name, "(ungated)" after the result of one
    ``--ungate`` ran, its seconds), with a skip's reason from the rank that
    skipped (``_skip_file``)."""

    width = 200

    def __init__(self, out: Any) -> None:
        super().__init__(out)
        self.t0 = 0.0

    def startTest(self, test: unittest.TestCase) -> None:
        super().startTest(test)
        self.t0 = time.monotonic()
        if os.path.exists(_skip_file()):
            os.unlink(_skip_file())

    def line(self, test: Any, result: str, why: str) -> dict[str, Any]:
        name = test.id().rsplit(".", 1)[-1]
        if name in _built.get("ungated", ()):
            result += " (ungated)"
        return {"test": name, "result": result, "reason": why,
                "secs": round(time.monotonic() - self.t0, 1)}

    def addSkip(self, test: unittest.TestCase, why: str) -> None:
        if why.startswith("Test skipped at subprocess level") and os.path.exists(_skip_file()):
            with open(_skip_file()) as f:
                why = f.read() or why
        super().addSkip(test, why)

    def failed(self, kind: type[BaseException], text: str, assertion: bool) -> tuple[str, str]:
        why = reason(text)
        return "timeout" if not assertion and why.startswith("timeout") else "fail", why


def _suite_main() -> None:
    """The suite process: run the named tests (argv) serially, one JSON
    line per test to the file in CONFORMANCE_OUT."""
    cls = suite_class()
    with open(os.environ["CONFORMANCE_OUT"], "a") as out:
        rec = _Record(out)
        for name in sys.argv[1:]:
            cls(name).run(rec)


def run_suite(backend: str, world_size: int, names: list[str], timeout: float,
              quiet: bool = True, ungate: bool = False,
              start: str = "fork") -> dict[str, dict[str, Any]]:
    """Run ``names`` with BACKEND=backend at ``world_size``; each test's
    record (result, reason, secs). A test the suite process never reported
    (it was killed by the watchdog or crashed) is "crash". ``start``: how
    the ranks are started, "fork" (from the suite process, which has
    imported torch and the suite once) or "spawn" (torch's way: each rank
    imports them again, several seconds of CPU each)."""
    got: dict[str, dict[str, Any]] = {}
    left = list(names)
    with tempfile.TemporaryDirectory(prefix="meshrun-conformance-") as tmp:
        out_file = os.path.join(tmp, "results.jsonl")
        # (TMPDIR: the suite's own temporary files, which it leaves behind, go
        # with the folder: a whole run left some 500 in /tmp)
        env = dict(os.environ, BACKEND=backend, WORLD_SIZE=str(world_size),
                   TEMP_DIR=tmp, TMPDIR=tmp, CONFORMANCE_OUT=out_file,
                   DISTRIBUTED_TESTS_DEFAULT_TIMEOUT=str(int(timeout)),
                   CONFORMANCE_UNGATE="1" if ungate else "0", CONFORMANCE_START=start,
                   INIT_METHOD=f"file://{tmp}/init_dir/shared_init_file",
                   PYTHONPATH=os.pathsep.join(p for p in (_root(), os.environ.get("PYTHONPATH"))
                                              if p))
        os.makedirs(os.path.join(tmp, "barrier"), exist_ok=True)
        while left:
            cmd = [sys.executable, "-c",
                   "from collectives.tools.torch_conformance import _suite_main; _suite_main()",
                   *left]
            log = subprocess.DEVNULL if quiet else None
            try:
                subprocess.run(cmd, env=env, stdout=log, stderr=log,
                               timeout=len(left) * (timeout + 30) + 60)
            except subprocess.TimeoutExpired:
                pass
            if os.path.exists(out_file):
                with open(out_file) as f:
                    for line in f:
                        rec = json.loads(line)
                        got[rec["test"]] = rec
            stuck = next((n for n in left if n not in got), None)
            if stuck is None:
                break
            got[stuck] = {"test": stuck, "result": "crash", "reason":
                          "the suite process ended (or its watchdog fired) during this test",
                          "secs": None}
            left = [n for n in left if n not in got]
    return got


def _root() -> str:
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def table(results: dict[str, dict[str, dict[str, Any]]], names: Iterable[str]) -> str:
    """Rows: test, gloo's result, meshrun's, meshrun's reason (or gloo's
    where only gloo's is not a pass)."""
    rows = ["| test | gloo | meshrun | reason |", "|---|---|---|---|"]
    for n in names:
        g = results.get("gloo", {}).get(n, {})
        m = results.get("meshrun", {}).get(n, {})
        ok = m.get("result", "pass").startswith("pass")
        why = g.get("reason", "") if ok else m.get("reason")
        rows.append(f"| {n} | {g.get('result', '-')} | {m.get('result', '-')} | {why or ''} |")
    return "\n".join(rows)


def counts(recs: dict[str, dict[str, Any]]) -> dict[str, int]:
    """How many tests ran, and how many passed, failed, timed out, crashed, skipped."""
    c = {"ran": len(recs)}
    for kind in ("pass", "fail", "timeout", "crash", "skip"):
        c[kind] = sum(1 for r in recs.values() if r["result"].split(" ")[0] == kind)
    return c


def _regex(text: str) -> str:
    try:
        re.compile(text)
    except re.error as e:
        raise ValueError(f"not a regular expression: {e}") from None
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m collectives.tools.torch_conformance",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--world-sizes", default=[2, 3], type=positive_list)
    ap.add_argument("--backends", default=["gloo", "meshrun"],
                    type=names_in(("gloo", "meshrun")))
    ap.add_argument("--filter", default=None, type=checked(_regex),
                    help="regular expression on test names")
    ap.add_argument("--limit", type=positive, default=None, help="the first N matching tests")
    ap.add_argument("--timeout", type=positive_float, default=120, help="seconds per test")
    ap.add_argument("--json", default=None, help="write all records here")
    ap.add_argument("--verbose", action="store_true", help="show the suite's output")
    ap.add_argument("--list", action="store_true", help="print the selected names and stop")
    ap.add_argument("--ungate", action="store_true",
                    help="on meshrun, run the tests the suite skips by backend name (UNGATE)")
    ap.add_argument("--start-method", default="fork", choices=("fork", "spawn"),
                    help="how each test's ranks start (spawn: as torch's runner does, slower)")
    a = ap.parse_args(argv)
    names = test_names(a.filter)[:a.limit]
    if a.list:
        print("\n".join(names))
        return 0
    everything: dict[str, Any] = {}
    status = 0
    for ws in a.world_sizes:
        results = {}
        for backend in a.backends:
            t0 = time.monotonic()
            results[backend] = run_suite(backend, ws, names, a.timeout, quiet=not a.verbose,
                                         ungate=a.ungate, start=a.start_method)
            print(f"# world size {ws}, {backend}: {counts(results[backend])} "
                  f"in {time.monotonic() - t0:.0f} s", flush=True)
        print(f"\n## world size {ws}\n\n{table(results, names)}\n", flush=True)
        everything[str(ws)] = results
        g, m = results.get("gloo", {}), results.get("meshrun", {})
        if any(g.get(n, {}).get("result") == "pass" and m.get(n, {}).get("result", "")
               .split(" ")[0] not in ("pass", "skip") for n in names):
            status = 1
    if a.json:
        with open(a.json, "w") as f:
            json.dump(everything, f, indent=1)
    return status


if __name__ == "__main__":
    sys.exit(main())
