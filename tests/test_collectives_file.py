"""collectives.File, parallel file I/O (MPI-IO) over POSIX pread and
pwrite: every call at 3 ranks in one spawn (numpy arrays, CPU tensors,
bytes; views, strided views, the ordered calls, sizes; collectives.MPI's
nonblocking, split and shared pointer calls), every error raised on every
rank of a collective call naming the rank and the errno; the filetypes'
mapping as pure functions; collectives.MPI's MPI.File under meshrun
writes the files real mpi4py writes under mpirun, byte for byte, and
prints the same, at 3 and 4 ranks (where Open MPI and mpi4py are
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
VIEWS = ROOT / "tests" / "scripts" / "mpi4py_fileview.py"


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
    fh.Set_view(0, MPI.INT, MPI.DOUBLE)        # (a filetype of two etypes: contiguous)
    assert fh.Get_view()[0] == 0 and fh.Get_view()[3] == "native"
    _mpi_views(fh, r, n)
    fh.Close()
    with pytest.raises(MPI.Exception, match="MODE_RDONLY without MODE_CREATE") as x_:
        MPI.File.Open(comm, path, MPI.MODE_RDONLY | MPI.MODE_CREATE)
    assert x_.value.Get_error_class() == MPI.ERR_AMODE
    C.barrier(world)
    if r == 0:
        MPI.File.Delete(path)
    MPI.Finalize()
    return "ok"


def _mpi_raises(fn: Any, cls: int, *words: str) -> None:
    try:
        fn()
    except MPI.Exception as e:
        assert e.Get_error_class() == cls, (cls, str(e))
        for w in words:
            assert w in str(e), (w, str(e))
        return
    raise AssertionError(f"no MPI.Exception: {words}")


def _mpi_views(fh: Any, r: int, n: int) -> None:
    """MPI.File's strided views, nonblocking and split calls: what the
    mpirun comparison (tests/scripts/mpi4py_fileview.py) cannot show, the
    errors (Open MPI's differ or are none) and the orders of waits."""
    comm = MPI.COMM_WORLD
    D = MPI.DOUBLE
    vec = D.Create_vector(3, 1, 2).Commit()         # data at 0, 16, 32 of an extent of 40
    # every rank's view checked, and a bad one on one rank raised on all of them
    _mpi_raises(lambda: fh.Set_view(-8 if r == 1 else 0, D, vec), MPI.ERR_ARG,
                "set_view", "failed on rank 1:", "displacement -8")
    _mpi_raises(lambda: fh.Set_view(0, D, MPI.INT.Create_vector(3, 1, 2).Commit()),
                MPI.ERR_ARG, "no whole number of the view's 8-byte etype")
    _mpi_raises(lambda: fh.Set_view(0, D, D.Create_indexed([1, 1], [3, 0]).Commit()),
                MPI.ERR_TYPE, "displacements decrease")
    _mpi_raises(lambda: fh.Set_view(0, D, D.Create_indexed([2, 2], [0, 1]).Commit()
                                    if r == 2 else vec), MPI.ERR_TYPE, "failed on rank 2",
                "overlaps itself", "opened for writing")
    _mpi_raises(lambda: fh.Set_view(0, D, D.Create_vector(2, 1, 2)), MPI.ERR_TYPE,
                "not committed")
    _mpi_raises(lambda: fh.Set_view(0, D.Create_vector(2, 1, 2).Commit(), D), MPI.ERR_ARG,
                "etype", "holes")
    # each rank's vector view from its own displacement, the ranks' data interleaved:
    # offsets count its data's doubles
    fh.Set_size(0)
    mine = D.Create_vector(3, 1, n).Create_resized(0, 8 * 3 * n).Commit()
    fh.Set_view(8 * r, D, mine)
    assert fh.Get_byte_offset(4) == 8 * r + 8 * 3 * n + 8 * n
    fh.Write_all(np.arange(6.0) + 10 * r)           # two tiles each
    fh.Sync()
    comm.Barrier()
    fh.Set_view(0, D, D)
    whole = np.empty(fh.Get_size() // 8)
    fh.Read_at_all(0, whole)
    want = np.zeros(6 * n)
    for k in range(n):
        for j in range(6):
            want[k + n * (j % 3) + 3 * n * (j // 3)] = j + 10 * k
    assert whole.tolist() == want.tolist()
    # a read through a view past the end: what there is; SEEK_END: the view's data before it
    fh.Set_view(8 * r, D, mine)
    st = MPI.Status()
    back = np.zeros(8)
    fh.Read_at(0, back, st)
    assert st.Get_count(D) == 6 and back[:6].tolist() == (np.arange(6.0) + 10 * r).tolist()
    fh.Seek(0, MPI.SEEK_END)
    assert fh.Get_position() == 6
    # a derived etype (a pair of doubles): offsets count pairs
    pair = D.Create_contiguous(2).Commit()
    fh.Set_view(16 * 4 * r, pair, pair.Create_vector(2, 1, 2).Commit())
    assert fh.Get_byte_offset(1) == 16 * 4 * r + 32 and fh.Get_type_extent(pair) == 16
    fh.Write_at(0, np.arange(4.0) + r, st)
    assert st.Get_count(pair) == 2 and st.Get_count(D) == 4
    twice = np.zeros(4)
    fh.Read_at(0, twice)
    assert twice.tolist() == (np.arange(4.0) + r).tolist()
    fh.Set_view(8 * r, D, mine)
    # nonblocking collectives waited in other orders and across a Barrier: none waits
    a = fh.Iwrite_at_all(0, np.full(3, 1.0 * r))
    b = fh.Iread_at_all(3, back[:3])
    if r == 0:
        comm.Barrier()
        MPI.Request.Waitall([b, a])
    else:
        a.Wait()
        comm.Barrier()
        assert b.Test()
    # an error on one rank raised by every rank's Wait
    bad = fh.Iwrite_at_all(-1 if r == 1 else 0, np.zeros(1))
    _mpi_raises(bad.Wait, MPI.ERR_ARG, "Iwrite_at_all", "failed on rank 1:", "out of range")
    odd = fh.Iwrite_at_all(0, np.zeros((2, 2))[:, 0] if r == 0 else np.zeros(1))
    _mpi_raises(odd.Wait, MPI.ERR_ARG, "failed on rank 0:", "not contiguous")
    # Close refused on every rank while a rank's request is not completed
    pending = fh.Iread_at(0, back) if r == 2 else None
    _mpi_raises(fh.Close, MPI.ERR_PENDING, "failed on rank 2:", "Iread_at", "Wait")
    if pending is not None:
        pending.Wait()
    # split collectives: one at a time, its end matching its begin
    fh.Write_all_begin(np.zeros(1))
    _mpi_raises(lambda: fh.Read_all_begin(back), MPI.ERR_OTHER, "Write_all_begin is not "
                "ended")
    _mpi_raises(fh.Close, MPI.ERR_PENDING, "1 call(s)", "(Write_all_begin)")
    _mpi_raises(lambda: fh.Read_all_end(back), MPI.ERR_OTHER, "no Read_all_begin to end")
    fh.Write_all_end(None)
    _mpi_raises(lambda: fh.Write_all_end(None), MPI.ERR_OTHER, "none is active")
    # the shared pointer: each rank's write at its own place, whatever the order
    fh.Set_view(0, MPI.INT, MPI.INT)
    fh.Set_size(0)
    fh.Write_shared(np.full(2, r, "i"))
    comm.Barrier()
    assert fh.Get_position_shared() == 2 * n, fh.Get_position_shared()
    fh.Seek_shared(0)
    got = np.zeros(2 * n, "i")
    if r == 0:
        fh.Read_shared(got)
        assert sorted(got.tolist()) == sorted([k for k in range(n) for _ in range(2)])
    comm.Barrier()
    _mpi_raises(lambda: fh.Seek_shared(-1), MPI.ERR_ARG, "failed on rank 0:", "out of range")
    with pytest.raises(NotImplementedError, match="datarep 'external32'"):
        fh.Set_view(0, D, D, "external32")


def test_file_views_map_data_to_the_files_runs() -> None:
    """collectives.fileview, pure: a vector filetype's runs, byte offsets
    (as Open MPI's Get_byte_offset gives them), where the file's end falls,
    adjacent runs merged, and the filetypes MPI refuses."""
    from collectives.fileview import Filetype
    vec = Filetype.of(np.array([0, 16, 32]), 8, 40)
    assert [vec.byte_of(8 * k) + 16 for k in range(7)] == [16, 32, 48, 56, 72, 88, 96]
    starts, lengths = vec.runs(8, 32)
    assert starts.tolist() == [16, 32, 56] and lengths.tolist() == [8, 16, 8]
    assert vec.data_before(48) == 32 and vec.data_before(0) == 0
    whole = Filetype.of(np.arange(10) * 4, 4, 40)
    assert whole.contiguous and [x.tolist() for x in whole.runs(4, 100)] == [[4], [100]]
    assert "decrease" in str(Filetype.of(np.array([24, 0]), 8, 32).problem(False))
    assert Filetype.of(np.array([0, 8, 8]), 8, 32).problem(False) is None
    assert "overlaps" in str(Filetype.of(np.array([0, 8, 8]), 8, 32).problem(True))
    assert "negative" in str(Filetype.of(np.array([-8, 0]), 8, 32).problem(False))
    assert "more than its extent" in str(Filetype.of(np.array([0, 8]), 8, 8).problem(True))


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
    MODE_DELETE_ON_CLOSE, Delete), then tests/scripts/mpi4py_fileview.py
    in the same job (a 2-D array over a process grid written through
    subarray views, read back through row-cyclic, vector and indexed views
    by nonblocking and split collective calls; the shared file pointer),
    with ``from collectives import MPI`` under ``meshrun -n 3``; its output
    and files are real mpi4py's under ``mpirun -n 3``, byte for byte, where
    both are installed. (5-8 s)"""
    mine = _compare(tmp_path, [SCRIPT, VIEWS], 3)
    assert "sha256 184 " in mine and "sha256 1236 " in mine, mine


def test_mpi4py_file_views_at_four_ranks(tmp_path: Path) -> None:
    """tests/scripts/mpi4py_fileview.py at 4 ranks (a 2 x 2 process grid):
    real mpi4py's output and file under mpirun, byte for byte. (3-5 s)"""
    mine = _compare(tmp_path, [VIEWS], 4)
    assert "grid 2 2\n" in mine and "sha256 1264 " in mine, mine


def _compare(tmp_path: Path, scripts: list[Path], n: int) -> str:
    """The scripts, one after another, as one program: rank 0's output
    under meshrun (``from collectives import MPI``), checked against
    mpirun's and its files against mpirun's where both are installed."""
    texts = [p.read_text() for p in scripts]
    assert all(t.count("from mpi4py import MPI\n") == 1 for t in texts)
    both = tmp_path / "both.py"
    both.write_text("\n".join(texts))
    ported = tmp_path / "ported.py"
    ported.write_text(both.read_text().replace("from mpi4py import MPI\n",
                                               "from collectives import MPI\n"))
    code, out = run_in_session([sys.executable, "-m", "mesh.launch", "-n", str(n), str(ported),
                                str(tmp_path / "mine.bin")], launch_env(ROOT), 90, cwd=ROOT)
    assert code == 0, out
    mine = "".join(ln[4:] + "\n" for ln in out.splitlines() if ln.startswith("[0] "))
    assert mine.endswith(f"ALL OK {n}\n") and mine.count("ALL OK") == len(scripts), out
    if shutil.which("mpirun") is None or importlib.util.find_spec("mpi4py") is None:
        pytest.skip("Open MPI's mpirun or mpi4py is not installed: compared with nothing")
    code, real = run_in_session(["mpirun", "--oversubscribe", "--bind-to", "none", "--mca", "btl",
                                 "self,tcp", "-n", str(n), sys.executable, str(both),
                                 str(tmp_path / "real.bin")], launch_env(ROOT), 90, cwd=ROOT)
    assert code == 0, real
    assert mine == real, f"meshrun:\n{mine}\nmpirun:\n{real}"
    for end in ([".bin"] if SCRIPT in scripts else []) + [".bin.view"]:
        assert (tmp_path / f"mine{end}").read_bytes() == (tmp_path / f"real{end}").read_bytes()
    return mine
