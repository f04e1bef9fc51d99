"""Smoke test of the torch benchmark (python -m collectives.tools.bench_torch):
every section it was asked for prints, meshrun beside gloo. Nothing is
timed against a figure."""
import re

import pytest

pytest.importorskip("torch")

from collectives.tools import bench_torch  # noqa: E402


def test_the_torch_benchmark_reports_every_section(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_torch.main(["-n", "2", "--sizes", "8", "--models", "1M", "--reps", "1",
                             "--steps", "1", "--warmup", "1", "--floor", "--overlap"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^\s+8 \|", out, re.M), out                      # the all_reduce row
    assert "DDP   1M step ms: meshrun" in out and "floor/gloo" in out, out
    for side in ("meshrun", "gloo"):
        line = re.search(rf"DDP   1M overlap +{side}: backward +([\d.]+) ms, (\d+) buckets' "
                         rf"all-reduces +([\d.]+) ms", out)
        assert line is not None, out
        assert float(line.group(1)) > 0 and int(line.group(2)) >= 1 and float(line.group(3)) > 0


def test_the_torch_benchmark_times_each_call_against_the_direct_one(
        capsys: pytest.CaptureFixture[str]) -> None:
    """``--ops``: a row per call and size, the backend's time beside the
    direct call's and the floor's (torch's front end around the direct call)."""
    ops = ["all_reduce", "all_gather", "reduce_scatter_tensor", "all_to_all_single_uneven",
           "scatter", "send_recv", "all_reduce_async"]
    assert bench_torch.main(["-n", "2", "--sizes", "", "--models", "", "--ops", ",".join(ops),
                             "--op-sizes", "8", "--reps", "1", "--max-iters", "3",
                             "--floor"]) == 0
    out = capsys.readouterr().out
    for op in ops:
        row = re.search(rf"^\s+{op}\s+8 \|\s+([\d.]+)\s+([\d.]+) \|[\d.\s]+\|\s+([\d.]+)",
                        out, re.M)
        assert row is not None and all(float(x) > 0 for x in row.groups()), out
    with pytest.raises(SystemExit):
        bench_torch.main(["--ops", "all_reduce,nope"])


def test_the_torch_benchmark_tells_each_sides_cpu_thread_by_thread(
        capsys: pytest.CaptureFixture[str]) -> None:
    """``--cpu``: per DDP side a line of its CPU per step, the main thread's
    beside meshrun's lane (on meshrun) and gloo's threads (on gloo). (A
    side's line may hold a little of another's threads: its barrier, a lane
    or gloo thread winding down.)"""
    assert bench_torch.main(["-n", "2", "--sizes", "", "--models", "1M", "--reps", "1",
                             "--steps", "2", "--warmup", "1", "--floor", "--cpu"]) == 0
    out = capsys.readouterr().out
    lines = {}
    for side in ("meshrun", "gloo", "floor", "local"):
        line = re.search(rf"DDP   1M cpu ms/step +{side}: +([\d.]+) = main ([\d.]+)(.*)\(waited",
                         out)
        assert line is not None, out
        total, main = float(line.group(1)), float(line.group(2))
        assert total >= main > 0, out
        lines[side] = line.group(3)
    assert "lane" in lines["meshrun"] and "gloo" in lines["gloo"], out
