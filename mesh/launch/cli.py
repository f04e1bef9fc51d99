"""meshrun's command line: its arguments, their checks, and ``main``, which
hands them to ``launch`` (mesh.launch.run: each worker's place in the job,
and one host's share of the job from start to exit code, restarts too)."""
from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import re
import shutil
import socket
import sys
import textwrap
from typing import Any, Sequence

from ..cliargs import checked, nonnegative, nonnegative_float, positive_float
from ..limits import too_many_for_open_files
from .run import launch

__all__ = ["main", "launch", "build_parser", "env_defaults"]


def build_parser() -> argparse.ArgumentParser:
    """The command line, with torchrun's spellings accepted as aliases."""
    p = argparse.ArgumentParser(
        prog="meshrun",
        allow_abbrev=False,     # a script's own --m is the script's, not --master-addr's prefix
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.dedent("""\
            Launch a meshrun job: N worker processes on this host, each told its place
            in the job through the environment (RANK, WORLD_SIZE, LOCAL_RANK,
            LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT, MESH_SECRET; torchrun's others
            too: GROUP_RANK, ROLE_RANK, TORCHELASTIC_RESTART_COUNT...); mesh.init()
            reads them. This meshrun serves the rendezvous (node 0 of a multi-host job)."""),
        epilog=textwrap.dedent("""\
            examples:
              meshrun -n 4 train.py --lr 0.1
              meshrun -n 2 -m mypackage.train
              meshrun -n 2 --log-dir logs --timeout 600 train.py
              meshrun -n 4 --max-restarts 3 train.py   # restarts: resume from a checkpoint
            multi-host (one meshrun per host, the same MESH_SECRET exported on each):
              meshrun --nnodes 2 --node-rank 0 --master-addr HOST0 --master-port 29500 -n 4 train.py
              meshrun --nnodes 2 --node-rank 1 --master-addr HOST0 --master-port 29500 -n 4 train.py
            add --curve on every node to encrypt the job's traffic (CurveZMQ).

            Output lines are prefixed with the global rank: "[3] ..." (--no-prefix: as
            the ranks wrote them); --local-ranks-filter 0 shows rank 0's alone, the
            others' kept in --log-dir and their errors in the report. When a rank
            fails, the others get --settle seconds to end on their own (ranks told of
            the failure end with errors of their own), then SIGTERM (and SIGCONT, so
            that a stopped rank acts on it), then SIGKILL after --grace seconds,
            and meshrun prints the first failure with its traceback
            and exits with its exit code (128+N for signal N; 124 for --timeout).
            Ctrl-C stops the job; a second Ctrl-C kills it at once. Each rank
            stopped is first asked where it is, and the report says it: the mesh
            call it waits in, or the line it runs (wedged in native code: its
            Python stack, which faulthandler dumps). Rank 0 reads
            meshrun's standard input, the others /dev/null. OMP_NUM_THREADS,
            when unset, becomes cpus/N so that N workers do not oversubscribe the cores."""))
    p.add_argument("-n", "-np", "--nproc-per-node", "--nproc_per_node", dest="nproc", type=int,
                   default=1, metavar="N", help="worker processes on this host (default 1)")
    p.add_argument("--nnodes", type=int, default=1, metavar="K",
                   help="hosts in the job, one meshrun on each (default 1)")
    p.add_argument("--node-rank", "--node_rank", dest="node_rank", type=int, default=0,
                   action=_Given,
                   metavar="I", help="this host's index, 0..K-1; global rank = I*N + local rank")
    p.add_argument("--master-addr", "--master_addr", dest="master_addr", default="127.0.0.1",
                   action=_Given,
                   metavar="ADDR", help="address of node 0, which serves the rendezvous "
                                        "(default 127.0.0.1)")
    p.add_argument("--master-port", "--master_port", dest="master_port", type=int,
                   default=None, metavar="PORT", action=_Given,
                   help="rendezvous port on node 0; required with --nnodes > 1 (node 0 may "
                        "give 0 and prints the port it bound); default: any free port")
    p.add_argument("--standalone", action="store_true",
                   help="torchrun's: one node, its rendezvous local on a free port, which "
                        "is what meshrun without --nnodes does (accepted so that a "
                        "torchrun command line runs unchanged; refused with --nnodes > 1, "
                        "--node-rank, --master-addr or --master-port)")
    p.add_argument("--log-dir", "--log_dir", metavar="DIR",
                   help="also write rank<R>.stdout.log, rank<R>.stderr.log and, on failure, "
                        "rank<R>.error.json here (with --max-restarts, in DIR/attempt_<N> "
                        "for each try, N its TORCHELASTIC_RESTART_COUNT)")
    p.add_argument("--no-prefix", dest="prefix", action="store_false", default=True,
                   help="relay each rank's output as it wrote it, without the \"[R] \" "
                        "before each line (a line left open, a progress bar, stays so; "
                        "another rank's output still starts on a line of its own)")
    p.add_argument("--tag-output", dest="prefix", action="store_true", default=True,
                   help="prefix each line with its rank, meshrun's default (mpirun's "
                        "spelling, whose default is no prefix)")
    p.add_argument("--output", action=_MpiOutput, metavar="WORD,...",
                   help="Open MPI 5's: tag (--tag-output), dir=DIR (--log-dir DIR); "
                        "its others (merge-stderr-to-stdout, timestamp, file=...) are refused")
    p.add_argument("--output-filename", action=_MpiOutput, metavar="DIR",
                   help="Open MPI 4's: --log-dir DIR (meshrun's file names in it)")
    p.add_argument("--merge-stderr-to-stdout", action=_MpiOutput, nargs=0,
                   help="Open MPI's: refused (meshrun relays stderr to its own stderr; "
                        "give the shell's 2>&1)")
    p.add_argument("--local-ranks-filter", "--local_ranks_filter", dest="local_ranks_filter",
                   type=checked(_local_ranks), default=None, metavar="R,R...",
                   help="show only these local ranks' output (stdout and stderr) on the "
                        "console, as torchrun's: the others' still goes to --log-dir, and "
                        "the report still shows a failing rank's error, its traceback or "
                        "the last lines of its stderr")
    p.add_argument("-r", "--redirects", type=checked(_streams), default=0, metavar="S",
                   help="keep these streams off the console, in --log-dir alone, as "
                        "torchrun's: 1 stdout, 2 stderr, 3 both, for every local rank, or "
                        "per local rank, 0:3,1:2 (needs --log-dir)")
    p.add_argument("-t", "--tee", type=checked(_streams), default=0, metavar="S",
                   help="torchrun's: these streams (as -r gives them) to --log-dir and the "
                        "console, which --log-dir does for every stream; it undoes -r for "
                        "the streams both name (needs --log-dir)")
    p.add_argument("--grace", type=nonnegative_float, default=5.0, metavar="SECONDS",
                   help="seconds between SIGTERM and SIGKILL when stopping workers (default 5)")
    p.add_argument("--settle", type=nonnegative_float, default=3.0, metavar="SECONDS",
                   help="seconds the other workers get to end on their own after the first "
                        "failure, before they are stopped (default 3); also, up to 1, "
                        "what the workers stopped get to say where they are (0: not asked)")
    p.add_argument("--output-stall", type=nonnegative_float, default=5.0, metavar="SECONDS",
                   help="give up writing the output to a reader of meshrun's stdout or "
                        "stderr that took none for this long (until then, once 64 MiB wait "
                        "for it, the ranks wait in their writes; default 5)")
    p.add_argument("--timeout", type=positive_float, default=None, metavar="SECONDS",
                   help="stop the whole job after this many seconds (exit code 124)")
    p.add_argument("--max-restarts", "--max_restarts", dest="max_restarts", type=nonnegative,
                   default=0, metavar="N",
                   help="after a rank fails, stop every rank, report the failure and start "
                        "them all again, up to N times, as torchrun --max-restarts does "
                        "(TORCHELASTIC_RESTART_COUNT and MESH_RESTART_COUNT count the "
                        "restarts; default 0); with --nnodes > 1 give every node's "
                        "meshrun the same N (a node whose N differs from node 0's is "
                        "refused): every node's ranks then restart together")
    p.add_argument("--curve", action="store_true",
                   help="encrypt and authenticate all traffic with CurveZMQ, keys derived from "
                        "the job secret (same as MESH_CURVE=1; use it on every node)")
    p.add_argument("-m", "--module", action="store_true",
                   help="the target is a module to run as with python -m")
    p.add_argument("--no-python", "--no_python", action="store_true",
                   help="the target is an executable, not a Python script (no traceback "
                        "capture)")
    for names, nargs in _HOROVODRUN:
        p.add_argument(*names, action=_Horovodrun, nargs=nargs, help=argparse.SUPPRESS)
    p.add_argument("target", help="script.py, module (with -m) or program (with --no-python)")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the target")
    return p


class _Given(argparse.Action):
    """Store the value and note the option as given: --standalone refuses
    the options that place the rendezvous, which it places itself."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        setattr(namespace, self.dest, values)
        namespace.given = (*getattr(namespace, "given", ()), option_string)


# torchrun's options that take their default from PET_<OPTION> (torch's argparse_util
# env and check_env actions) and meshrun takes too: the variable, and meshrun's dest
_PET = {"PET_NPROC_PER_NODE": "nproc", "PET_NNODES": "nnodes", "PET_NODE_RANK": "node_rank",
        "PET_MASTER_ADDR": "master_addr", "PET_MASTER_PORT": "master_port",
        "PET_STANDALONE": "standalone", "PET_MAX_RESTARTS": "max_restarts",
        "PET_LOG_DIR": "log_dir", "PET_REDIRECTS": "redirects", "PET_TEE": "tee",
        "PET_LOCAL_RANKS_FILTER": "local_ranks_filter", "PET_MODULE": "module",
        "PET_NO_PYTHON": "no_python"}
_PLACED = ("node_rank", "master_addr", "master_port")     # what --standalone places itself


def env_defaults(p: argparse.ArgumentParser) -> None:
    """Each option's default from torchrun's PET_<OPTION> variable where it is
    set (the command line wins), as torchrun reads them: a flag's variable is
    a number, 0 false; a bad value is a usage error naming the variable."""
    actions = {a.dest: a for a in p._actions}
    found: dict[str, str] = {}
    for name, dest in _PET.items():
        text = os.environ.get(name)
        if text is None or (text == "" and dest not in ("master_addr", "log_dir")):
            continue
        action = actions[dest]
        try:
            if action.nargs == 0:           # (a flag: torchrun's check_env, bool(int(text)))
                value: Any = bool(int(text))
            else:
                value = action.type(text) if callable(action.type) else text
        except (ValueError, TypeError, argparse.ArgumentTypeError) as e:
            what = ("a number, 0 false" if action.nargs == 0 else
                    "a whole number" + (" (meshrun takes no MIN:MAX range of nodes)"
                                        if ":" in text else "") if action.type is int
                    else str(e))
            option = next(s for s in action.option_strings if s.startswith("--"))
            p.error(f"{name}={text!r} (torchrun's default for {option}): {what}")
        p.set_defaults(**{dest: value})
        found[dest] = name
    p.set_defaults(from_env=found)


class _MpiOutput(argparse.Action):
    """Open MPI's output options, as meshrun's own where it has one: --output
    (5's: a comma list) tag -> --tag-output, dir=DIR -> --log-dir DIR;
    --output-filename DIR (4's) -> --log-dir DIR; the rest refused by name."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        if option_string == "--output-filename":
            words = [f"dir={values}"]
        elif option_string == "--merge-stderr-to-stdout":
            words = ["merge-stderr-to-stdout"]
        else:
            words = [w.strip() for w in str(values).split(",")]
        refused = []
        for word in words:
            key, eq, value = word.partition("=")
            if word.lower() == "tag":
                namespace.prefix = True
            elif key.lower() == "dir" and eq and value and ":" not in value:
                namespace.log_dir = value
            else:
                refused.append(word)
        if refused:
            said = option_string if self.nargs == 0 else f"{option_string} {values}"
            parser.error(f"{said}: meshrun cannot do {', '.join(refused)} "
                         f"(it takes tag, as --tag-output, and dir=DIR, as --log-dir DIR; "
                         f"stderr stays apart from stdout: give the shell's 2>&1 to merge "
                         f"them)")


# horovodrun's options that are not meshrun's, each refused with what to use instead
# (argparse said "unrecognized arguments"); its -np is meshrun's -n
_HOROVODRUN: list[tuple[tuple[str, ...], int | None]] = [
    (("-H", "--hosts", "-hostfile", "--hostfile"), None), (("--timeline-filename",), None),
    (("--timeline-mark-cycles",), 0), (("--gloo", "--mpi"), 0),
    (("--min-np", "--min_np", "--max-np", "--max_np", "--host-discovery-script",
      "--host_discovery_script"), None)]
_INSTEAD = {
    "-H": "one meshrun a host: meshrun --nnodes K --node-rank I --master-addr HOST0 "
          "--master-port P -n N train.py on each (README: Running on a cluster), or mpirun "
          "-H ... python train.py",
    "--timeline-filename": "export HOROVOD_TIMELINE={} (hvd.init() reads it, as Horovod's)",
    "--timeline-mark-cycles": "export HOROVOD_TIMELINE_MARK_CYCLES=1 (hvd.init() reads it)",
    "--gloo": "meshrun's ranks talk over its own transport: drop it",
    "--min-np": "a mesh does not grow or shrink: every try of a job has the same -n N; "
                "meshrun -n N --max-restarts K train.py starts every rank again after a "
                "failure, and hvd.elastic.run resumes at the last state.commit() "
                "(README: Coming from Horovod)"}
_INSTEAD.update({"--hosts": _INSTEAD["-H"], "-hostfile": _INSTEAD["-H"],
                 "--hostfile": _INSTEAD["-H"], "--mpi": _INSTEAD["--gloo"]})
_INSTEAD.update({o: _INSTEAD["--min-np"] for o in ("--min_np", "--max-np", "--max_np",
                 "--host-discovery-script", "--host_discovery_script")})


class _Horovodrun(argparse.Action):
    """horovodrun's option, refused naming meshrun's way to the same end."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        said = option_string if self.nargs == 0 else f"{option_string} {values}"
        parser.error(f"{said} is horovodrun's, not meshrun's: "
                     f"{_INSTEAD[str(option_string)].format(values)}")


_PYTHON = re.compile(r"python[0-9.]*")


def _check(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    from_env = getattr(a, "from_env", {})
    if a.standalone:        # (torchrun ignores the rendezvous's variables under it, as its options)
        given = {act.dest for act in p._actions
                 if set(act.option_strings) & set(getattr(a, "given", ()))}
        for dest in _PLACED:
            if dest in from_env and dest not in given:
                setattr(a, dest, {"node_rank": 0, "master_addr": "127.0.0.1",
                                  "master_port": None}[dest])
    if a.nproc < 1:
        p.error("-n must be at least 1")
    if a.nnodes < 1:
        p.error("--nnodes must be at least 1")
    if a.standalone and a.nnodes > 1:
        # (torchrun's agent would wait at its localhost rendezvous for nodes that cannot come)
        p.error(f"--standalone is one node: drop --nnodes {a.nnodes}, or --standalone "
                "for a multi-host job")
    if a.standalone and getattr(a, "given", ()):
        # (torchrun ignores them: its rendezvous is on localhost, on a free port)
        p.error(f"--standalone places the rendezvous itself (on this host, a free port): "
                f"drop {' and '.join(dict.fromkeys(a.given))}, or --standalone")
    if not 0 <= a.node_rank < a.nnodes:
        p.error(f"--node-rank must be in 0..{a.nnodes - 1}")
    if a.master_port is not None and not 0 <= a.master_port <= 65535:
        p.error(f"--master-port {a.master_port}: a TCP port is 0..65535 (0: any free one)")
    if a.module and a.no_python:
        p.error("-m and --no-python exclude each other")
    _check_addr_form(p, a.master_addr)      # (host:port: said before "--master-port is required")
    if a.nnodes > 1 and a.master_port is None:
        p.error("--master-port is required with --nnodes > 1")
    if a.nnodes > 1 and a.node_rank > 0 and not a.master_port:
        p.error("--master-port must be node 0's actual port on the other nodes")
    if a.nnodes > 1 and not os.environ.get("MESH_SECRET"):
        p.error("a multi-host job needs the same secret on every host: export "
                "MESH_SECRET=$(python -c 'import secrets; print(secrets.token_hex(16))')")
    if not (a.module or a.no_python or os.path.isfile(a.target)) \
            and _PYTHON.fullmatch(os.path.basename(a.target)):
        script = " ".join(getattr(a, "args", None) or ["train.py"])
        p.error(f"{a.target} {script}: meshrun runs the script in its own Python: "
                f"meshrun -n {a.nproc} {script} (horovodrun's and mpirun's `-np "
                f"{a.nproc} {a.target} {script}`); --no-python {a.target} runs that program")
    if not (a.module or a.no_python or os.path.isfile(a.target)
            or os.path.isfile(os.path.join(a.target, "__main__.py"))):
        p.error(f"{a.target}: no such file (nor a folder with a __main__.py)")
    other = None if a.module or a.no_python else _not_python(a.target)
    if other:
        p.error(f"{a.target}: {other}, not Python: run it with --no-python "
                f"(meshrun -n {a.nproc} --no-python {_runnable(a.target)} ...)")
    missing = _module_missing(a.target) if a.module else None
    if missing:
        p.error(f"-m {a.target}: {missing}")
    if a.no_python and not shutil.which(a.target):
        p.error(_no_program(a.target))
    _check_output(p, a)
    if a.log_dir and os.path.exists(a.log_dir) and not os.path.isdir(a.log_dir):
        p.error(f"--log-dir {a.log_dir}: not a directory")
    _check_addr(p, a.master_addr)
    too_many = too_many_for_open_files(a.nnodes * a.nproc)
    if too_many:
        p.error(too_many)


def _local_ranks(text: str) -> frozenset[int]:
    """--local-ranks-filter's value: "0,2" -> {0, 2}."""
    parts = text.split(",")
    if not all(p.strip().isdigit() for p in parts):
        raise ValueError("local ranks, comma-separated: 0 or 0,2")
    return frozenset(int(p) for p in parts)


def _streams(text: str) -> int | dict[int, int]:
    """--redirects and --tee's value, as torchrun's (its ``Std.from_str``):
    "3" for every local rank, or "0:3,1:2" per local rank (others 0)."""
    what = "0-3 (1 stdout, 2 stderr, 3 both) or per local rank, 0:3,1:2"
    if text.strip() in ("0", "1", "2", "3"):
        return int(text)
    pairs = [p.split(":") for p in text.split(",")]
    if not all(len(p) == 2 and p[0].strip().isdigit() and p[1].strip() in ("0", "1", "2", "3")
               for p in pairs):
        raise ValueError(what)
    ranks = [int(r) for r, _ in pairs]
    twice = sorted({r for r in ranks if ranks.count(r) > 1})
    if twice:       # (torchrun's takes the last silently: which was meant is not sure)
        raise ValueError(f"local rank {twice[0]} is given twice")
    return {int(r): int(v) for r, v in pairs}


def _check_output(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    """The console's options name this node's local ranks; --redirects and
    --tee are per local rank from here on (``run._shown``)."""
    for option, given in (("--local-ranks-filter", a.local_ranks_filter),
                          ("--redirects", a.redirects), ("--tee", a.tee)):
        past = sorted(r for r in (given if isinstance(given, (dict, frozenset)) else ())
                      if r >= a.nproc)
        if past:
            p.error(f"{option}: local rank {past[0]} is none of this node's 0..{a.nproc - 1} "
                    f"(-n {a.nproc})")
        if given and option != "--local-ranks-filter" and not a.log_dir:
            p.error(f"{option} needs --log-dir, where the ranks' output is written (torchrun "
                    f"writes it to a temporary folder where none is given)")
    for option in ("redirects", "tee"):
        given = getattr(a, option)
        setattr(a, option, dict(given) if isinstance(given, dict) else
                dict.fromkeys(range(a.nproc), given))


def _module_missing(name: str) -> str | None:
    """Why the ranks' ``python -m name`` will not find what to run, or None:
    each rank said the same 'No module named' otherwise. Looked for as runpy
    will, the current directory first on sys.path (as the bootstrap puts it),
    without importing anything: a package's submodules are looked for in its
    folders, as the import system will once the package is imported (its
    ``__init__`` is the user's code, the ranks' to run). None where that may
    not tell: a package whose ``__init__`` changes its ``__path__`` or
    ``sys.modules`` (pkgutil.extend_path), a finder that fails, a name the
    ranks' python will refuse itself (empty, relative)."""
    saved = sys.path[:]
    try:
        sys.path.insert(0, os.getcwd())
        parts = name.split(".")
        spec = importlib.util.find_spec(parts[0])
        if spec is None:
            return (f"no module named {parts[0]!r} (looked for as the ranks' python -m will: "
                    f"in the current directory, then on sys.path)")
        for i, part in enumerate([*parts[1:], "__main__"], 1):
            if spec.submodule_search_locations is None and part == "__main__":
                return None
            if _dynamic_package(spec):
                return None
            pkg, sub = ".".join(parts[:i]), ".".join([*parts[:i], part])
            if spec.submodule_search_locations is None:
                return f"{pkg!r} ({spec.origin}) is a module, not a package"
            found = _find_in(sub, list(spec.submodule_search_locations))
            if found is None:
                where = ", ".join(dict.fromkeys(spec.submodule_search_locations))
                if part == "__main__":
                    return (f"{pkg!r} is a package without a __main__ module ({where}): it "
                            f"cannot be run")
                return f"no module named {sub!r} (the package {pkg!r} is {where})"
            spec = found
        return None
    except Exception:       # (an empty or relative name...: the ranks' python says why)
        return None
    finally:
        sys.path[:] = saved


def _dynamic_package(spec: Any) -> bool:
    """Whether a package's ``__init__`` (a module's code) may add submodules
    its folders do not hold (extends ``__path__``, fills ``sys.modules`` as
    ``os`` does ``os.path``), or cannot be read."""
    if not spec.has_location or spec.origin in (None, "namespace"):
        return spec.origin is not None and spec.origin != "namespace"
    try:
        with open(spec.origin, "rb") as f:
            source = f.read()
    except OSError:
        return True
    return not spec.origin.endswith(".py") or b"__path__" in source or b"sys.modules" in source


def _find_in(name: str, path: list[str]) -> Any:
    """The spec of submodule ``name`` of a package whose folders are ``path``,
    as the import system's finders give it, without importing anything."""
    for finder in sys.meta_path:
        find = getattr(finder, "find_spec", None)
        spec = find(name, path) if find is not None else None
        if spec is not None:
            return spec
    return None


def _no_program(target: str) -> str:
    """Why --no-python cannot run target: a file that is there but not
    executable, or there but named without a directory (looked for on PATH
    only, as a shell would), is not 'no such program'."""
    if os.path.isfile(target) and not os.access(target, os.X_OK):
        return f"{target}: not executable (chmod +x {target})"
    if os.path.isfile(target) and os.sep not in target:
        return f"{target}: not on PATH; give ./{target} to run the file here"
    return f"{target}: no such program (not a file, nor on PATH)"


_SHELLS = {"sh", "bash", "dash", "zsh", "ksh", "mksh", "csh", "tcsh", "fish"}


def _not_python(target: str) -> str | None:
    """What a script file is where it is surely not Python, else None: its
    ``#!`` line names a shell (``#!/bin/sh``, ``#!/usr/bin/env bash``), or it
    is a compiled program (ELF). Run as Python, each rank failed with a
    SyntaxError in the file's second line, or a null byte's ValueError."""
    if not os.path.isfile(target):
        return None             # (a folder with a __main__.py)
    try:
        with open(target, "rb") as f:
            head = f.read(256)
    except OSError:
        return None             # (the ranks' python says why)
    if head.startswith(b"\x7fELF"):
        return "a compiled program (ELF)"
    if not head.startswith(b"#!"):
        return None
    line = head[2:].split(b"\n", 1)[0].decode("utf-8", "replace").strip()
    words = line.split()
    if words and os.path.basename(words[0]) == "env":
        words = [w for w in words[1:] if not w.startswith("-") and "=" not in w]
    if words and os.path.basename(words[0]) in _SHELLS:
        return f"a {os.path.basename(words[0])} script (its first line: #!{line})"
    return None


def _runnable(target: str) -> str:
    """target as --no-python takes a file here: with a directory part."""
    return target if os.sep in target else f".{os.sep}{target}"


def _check_addr_form(p: argparse.ArgumentParser, addr: str) -> None:
    """--master-addr is a host name or an IP address: not a URL, no port."""
    if "://" in addr:
        p.error(f"--master-addr {addr}: give the host alone (e.g. {addr.split('://', 1)[1]}), "
                f"not a URL")
    host, colon, port = addr.rpartition(":")
    if colon and port.isdigit() and host.count(":") == 0:
        p.error(f"--master-addr {addr}: give the port with --master-port {port}, the host "
                f"alone with --master-addr {host}")


def _check_addr(p: argparse.ArgumentParser, addr: str) -> None:
    """--master-addr resolves (its form checked first, by _check_addr_form)."""
    try:
        socket.getaddrinfo(addr.strip("[]"), None)
    except (socket.gaierror, UnicodeError) as e:
        p.error(f"--master-addr {addr}: cannot resolve it ({e})")


def _split_target(p: argparse.ArgumentParser, argv: list[str]) -> tuple[list[str], list[str]]:
    """meshrun's options with the target, and the target's own arguments as
    given: argparse dropped a "--" right after the target (`meshrun train.py
    -- --x` ran train.py with ['--x'], where python and mpirun give ['--', '--x'])."""
    valued = {s for a in p._actions if a.option_strings and a.nargs != 0
              for s in a.option_strings}
    i = 0
    while i < len(argv):
        if argv[i] == "--":
            return argv[:i + 2], argv[i + 2:]
        if not argv[i].startswith("-") or argv[i] == "-":
            return argv[:i + 1], argv[i + 1:]
        i += 2 if argv[i] in valued else 1     # (its value is the next word)
    return argv, []


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point (``meshrun``, ``python -m mesh.launch``)."""
    parser = build_parser()
    env_defaults(parser)
    head, rest = _split_target(parser, list(sys.argv[1:] if argv is None else argv))
    args = parser.parse_args(head)
    args.args = rest
    _check(parser, args)
    # meshrun's own warnings (its rendezvous refusing a stranger or another job's node)
    # say whose they are: they came bare among the ranks' "[R] " lines
    logging.basicConfig(format="meshrun: %(message)s", level=logging.WARNING)
    try:
        code = launch(args)
    except KeyboardInterrupt:
        code = 130
    except Exception as e:
        print(f"meshrun: {type(e).__name__}: {e}", file=sys.stderr)
        code = 1
    sys.exit(code)
