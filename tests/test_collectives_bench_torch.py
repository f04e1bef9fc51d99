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
