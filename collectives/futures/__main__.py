"""``python -m collectives.futures script.py [args]`` (or ``-m module``,
``-c code``) under ``meshrun -n N``, as ``python -m mpi4py.futures``: rank 0
runs the program, the other ranks serve as the workers of every
MPIPoolExecutor it makes (one at a time); at one rank the program runs
alone and its executors spawn their workers."""
from __future__ import annotations

import os
import runpy
import sys

import mesh

from . import executor
from .server import TASK, serve

_USAGE = ("usage: python -m collectives.futures <pyfile> [arg] ...\n"
          "   or: python -m collectives.futures -m <module> [arg] ...\n"
          "   or: python -m collectives.futures -c <string> [arg] ...")


def _check(args: list[str]) -> None:
    error = ""
    if not args:
        error = "No path specified for execution"
    elif args[0] in ("-h", "--help"):
        print(_USAGE)
        raise SystemExit(0)
    elif args[0] in ("-m", "-c") and len(args) < 2:
        error = f"Argument expected for option: {args[0]}"
    elif args[0].startswith("-") and args[0] not in ("-m", "-c"):
        error = f"Unknown option: {args[0]}"
    elif not args[0].startswith("-") and not os.path.exists(args[0]):
        error = f"Path does not exist: {args[0]}"
    if error:
        print(f"{error}\n{_USAGE}", file=sys.stderr)
        raise SystemExit(1)


def _run(args: list[str]) -> None:
    if args[0] == "-c":
        sys.argv = ["-c", *args[2:]]
        exec(compile(args[1], "<string>", "exec"), {"__name__": "__main__"})
    elif args[0] == "-m":
        sys.argv = [args[1], *args[2:]]
        runpy.run_module(args[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = list(args)
        sys.path.insert(0, os.path.dirname(os.path.abspath(args[0])))
        runpy.run_path(args[0], run_name="__main__")


def main() -> None:
    args = sys.argv[1:]
    from .. import MPI
    comm = MPI.COMM_WORLD
    if comm.Get_size() == 1:
        _check(args)
        _run(args)
        return
    mine, inter, local = executor.split(comm, 0)
    if not mine:
        serve(inter, local)
        return
    executor._shared["comm"] = inter
    try:
        _check(args)
        _run(args)
    finally:
        executor.shutdown_all()
        executor._shared["comm"] = None
        try:
            for w in range(inter.Get_remote_size()):
                inter.send(["stop"], dest=w, tag=TASK)
        except mesh.MeshError:
            pass        # (a worker lost: the job fails, meshrun names it)


if __name__ == "__main__":
    main()
