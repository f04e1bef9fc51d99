"""The matrix the collective battery runs over (tests/test_collectives.py):
transport path x array backend x communicator, each cell one ``mesh.spawn``.
A test that takes a ``cell`` argument is run once per cell; a cell whose
backend is missing here (real CuPy without a GPU) is skipped, saying why.
"""
from __future__ import annotations

import gc
import importlib
import itertools
import os
import sys
from typing import Any

import pytest

from backends import Cell, backend

# mesh.spawn's fork server imports these once: every rank imports its test
# module, and with it pytest and the packages; and torch (3.5 s of CPU per
# import on the 2-core machine, so 30 s for an 8-rank torch test) and
# torch._dynamo (2.9 s more, imported by DDP and fully_shard) where torch is
# installed (the fork server skips a module that does not import)
os.environ.setdefault("MESH_SPAWN_PRELOAD", "pytest,collectives,engine,torch,torch._dynamo")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _compile_the_tree() -> list[str]:
    """Where bytecode is not written (PYTHONDONTWRITEBYTECODE=1, as on the CI
    machine), compile this tree's modules once, here, where each fresh
    interpreter the suite starts (every meshrun, torchrun and mpirun rank, a
    subprocess; each fork-server rank for its test module) compiled them from
    source: mesh, collectives and engine 0.25 s of CPU a process (0.42 s to
    import them, 0.15 s from bytecode), test_mesh_launch.py's CPU 29 s -> 20 s.
    Returns the files it made, removed again at the session's end
    (``pytest_unconfigure``); one already there is left as it is. Run in
    pytest's process alone (``pytest_configure``), before any test starts
    one, not in the ranks that import this module for PATHS."""
    if not sys.dont_write_bytecode or os.environ.get("PYTEST_XDIST_WORKER"):
        return []               # (under xdist the controller compiles, before its workers start)
    import compileall
    from importlib.util import cache_from_source
    made = []
    for package in ("mesh", "collectives", "engine", "tests", "examples"):
        for folder, _, files in os.walk(os.path.join(ROOT, package)):
            for name in files:
                if not name.endswith(".py"):
                    continue
                path = os.path.join(folder, name)
                try:
                    pyc = cache_from_source(path)
                except ValueError:
                    continue
                new = not os.path.exists(pyc)
                if compileall.compile_file(path, quiet=2) and new and os.path.exists(pyc):
                    made.append(pyc)
    return made


_COMPILED: list[str] = []


def pytest_configure(config: pytest.Config) -> None:
    _COMPILED.extend(_compile_the_tree())


PATHS = {
    # every byte through ZeroMQ sockets, rings cut into many small segments
    "sockets": {"MESH_CMA": "0", "MESH_SHM": "0", "MESH_CUDA_IPC": "0",
                "MESH_COLL_SEGMENT": "256", "MESH_COLL_WINDOW": "2"},
    # the defaults: the same-host board, cross-memory attach (collectives and
    # point-to-point), CUDA IPC
    "same-host": {},
}

_DEVICE = {"MESH_COLL_SMALL": "16"}   # all but the tiniest arrays take the device paths
BACKENDS = {"numpy": {}, "fakecupy": _DEVICE, "cupy": _DEVICE, "torch": {}}

SIZE = 4
COMMS: dict[str, tuple[int, ...] | None] = {
    "world": None,
    "reordered": (3, 0, 2),     # 3 of the 4 ranks, in another order; rank 1 stays out
}


def cells() -> list[Any]:
    out = []
    for (path, env), (name, benv), (comm, ranks) in itertools.product(
            PATHS.items(), BACKENDS.items(), COMMS.items()):
        cell = Cell(path, name, comm, SIZE, ranks, {**env, **benv})
        reason = backend(name).skip_reason()
        out.append(pytest.param(cell, id=f"{path}-{name}-{comm}",
                                marks=[pytest.mark.skip(reason=reason)] if reason else []))
    return out


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "cell" in metafunc.fixturenames:
        metafunc.parametrize("cell", cells())


def pytest_collection_finish(session: pytest.Session) -> None:
    """Freeze what collection imported (torch, every test module) and
    torch._dynamo (some 300,000 objects) out of the garbage collector's way,
    after one collection, as mesh.spawn's fork server does: each full
    collection in this process (Python's thresholds, and
    engine.calibrate.collected at each engine.distribute run here) scanned
    them all: 0.1 s of CPU at 214,000 objects, more once torch._dynamo is
    in; 3.6 s of wall in tests/test_engine_torch.py alone, under load; and
    processes forked from here (spawn's ranks of functions it cannot
    pickle) inherit the freeze. torch._dynamo only where collection
    imported torch: the first torch optimizer made here imports it anyway
    (README, "With PyTorch")."""
    if "torch" in sys.modules:
        try:
            import torch._dynamo  # noqa: F401
        except ImportError:
            pass
    gc.collect()
    gc.freeze()


_SPAWNS: dict[str, bool] = {}       # per test file: whether it calls mesh.spawn


def _spawns(item: pytest.Item) -> bool:
    path = str(item.path)
    if path not in _SPAWNS:
        try:
            _SPAWNS[path] = "spawn" in item.path.read_text()
        except OSError:
            _SPAWNS[path] = False
    return _SPAWNS[path]


def _warm_fork_server() -> None:
    """Start mesh.spawn's fork server and wait until it has imported what
    MESH_SPAWN_PRELOAD names (torch, torch._dynamo: 6-7 s of CPU, 30-60 s
    of wall on the 2-core machine under load 15-20), by forking one
    process of it that returns at once; at most 300 s, then the test pays
    the rest as before."""
    import threading
    ctx = importlib.import_module("mesh.spawn")._fresh_context()
    if ctx.get_start_method() != "forkserver":
        return

    def fork_one() -> None:
        p = ctx.Process(target=os.getpid, name="mesh-fork-server-warm")
        p.start()
        p.join(60)
    warm = threading.Thread(target=fork_one, name="mesh-fork-server-warm", daemon=True)
    warm.start()
    warm.join(300)


_warmed = False


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Any:
    """Before the run's first test of a file that spawns ranks, and outside
    its pytest-timeout (this wrapper is outside pytest-timeout's, whose
    timer covers setup, call and teardown): the fork server's preload. That
    test's own first ``mesh.spawn`` paid it within its timeout (a 60 s
    test's first spawn waited 60 s on it under load 17, and timed out),
    where the same test later in a run starts its ranks in milliseconds."""
    global _warmed
    if not _warmed and _spawns(item):
        _warmed = True
        _warm_fork_server()
    yield


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Remove the stand-in CuPy's device memory (tests/fakecupy.py: files in
    /dev/shm) that ranks which ended without running their finalizers
    (os._exit, a kill) left behind: each file names its process, and one
    whose process is gone is garbage."""
    try:
        names = os.listdir("/dev/shm")
    except OSError:
        return
    for name in names:
        if not name.startswith("fakecupy-"):
            continue
        try:
            os.kill(int(name.split("-")[1]), 0)
        except (ValueError, IndexError, OverflowError):
            continue
        except ProcessLookupError:
            try:
                os.unlink(os.path.join("/dev/shm", name))
            except OSError:
                pass
        except PermissionError:
            continue


def pytest_unconfigure(config: pytest.Config) -> None:
    """The bytecode ``_compile_the_tree`` made goes again (PYTHONDONTWRITEBYTECODE
    asked for none in the tree), with each __pycache__ folder it left empty."""
    for pyc in _COMPILED:
        try:
            os.unlink(pyc)
            os.rmdir(os.path.dirname(pyc))
        except OSError:
            pass
