"""Smoke tests of the entry points: engine.bench and the flagship example.
Nothing here is timed; the figures are only checked for shape."""
import os
import subprocess
import sys

import pytest

import mesh
from engine import Schedule
from engine.bench import SleepStage, run_meshrun

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_reports_every_schedule():
    report = run_meshrun(["1f1b", "zb-h1"], p=2, m=2, f=0.001, b=0.002, chunks=1, steps=1,
                         rows=4, width=8)
    assert [r["schedule"] for r in report] == ["1f1b(2,2)", "zero_bubble_h1(2,2)"]
    for r in report:
        assert r["measured_ms"] > 0 and r["predicted_ms"] > 0
        assert 0 <= r["predicted_bubble"] < 1
        assert any(e["ph"] == "s" for e in r["trace"]["traceEvents"])


def test_sleep_stage_passes_data_through():
    stage = SleepStage({"F": 0.0, "B": 0.0, "I": 0.0, "W": 0.0})
    y, ctx = stage.forward([1, 2])
    assert y == [1, 2] and stage.backward(ctx, 3) == 3
    assert stage.backward_input(ctx, 4) == (4, None) and stage.grads() == []


def test_flagship_example_trains_and_writes_a_trace(tmp_path):
    """With a schedule of a user's own, saved as JSON (--schedule took a
    built-in's name only; make demo runs the default, 1f1b): 1F1B whose
    rank 0 runs a forward more before its first backward."""
    trace = tmp_path / "t.trace.json"
    own = Schedule.build([["0F0", "0F1", "0F2", "0B0", "0F3", "0B1", "0B2", "0B3"],
                          ["1F0", "1B0", "1F1", "1B1", "1F2", "1B2", "1F3", "1B3"]],
                         4, [0, 1], name="deeper")
    (tmp_path / "own.json").write_text(own.to_json())
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-m", "mesh.launch", "-n", "4",
         os.path.join(ROOT, "examples", "train_pipeline.py"), "--steps", "3",
         "--trace", str(trace), "--schedule", "own.json"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "deeper on dp=2 x pp=2:" in proc.stdout and "0 | 0F0 0F1 0F2 " in proc.stdout, \
        proc.stdout
    assert "step   2  loss" in proc.stdout
    assert trace.exists()


@pytest.mark.timeout(600)
@pytest.mark.parametrize("script,out", [
    # 8 torch processes: about 30 s of CPU on two cores, so outside CI's suite
    # (the 8-rank torch path is tested by test_engine_tp_pipeline's dp2 x pp2 x
    # tp2); run it with MESH_TEST_SCALE=1, as the 32-rank battery
    pytest.param("train_3d.py", "m.pt", marks=[pytest.mark.slow, pytest.mark.skipif(
        os.environ.get("MESH_TEST_SCALE", "") in ("", "0"),
        reason="8 torch ranks: run with MESH_TEST_SCALE=1")]),
    ("train_3d_numpy.py", "m.npz"),
])
def test_3d_example_trains_saves_and_reloads(tmp_path, script, out):
    """8 ranks (dp=2 x pp=2 x tp=2) through engine.distribute; the example
    itself asserts that the reloaded model's loss equals the distributed one."""
    if script == "train_3d.py":
        pytest.importorskip("torch")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               MESH_PEER_TIMEOUT="60")     # 8 processes on two loaded cores starve
    proc = subprocess.run(
        [sys.executable, "-m", "mesh.launch", "-n", "8", os.path.join(ROOT, "examples", script),
         "--steps", "2", "--out", str(tmp_path / out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=580)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "<- chosen" in proc.stdout and "0 | 0F0" in proc.stdout
    assert "step   1  loss" in proc.stdout and "one process on the reloaded model" in proc.stdout
    assert "re-timed as its steps will run" in proc.stdout      # distribute's job.predicted
    assert "steps took" in proc.stdout and "predicted" in proc.stdout.split("steps took")[-1]
    assert (tmp_path / out).exists()


def _run_example(world, name, args):
    """Rank ``world.rank`` runs examples/``name`` as its own ``__main__``
    (its ``mesh.init()`` takes the spawned rank's place in the mesh, closed
    first: a process has one mesh of a job open at a time): its standard
    output."""
    import contextlib
    import io
    import runpy
    world.close()
    buf, argv = io.StringIO(), sys.argv
    sys.argv = [name, *args]
    try:
        with contextlib.redirect_stdout(buf):
            runpy.run_path(os.path.join(ROOT, "examples", name), run_name="__main__")
    finally:
        sys.argv = argv
    return buf.getvalue()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("extra,shows", [
    ([], ["grid {'dp': 2, 'tp': 2}", "holds 2 of 4 heads"]),
    (["--pp", "2", "--schedule", "1f1b"], ["grid {'dp': 1, 'pp': 2, 'tp': 2}",
                                           "chosen: 1f1b(2,"]),
])
def test_nanogpt_example_trains_tensor_parallel_saves_and_reloads(tmp_path, extra, shows):
    """nanoGPT's model as written, dp=2 x tp=2 (parallelize) and pp=2 x
    tp=2 (distribute on the GPT itself, traced; the tie across the stages),
    the example script unchanged on 4 ranks; the example asserts that the
    reloaded model's loss equals the distributed one. (Its ranks come from
    mesh.spawn, torch preloaded: under meshrun each rank imported torch
    itself, 8-11 s of the 2-core machine's a run; meshrun runs the flagship
    and the 3-D examples above.)"""
    pytest.importorskip("torch")
    out = mesh.spawn(_run_example, 4, "nanogpt_tp.py",
                     ["--steps", "2", "--out", str(tmp_path / "g.pt"), *extra], timeout=280)
    text = "".join(out)         # (as meshrun relays them)
    assert all(s in text for s in shows), text
    # rank 0 prints the loss (job.step returns it on every rank, a pp job's first stage too)
    assert "step   1  loss" in out[0] and "one process on the reloaded model" in out[0]
    assert "step   1  loss" not in "".join(out[1:]), out[1:]
    assert (tmp_path / "g.pt").exists()


def test_balance_bench_reports_each_balance():
    from engine.bench_distribute import balance_table, run_balance
    report = run_balance(width=16, rows=16, m=2, steps=1, rounds=2)
    assert [r["balance"] for r in report] == ["time", "uniform", "parameters", "time"]
    assert [r["counts"] for r in report[1:3]] == [(3, 4), (1, 6)]
    assert all(r["predicted_ms"] > 0 and r["measured_ms"] > 0 and r["summed_ms"] > 0
               for r in report)
    assert "meas/pred" in balance_table(report) and "meas/summed" in balance_table(report)
    # the steps taken apart as the simulator's figures; each round re-timed before its steps
    # (the compute ratio is None where the prediction's compute less its
    # per-action cost is not positive: layers of microseconds on a loaded host)
    for r in report:
        st = r["in_step"]
        assert st["simulated"] > 0 and (st["compute"] is None or st["compute"] > 0), r
        assert len(r["rounds"]) == 2 and all(x > 0 for x in r["rounds"]), r
        assert len(st["stretch"]) == 2, r
    assert "meas/sim" in balance_table(report) and "by round" in balance_table(report)


def test_stage_overrun_reports_each_kind_per_stage():
    from engine.bench_distribute import stage_overrun
    (span, ratios), = stage_overrun(width=16, rows=4, rounds=1, spans=((0, 2),))
    assert span == (0, 2) and sorted(ratios) == ["B", "F", "I", "W"]
    assert all(v > 0 for v in ratios.values())


def _bench_memory(capsys, *args):
    """``python -m engine.bench_memory ARGS``' output, and whether glibc
    tells the live heap (its sections that sample it say so)."""
    from engine import bench_memory
    bench_memory.main(list(args))
    return capsys.readouterr().out, bench_memory._live_bytes() is not None


@pytest.mark.timeout(120)
def test_bench_memory_runs(capsys):
    pytest.importorskip("torch")
    out, glibc = _bench_memory(capsys, "--rows", "64", "--width", "8", "--depth", "1",
                               "--steps", "1", "--microbatches", "2", "--schedules", "1f1b",
                               "--limit", "1", "--only", "recompute,stages,tuples")
    assert "1f1b(2,2)              recompute" in out and "tuples: 1F1B(2,4)" in out
    # (each rank's live heap over a step, where glibc tells it)
    assert "live heap's most in a step" in out or not glibc
    assert "1f1b(2,2) recompute={0}" in out


def test_bench_memory_held_runs_on_transformer_blocks(capsys):
    pytest.importorskip("torch")
    out, _ = _bench_memory(capsys, "--model", "blocks", "--rows", "8", "--seq", "4",
                           "--width", "16", "--depth", "1", "--microbatches", "2",
                           "--only", "held", "--selective", "*.self_attn")
    assert "  keep " in out and "  recompute " in out and "  *.self_attn " in out
    assert "  by layer " in out and "  by 2 layers " in out and "through the backwards" in out
    assert out.count("predicted") >= 5


def test_bench_memory_runs_on_numpy_stages(capsys):
    """--model numpy: engine.layers stages recompute (engine.layers.Recompute);
    under a limit nothing keeping fits, the keep-only way says so."""
    out, glibc = _bench_memory(capsys, "--model", "numpy", "--rows", "64", "--width", "8",
                               "--depth", "2", "--steps", "1", "--microbatches", "2",
                               "--schedules", "gpipe", "--limit", "0.0001",
                               "--only", "recompute,limit,stages,held")
    assert "gpipe(2,2)             recompute" in out and "gpipe(2,2) recompute={0}" in out
    assert "live heap's most in a step" in out or not glibc
    assert "recompute=False   no schedule keeps its activations" in out
    assert "  keep " in out and "  recompute " in out
