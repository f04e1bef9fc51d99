"""README.md's code blocks, as a newcomer reads them: every ```python block
compiles; every name it takes from mesh, collectives and engine (imports,
``mesh.X``, ``C.X``, ``world.X``, ``win.X``, ``job.X``...) exists, and a
call's keywords are the function's; every ``meshrun`` line of a shell block
parses; and the quick whole programs run as the text around them says.

Most blocks are fragments (an API summary, a loop's middle): they are held
to the names only. The ones run here are picked by a distinctive first line
(RUN, SPAWNED), never by a line number, with the least context the README's
text gives them."""
from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
import inspect
import re
import shlex
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import collectives
import engine
import mesh
from collectives import MPI
from mesh.launch.cli import build_parser
from proctools import launch_env, run_in_session

ROOT = Path(__file__).resolve().parent.parent
PROJECT = ("mesh", "collectives", "engine")


def blocks(lang: str | None = None) -> list[tuple[int, str, str]]:
    """(line of its first code line, language, text) of each fenced block."""
    lines = (ROOT / "README.md").read_text().splitlines()
    out, i = [], 0
    while i < len(lines):
        m = re.match(r"^```(\w*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        j = i + 1
        while not lines[j].startswith("```"):
            j += 1
        if lang is None or m.group(1) == lang:
            out.append((i + 2, m.group(1), "\n".join(lines[i + 1:j]) + "\n"))
        i = j + 1
    return out


def python_blocks() -> list[tuple[int, str, str]]:
    return blocks("python")


def block(first: str) -> str:
    """The one python block whose first line starts with ``first``."""
    found = [src for _, _, src in python_blocks() if src.startswith(first)]
    assert len(found) == 1, f"README: {len(found)} python blocks start with {first!r}"
    return found[0]


# What a name stands for in the blocks (the receivers the README's text names them by).
@functools.cache
def _roots() -> dict[str, list[Any]]:
    import collectives.futures as futures
    return {
        "mesh": [mesh], "C": [collectives], "collectives": [collectives], "engine": [engine],
        "MPI": [MPI],
        "world": [mesh.Mesh], "g": [mesh.Comm], "host": [mesh.Comm], "node": [mesh.Comm],
        "sub": [mesh.Comm], "d": [mesh.Comm], "tp": [mesh.Comm], "grid": [mesh.Grid],
        "win": [mesh.Window], "req": [mesh.Request, mesh.Prequest], "p": [mesh.Prequest],
        "q": [mesh.Prequest], "msg": [mesh.Message], "st": [mesh.Status],
        "sched": [engine.Schedule], "mine": [engine.Schedule], "deep": [engine.Schedule],
        "rep": [engine.SimReport], "job": [engine.Job], "pipe": [engine.Pipeline],
        "f": [collectives.File], "reducer": [collectives.GradReducer],
        "comm": [MPI.Comm, MPI.Intercomm], "parent": [MPI.Intercomm],
        "ex": [futures.MPIPoolExecutor],
    }


@functools.cache
def _instance_attrs(cls: type) -> set[str]:
    """Attributes an instance gets in its methods (``self.x = ``, ``self.a, self.b =``)
    or from class-level annotations, over its bases."""
    out: set[str] = set()
    for k in cls.__mro__[:-1]:
        try:
            src = inspect.getsource(k)
        except (OSError, TypeError):
            continue
        out |= set(re.findall(r"self\.(\w+)\s*(?::[^=\n]*)?[=,]", src))
        out |= set(re.findall(r"^    (\w+)\s*:", src, re.M))
    return out


def _lazy(module: Any, name: str) -> bool:
    """``name`` is one the module's ``__getattr__`` gives on first use (engine's
    ZeroRedundancyOptimizer: torch imported then, which this check does not)."""
    get = vars(module).get("__getattr__")
    return get is not None and repr(name) in inspect.getsource(get).replace('"', "'")


def _rebound(tree: ast.AST) -> set[str]:
    """Names a block binds to something else: loop and comprehension targets,
    tuple unpacking (the DeepSpeed block's ``engine, optimizer, ... =``)."""
    out: set[str] = set()
    for node in ast.walk(tree):
        targets: list[ast.AST] = []
        if isinstance(node, (ast.For, ast.comprehension)):
            targets = [node.target]
        elif isinstance(node, ast.Assign):
            targets = [t for t in node.targets if isinstance(t, ast.Tuple)]
        for t in targets:
            out |= {n.id for n in ast.walk(t) if isinstance(n, ast.Name)}
    return out


def _problems(line: int, src: str) -> list[str]:
    tree = ast.parse(src)
    rebound = _rebound(tree)
    roots = {k: v for k, v in _roots().items() if k not in rebound}
    bad: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            mod = node.module if isinstance(node, ast.ImportFrom) else None
            for a in node.names:
                full = f"{mod}.{a.name}" if mod else a.name
                if full.split(".")[0] not in PROJECT:
                    continue
                try:     # a module found, not imported (collectives.torchdist imports torch)
                    m = importlib.import_module(mod) if mod else None
                    if (m is None or not hasattr(m, a.name)) and not importlib.util.find_spec(
                            full):
                        raise ImportError("not found")
                except ImportError as e:
                    bad.append(f"line {line + node.lineno - 1}: import {full}: {e}")

    def resolve(n: ast.AST) -> Any:
        """The objects an expression stands for, or None where it is not ours."""
        if isinstance(n, ast.Name):
            return roots.get(n.id)
        if not isinstance(n, ast.Attribute):
            return None
        base = resolve(n.value)
        if not isinstance(base, list):
            return None
        if any(inspect.ismodule(b) and n.attr not in vars(b) and _lazy(b, n.attr) for b in base):
            return None
        hits = [getattr(b, n.attr) for b in base if hasattr(b, n.attr)]
        if not hits:
            if not any(isinstance(b, type) and n.attr in _instance_attrs(b) for b in base):
                bad.append(f"line {line + n.lineno - 1}: {ast.unparse(n)}: no such attribute")
            return None
        kinds = [h for h in hits if isinstance(h, type) or inspect.ismodule(h)]
        return kinds or ("callable", hits[0])

    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            resolve(node)
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        r = resolve(node.func)
        if not isinstance(r, tuple) or not callable(r[1]):
            continue
        if any(isinstance(a, ast.Starred) for a in node.args) or any(
                k.arg is None for k in node.keywords):
            continue
        try:
            sig = inspect.signature(r[1])
        except (TypeError, ValueError):
            continue
        args: list[None] = [None] * len(node.args)
        if inspect.isfunction(r[1]) and next(iter(sig.parameters), "") == "self":
            args.insert(0, None)         # looked up on the class: self unbound
        try:
            sig.bind(*args, **{k.arg: None for k in node.keywords if k.arg})
        except TypeError as e:
            bad.append(f"line {line + node.lineno - 1}: {ast.unparse(node)[:80]}: {e}")
    return list(dict.fromkeys(bad))


@pytest.mark.parametrize("line,src", [(ln, s) for ln, _, s in python_blocks()],
                         ids=[f"L{ln}" for ln, _, _ in python_blocks()])
def test_python_block_compiles_and_names_what_exists(line: int, src: str) -> None:
    compile(src, f"README.md:{line}", "exec")
    assert not _problems(line, src)


def test_the_name_check_catches_what_rots() -> None:
    """The check above fails on what a rename leaves behind."""
    src = ("import mesh.nowhere\nwin.flush_everything()\nC.all_reduce(g, a, opp='sum')\n"
           "sched.simulatee({})\nwin.array\n")
    got = _problems(1, src)
    assert len(got) == 4 and all(f"line {i}" in " ".join(got) for i in (1, 2, 3, 4)), got


def test_meshrun_lines_of_shell_blocks_parse() -> None:
    """Every ``meshrun ...`` line of a shell block parses (its flags exist)."""
    seen = 0
    for line, lang, src in blocks():
        if lang not in ("", "bash", "sh"):
            continue
        for k, text in enumerate(src.replace("\\\n", " ").splitlines()):
            text = text.split("  #")[0].strip().rstrip("&").strip()
            m = re.search(r"(?:^|\s)meshrun (.*)", text)
            if not m or text.startswith("#"):
                continue
            args = shlex.split(m.group(1))
            try:
                build_parser().parse_args(args)
            except SystemExit:
                pytest.fail(f"README.md:{line + k}: meshrun {m.group(1)} does not parse")
            seen += 1
    assert seen >= 10


def test_a_first_program_runs_and_fails_as_said_without_a_launcher(tmp_path: Path) -> None:
    """"A first program" under the launcher at 2 ranks, and under plain
    python its send fails with the error the README quotes."""
    prog = tmp_path / "first.py"
    prog.write_text(block("# examples/ping_pong.py, shortened"))
    env = launch_env(ROOT)
    code, out = run_in_session([sys.executable, "-m", "mesh.launch", "-n", "2", str(prog)],
                               env, timeout=120)
    assert code == 0, out
    code, out = run_in_session([sys.executable, str(prog)], env, timeout=60)
    assert code == 1 and ("ValueError: rank 0: send to rank 1: group world has ranks 0..0"
                          in out), out


def test_spawn_block_returns_what_its_comment_says() -> None:
    src = block("import mesh\n\ndef fn(world, n):")
    call = src.splitlines()[-1]
    assert call.endswith("# -> [0, 10, 20, 30]")
    env: dict[str, Any] = {}
    exec(compile(src.replace(call, ""), "README.md", "exec"), env)
    assert eval(call.split("#")[0], env) == [0, 10, 20, 30]


def test_schedule_blocks_run_in_one_process() -> None:
    """The Pipelines section's schedule half, "mine" refused as its comment
    says, "deep" and the family ``deeper`` as their comments say."""
    pipes = block("import numpy as np\nimport engine\nimport mesh\nsched =")
    exec(pipes.split("\nworld = mesh.init()")[0], {})
    with pytest.raises(engine.ScheduleError, match=re.escape(
            "schedule 'mine' is invalid: rank 1 runs 1B0 before its forward 1F0")):
        exec(block("mine = engine.Schedule.build("), {"engine": engine})
    env: dict[str, Any] = {"engine": engine}
    deep = block("deep = engine.Schedule.build(")
    exec(deep.split("\njob = ")[0], env)
    env["deep"].validate()
    exec(block("def deeper(p, m):").split("\njob = ")[0], env)
    for m in (4, 8):
        env["deeper"](2, m).validate()
    with pytest.raises(ValueError, match="needs 3 micro-batches, got 2"):
        env["deeper"](2, 2)


# Blocks run together in one 4-rank spawn: (first line, the context the text gives it,
# what is checked after, on each rank).
SPAWNED = [
    ("a = np.zeros(1000)",
     "x = np.ones(3); left, right = (world.rank - 1) % 4, (world.rank + 1) % 4",
     "total == 100.0 and y.shape == (5,)"),
    ("def matmul(a, b):",
     "mats = np.tile(np.eye(2).ravel() * (world.rank + 1), (3, 1))\n"
     "maps = np.tile([2.0, 1.0], (3, 1)) * (world.rank + 1)",
     "np.array_equal(mats[0], [24, 0, 0, 24])"),
    ("reducer = C.GradReducer(world, grads",
     "grads = [np.full(3, float(world.rank))]; i = 0",
     "np.all(grads[0] == 1.5)"),
    ("from collectives import MPI",
     "a = np.ones(3)",
     "total == 6 and np.all(a == 4) and comm.mesh is world"),
    ("p = C.all_reduce_init(g, grads",
     "grads = np.full(4, float(world.rank)); mine = np.arange(3.0) + world.rank\n"
     "rows = np.zeros((4, 3)); steps = 2",
     "np.all(grads == 1.5) and np.array_equal(rows[:, 0], [0, 1, 2, 3])"),
    ("with C.File.open(world, \"ckpt.bin\", \"w\") as f:",
     "import os; os.chdir(DIR); n = 4\n"
     "shard = np.arange(4, dtype=np.float32) + 10 * world.rank\n"
     "rows = np.full(world.rank + 1, 7, np.float32); out = np.zeros(4, np.float32)",
     "np.array_equal(out, shard) and off == world.rank * (world.rank + 1) // 2"),
]


def _run_spawned(world: Any, runs: list[tuple[str, str, str]], where: str) -> list[bool]:
    ok = []
    for src, ctx, check in runs:
        env = {"np": np, "mesh": mesh, "C": collectives, "collectives": collectives,
               "world": world, "g": world, "DIR": where}
        exec(ctx, env)
        exec(src, env)
        ok.append(bool(eval(check, env)))
        collectives.barrier(world)
    return ok


def test_quick_whole_blocks_run_at_four_ranks(tmp_path: Path) -> None:
    """Windows, user-defined ops, GradReducer, collectives.MPI, persistent
    collectives and parallel file I/O, each block as written, in one spawn;
    each checked on what its comments say it does."""
    runs = [(block(first), ctx, check) for first, ctx, check in SPAWNED]
    got = mesh.spawn(_run_spawned, 4, runs, str(tmp_path), timeout=120)
    for i, (first, _, _) in enumerate(SPAWNED):
        assert all(r[i] for r in got), (first, [r[i] for r in got])
