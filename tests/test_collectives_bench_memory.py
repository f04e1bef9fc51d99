"""Smoke test of the peak-memory benchmark (python -m
collectives.tools.bench_memory): it runs, meshrun beside gloo, and prints
one sane row per op. No memory figure is checked against a bound."""
import re

import pytest

pytest.importorskip("torch")

from collectives.tools import bench_memory  # noqa: E402

CELL = r"\d+\.\d\d/\d+\.\d\d"


@pytest.mark.timeout(120)
def test_the_memory_benchmark_prints_a_row_per_op(capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # gloo's ranks forked from mesh.spawn's server, torch preloaded there (conftest):
    # fresh ones imported pytest and torch anew, 16 s of the test's 28 under load
    monkeypatch.setenv("MESH_BENCH_START", "server")
    assert bench_memory.main(["-n", "2", "--sizes", "1M", "--ops", "all_reduce,sendrecv",
                              "--frameworks", "meshrun,gloo", "--timeout", "60"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# bench_memory: 2 ranks"), out
    assert re.search(r"^#\s+op\s+size \|\s+meshrun\s+gloo \|\s+meshrun/gloo$", out, re.M), out
    for op in ("all_reduce", "sendrecv"):
        row = re.search(rf"^\s+{op}\s+1M \|\s+({CELL})\s+({CELL}) \|\s+(\S+)$", out, re.M)
        assert row is not None, out
        assert re.fullmatch(r"\d+\.\d\d|-|inf", row.group(3)), out
    assert "error" not in out, out
