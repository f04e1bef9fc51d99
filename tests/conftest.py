"""The matrix the collective battery runs over (tests/test_collectives.py):
transport path x array backend x communicator, each cell one ``mesh.spawn``.
A test that takes a ``cell`` argument is run once per cell; a cell whose
backend is missing here (real CuPy without a GPU) is skipped, saying why.
"""
from __future__ import annotations

import itertools
import os
from typing import Any

import pytest

from backends import Cell, backend

# mesh.spawn's fork server imports these once: every rank imports its test
# module, and with it pytest and the packages; and torch (3.5 s of CPU per
# import on the 2-core machine, so 30 s for an 8-rank torch test) and
# torch._dynamo (2.9 s more, imported by DDP and fully_shard) where torch is
# installed (the fork server skips a module that does not import)
os.environ.setdefault("MESH_SPAWN_PRELOAD", "pytest,collectives,engine,torch,torch._dynamo")

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
