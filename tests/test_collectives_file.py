"""collectives.File, parallel file I/O (MPI-IO) over POSIX pread and
pwrite: every call at 3 ranks in one spawn (numpy arrays, CPU tensors,
bytes; views, the ordered calls, sizes), every error raised on every rank
of a collective call naming the rank and the errno; collectives.MPI's
MPI.File under meshrun writes the file real mpi4py writes under mpirun,
byte for byte, and prints the same (where Open MPI and mpi4py are
installed)."""
from __future__ import annotations

import errno
import importlib.util
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from proctools import launch_env, run_in_session

import collectives as C
import mesh
from collectives import MPI

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tests" / "scripts" / "mpi4py_file.py"


def _raises(fn: Any, *words: str) -> C.FileError:
    try:
        fn()
    except C.FileError as e:
        for w in words:
            assert w in str(e), (w, str(e))
        return e
    raise AssertionError(f"no FileError: {words}")


def _every_call(world: Any, d: str) -> str:
    r, n = world.rank, world.size
    path = os.path.join(d, "a.bin")
    with C.File.open(world, path, "w") as f:
        assert f.size == 0
        f.set_view(8, np.float32)
        assert f.write_at_all(r * 4, np.arange(4, dtype=np.float32) + r) == 4
        assert f.write_at(0, b"") == 0
        f.sync()
        assert f.size == 8 + 4 * 4 * n
        out = np.empty(4, np.float32)
        assert f.read_at_all(((r + 1) % n) * 4, out) == 4
        assert out.tolist() == (np.arange(4) + (r + 1) % n).tolist()
        # ordered: each rank's after the ranks before it's, the next call after all of them
        f.set_view(8 + 16 * n, np.int16)
        assert f.write_ordered(np.full(r + 1, r, np.int16)) == r * (r + 1) // 2
        assert f.write_ordered(np.full(1, -1 - r, np.int16)) == n * (n + 1) // 2 + r
        f.set_view(8 + 16 * n, np.int16)
        back = np.empty(r + 1, np.int16)
        assert f.read_ordered(back) == r * (r + 1) // 2 and back.tolist() == [r] * (r + 1)
        # a short read: an error naming the rank, or what there is with partial=True
        end = (f.size - 8 - 16 * n) // 2
        e = _raises(lambda: f.read_at(end - 1, np.empty(3, np.int16)), "short read",
                    f"rank {r}:", "partial=True")
        assert e.rank == r
        part = np.zeros(3, np.int16)
        assert f.read_at(end - 1, part, partial=True) == 1 and part.tolist() == [-n, 0, 0]
        e = _raises(lambda: f.read_at_all(end - (r == 1), np.empty(1, np.int16)),
                    "read_at_all", "failed on ranks 0, 2", "short read")
        assert sorted(e.errors) == [0, 2] and e.rank == 0
        # offsets out of range, data that is no whole number of elements
        with pytest.raises(ValueError, match=f"rank {r}: offset -1 .* out of range"):
            f.write_at(-1, np.zeros(1, np.int16))
        with pytest.raises(ValueError, match="no whole number of the view's int16"):
            f.write_at(0, b"abc")
        _raises(lambda: f.write_at_all(-1 if r == 2 else 0, np.zeros(0, np.int16)),
                "write_at_all", "failed on rank 2:", "out of range")
        with pytest.raises(ValueError, match="not contiguous"):
            f.read_at(0, np.empty((2, 2), np.int16)[:, 0])
        # set_size, preallocate; a view that differs between ranks fails them all
        f.set_size(4)
        assert f.size == 4
        C.barrier(world)        # (before rank 0's preallocate grows it)
        f.preallocate(64)
        assert f.size == 64
        f.preallocate(16)
        assert f.size == 64
        _raises(lambda: f.set_view(0, np.int32 if r == 1 else np.int64), "set_view",
                "rank 1: passed")
    assert repr(f).endswith("closed>")
    f.close()
    with pytest.raises(ValueError, match=f"rank {r}: the file is closed"):
        f.write_at(0, b"x")
    # torch CPU tensors, mode "r" refusing writes, "r+" and "a", delete_on_close
    import torch
    with C.File.open(world, path, "r+") as f:
        f.set_view(0, np.float32)
        f.write_at_all(r * 2, torch.full((2,), float(r)))
        got = torch.zeros(2 * n)
        f.read_at_all(0, got)
        assert got.tolist() == [float(i // 2) for i in range(2 * n)]
    with C.File.open(world, path, "r") as f:
        with pytest.raises(ValueError, match="opened read-only"):
            f.write_at(0, b"x")
        _raises(lambda: f.write_ordered(b"x"), "write_ordered", "read-only")
    with C.File.open(world, path, "a", delete_on_close=True) as f:
        size = f.size
        assert f.write_ordered(bytes([r])) == size + r
        C.barrier(world)
        assert f.size == size + n
    assert not os.path.exists(path)
    # opening: missing, on one rank only (a file another host does not see), "x" on one there
    e = _raises(lambda: C.File.open(world, path, "r"), "File.open", "No such file",
                "errno 2 ENOENT", "failed on ranks 0, 1, 2")
    assert e.errno == errno.ENOENT
    C.File.open(world, path, "w").close()
    e = _raises(lambda: C.File.open(world, path if r != 1 else path + ".not", "r+"),
                "failed on rank 1:", "errno 2 ENOENT")
    assert e.rank == 1 and e.errors[1][0] == errno.ENOENT
    _raises(lambda: C.File.open(world, path, "x"), "failed on rank 0:", "making it",
            "EEXIST")
    _raises(lambda: C.File.open(world, path, "r" if r else "r+"), "rank 1: passed 'r'")
    with pytest.raises(ValueError, match="mode 'rw'"):
        C.File.open(world, path, "rw")
    # a group of one (each rank its own file); an error in a with block closes it
    own = MPI.COMM_SELF.mesh
    with pytest.raises(KeyError):
        with C.File.open(own, f"{path}.{r}", "w", delete_on_close=True) as f:
            raise KeyError("mine")
    assert repr(f).endswith("closed>")
    os.unlink(f"{path}.{r}")
    C.barrier(world)
    if r == 0:
        C.File.delete(path)
        _raises(lambda: C.File.delete(path), "delete", "ENOENT")
    # collectives.MPI's File, where mpirun is not there to compare with
    comm = MPI.COMM_WORLD
    fh = MPI.File.Open(comm, path, MPI.MODE_CREATE | MPI.MODE_RDWR)
    fh.Set_view(0, MPI.INT, MPI.INT)
    fh.Write_at_all(r, np.array([r], "i"))
    fh.Seek(r)
    x = np.empty(1, "i")
    fh.Read(x)
    assert x.tolist() == [r] and fh.Get_position() == r + 1 and fh.Get_size() == 4 * n
    with pytest.raises(NotImplementedError, match="strided"):
        fh.Set_view(0, MPI.INT, MPI.DOUBLE)
    with pytest.raises(NotImplementedError, match="Write_at_all .blocking."):
        fh.Iwrite_at_all
    with pytest.raises(NotImplementedError, match="Write_ordered"):
        fh.Write_shared
    fh.Close()
    with pytest.raises(MPI.Exception, match="MODE_RDONLY without MODE_CREATE") as x_:
        MPI.File.Open(comm, path, MPI.MODE_RDONLY | MPI.MODE_CREATE)
    assert x_.value.Get_error_class() == MPI.ERR_AMODE
    C.barrier(world)
    if r == 0:
        MPI.File.Delete(path)
    MPI.Finalize()
    return "ok"


def test_every_file_call_at_three_ranks(tmp_path: Path) -> None:
    """(3 ranks: every call and error path in one spawn)"""
    assert mesh.spawn(_every_call, 3, str(tmp_path), timeout=90,
                      env={"MESH_TIMEOUT": "30"}) == ["ok"] * 3
    assert os.listdir(tmp_path) == []


def test_mpi4py_file_program_writes_mpi4pys_bytes(tmp_path: Path) -> None:
    """tests/scripts/mpi4py_file.py (a header, each rank's slice by
    Write_at_all under a view, Write_ordered twice, Read_at_all,
    Read_ordered, a short Read_at's count, Seek and Read, Preallocate,
    Set_size, MODE_EXCL and a missing file's error classes, MODE_APPEND,
    MODE_DELETE_ON_CLOSE, Delete) with ``from collectives import MPI``
    under ``meshrun -n 3``; its output and file are real mpi4py's under
    ``mpirun -n 3``, byte for byte, where both are installed. (5-8 s)"""
    text = SCRIPT.read_text()
    assert text.count("from mpi4py import MPI\n") == 1
    ported = tmp_path / "ported.py"
    ported.write_text(text.replace("from mpi4py import MPI\n", "from collectives import MPI\n"))
    code, out = run_in_session([sys.executable, "-m", "mesh.launch", "-n", "3", str(ported),
                                str(tmp_path / "mine.bin")], launch_env(ROOT), 90, cwd=ROOT)
    assert code == 0, out
    mine = "".join(ln[4:] + "\n" for ln in out.splitlines() if ln.startswith("[0] "))
    assert mine.endswith("ALL OK 3\n") and "sha256 184 " in mine, out
    if shutil.which("mpirun") is None or importlib.util.find_spec("mpi4py") is None:
        pytest.skip("Open MPI's mpirun or mpi4py is not installed: compared with nothing")
    code, real = run_in_session(["mpirun", "--oversubscribe", "--bind-to", "none", "--mca", "btl",
                                 "self,tcp", "-n", "3", sys.executable, str(SCRIPT),
                                 str(tmp_path / "real.bin")], launch_env(ROOT), 90, cwd=ROOT)
    assert code == 0, real
    assert mine == real, f"meshrun:\n{mine}\nmpirun:\n{real}"
    assert (tmp_path / "mine.bin").read_bytes() == (tmp_path / "real.bin").read_bytes()
