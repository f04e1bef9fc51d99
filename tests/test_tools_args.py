"""The command-line tools refuse nonsense options with a usage line that
names the option and what it takes, before they start any process: no
traceback from deep inside a run, no half-run benchmark."""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

CASES = [
    ("mesh.bench", ["--sizes", "abc"], "not a size: 'abc'"),
    ("mesh.bench", ["--sizes", "8K:1K"], "LO:HI with 1 <= LO <= HI"),
    ("mesh.bench", ["--ranks", "0,8"], "argument --ranks: '0': a whole number of at least 1"),
    ("collectives.tools.bench", ["-n", "0"], "argument -n/--nprocs: '0'"),
    ("collectives.tools.bench", ["--dtype", "bogus"], "data type 'bogus' not understood"),
    ("collectives.tools.bench", ["--factor", "1"], "a factor of at least 2"),
    ("collectives.tools.bench", ["--sizes", "1,0"], "sizes of at least 1 byte"),
    ("collectives.tools.bench", ["--op", "broadcast", "--poll"], "--poll: all_reduce only"),
    ("collectives.tools.bench_torch", ["--models", "1M,bogus"], "'bogus' is not one"),
    ("collectives.tools.bench_torch", ["-n", "two"], "argument -n/--nprocs: 'two'"),
    ("collectives.tools.bench_torch", ["--steps", "0"], "argument --steps: '0'"),
    ("collectives.tools.bench_memory", ["--ops", "all_reduce,bogus"], "'bogus' is not one"),
    ("collectives.tools.bench_memory", ["--frameworks", "nccl"], "'nccl' is not one"),
    ("collectives.tools.bench_memory", ["-n", "1,2"], "at least 2 ranks"),
    ("collectives.tools.bench_memory", ["--sizes", "1,0"], "sizes of at least 1 byte"),
    ("engine.bench", ["--steps", "0"], "argument --steps: '0': a whole number of at least 1"),
    ("engine.bench", ["--F", "-1"], "argument --F: '-1': a number of at least 0"),
    ("engine.bench", ["--schedules", "1f1b,bogus"], "unknown schedule 'bogus'"),
    ("engine.bench", ["--rows", "4", "-m", "8"], "fewer rows than the 8 micro-batches"),
    ("engine.bench_memory", ["--only", "bogus"], "'bogus' is not one"),
    ("engine.bench_memory", ["--schedules", "x"], "unknown schedule 'x'"),
    ("engine.show", ["1f1b", "4", "8", "--costs", "F=abc"], "costs are KEY=NUMBER"),
    ("engine.show", ["1f1b", "4", "8", "--costs", "X=1"], "unknown cost keys ['X']"),
    ("engine.show", ["1f1b", "4", "8", "--costs", "F=-1"], "is negative"),
    ("engine.show", ["1f1b", "0", "8"], "argument p: '0'"),
    ("engine.show", ["1f1b"], "give both p and m after the schedule name"),
    ("engine.show", ["zb-v", "2"], "e.g. python -m engine.show zb-v 4 8"),
    ("engine.show", ["1f1b", "2", "2", "--cores", "0"], "argument --cores: '0': a number above 0"),
    ("collectives.model.__main__", ["--predict", "--ranks", "abc"],
     "argument --ranks: 'abc': a whole number of at least 1"),
    ("collectives.model.__main__", ["--predict", "--hosts", "0"], "argument --hosts: '0'"),
    ("collectives.model.__main__", ["--predict", "--ranks", "8", "--hosts", "3"],
     "--ranks 8 is not a multiple of --hosts 3"),
    ("collectives.model.__main__", ["--predict", "--ranks", "2,4"], "takes one total, not 2"),
    ("collectives.model.__main__", ["--predict", "--link", "fast"],
     "argument --link: 'fast': a link speed above 0"),
    ("collectives.model.__main__", ["--predict", "--wire-us", "-1"],
     "argument --wire-us: '-1': a number of at least 0"),
    ("collectives.model.__main__", ["--predict", "--factor", "1"], "a factor of at least 2"),
    ("collectives.model.__main__", ["--predict", "--sizes", "zz"], "not a size: 'zz'"),
    ("collectives.model.__main__", ["--check", "--trials", "0"], "argument --trials: '0'"),
    ("collectives.model.__main__", ["--check", "--from", "/no/such/rows"],
     "argument --from: /no/such/rows: no such file"),
]


@pytest.mark.parametrize("module,argv,said", CASES)
def test_a_nonsense_option_is_a_usage_error(module: str, argv: list[str], said: str,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    main = importlib.import_module(module).main
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert said in err and "Traceback" not in err, err


def test_sizes_print_as_the_tools_take_them() -> None:
    """mesh.cliargs.size_text, the tools' one way to print a size (mesh.bench,
    bench_memory and bench_hosts each had their own; bench_hosts' had no G):
    what it prints, parse_size (--sizes) reads back."""
    from mesh.cliargs import size_text
    from mesh.peer import parse_size
    said = {8: "8", 1000: "1000", 1536: "1536", 4096: "4K", 3 << 20: "3M", 1 << 30: "1G",
            3 << 30: "3G"}
    assert {n: size_text(n) for n in said} == said
    assert all(parse_size(text) == n for n, text in said.items())


@pytest.mark.parametrize("text,said", [
    (None, "nor a file it can read (No such file or directory)"),
    ("{", "is not JSON"),
    ("[1, 2]", "neither a schedule (Schedule.to_json"),
])
def test_engine_show_names_a_file_it_cannot_show(tmp_path: Path, text: str | None,
                                                 said: str) -> None:
    from engine.show import main
    path = tmp_path / "s.json"
    if text is not None:
        path.write_text(text)
    with pytest.raises(SystemExit) as stop:
        main([str(path)])
    assert said in str(stop.value.code), stop.value.code


ROOT = str(Path(__file__).resolve().parents[1])


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", *argv], cwd=ROOT, env=env, text=True,
                          capture_output=True, timeout=60)


@pytest.mark.timeout(60)
def test_the_model_cli_says_usage_not_a_traceback() -> None:
    """``python -m collectives.model --predict --ranks abc`` (and --hosts 0,
    --link fast ...) ended in a ValueError's or ZeroDivisionError's traceback."""
    r = _run("collectives.model", "--predict", "--ranks", "abc")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("usage: python -m collectives.model"), r.stderr


@pytest.mark.timeout(60)
def test_tool_help_names_the_module_and_says_whole_sentences() -> None:
    """soak's description was its docstring's first line, cut mid-sentence
    ("... messages on"); torch_conformance's usage line named
    torch_conformance.py, which cannot be run as a script."""
    soak = _run("collectives.tools.soak", "--help")
    assert soak.returncode == 0, soak.stderr
    assert ("point-to-point messages on N ranks, every result checked, memory sampled as it "
            "goes.") in " ".join(soak.stdout.split()), soak.stdout
    conf = _run("collectives.tools.torch_conformance", "--help")
    assert conf.returncode == 0, conf.stderr
    assert conf.stdout.startswith("usage: python -m collectives.tools.torch_conformance "), \
        conf.stdout


@pytest.mark.timeout(60)
@pytest.mark.parametrize("example,argv,said", [
    ("ping_pong.py", ["--rounds", "0"], "--rounds 0: at least 1"),
    ("train_pipeline.py", ["--schedule", "bogus"], "--schedule: unknown schedule 'bogus'"),
])
def test_an_example_says_usage_for_a_nonsense_option(example: str, argv: list[str],
                                                     said: str) -> None:
    """--rounds 0 ended in a ZeroDivisionError, --schedule bogus in a
    ValueError from inside engine, each a traceback on every rank."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "examples", example), *argv],
                       cwd=ROOT, env=env, text=True, capture_output=True, timeout=60)
    assert r.returncode == 2 and said in r.stderr and "Traceback" not in r.stderr, r.stderr
