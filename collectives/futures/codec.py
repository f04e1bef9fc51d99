"""What crosses between a futures master and its workers, never pickled:
a function by reference (``ref``: its module and qualified name, imported
on the worker), arguments and results as one msgpack message whose tuples
stay tuples and whose numpy arrays go after it as arrays (meshrun's send of
an array, as collectives.MPI's lowercase calls send one), and an exception
as its type's reference, its arguments and the worker's traceback text.

A function the workers cannot import by name -- a lambda, a closure, a
bound method of an instance, a function of an interactive ``__main__`` --
is refused on the master, naming it and what to do. A function of a
script's ``__main__`` goes as ``__main__``: a worker runs the master's main
script once, as module ``__mp_main__`` (its ``if __name__ == "__main__":``
block skipped, as multiprocessing's spawn does), the first time a task
needs it."""
from __future__ import annotations

import importlib
import os
import runpy
import sys
import traceback
from typing import Any, Callable

import msgpack
import numpy as np

__all__ = ["ref", "resolve", "send", "recv", "exc_out", "exc_in", "RemoteTraceback",
           "main_of", "set_main"]

_TUPLE, _ARRAY = 1, 2
_main: dict[str, Any] = {"said": None, "module": None, "running": None}


class RemoteTraceback(Exception):
    """A worker's traceback text: the ``__cause__`` of an exception a task
    raised there, as mpi4py.futures' and concurrent.futures' own."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def _lookup(module: Any, qualname: str) -> Any:
    obj = module
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def ref(fn: Callable[..., Any]) -> list[str]:
    """``fn``'s reference ``[module, qualname]``; a TypeError naming it
    where the workers could not import it by that name."""
    if not callable(fn):
        raise TypeError(f"collectives.futures: {fn!r:.60} is not callable")
    mod = getattr(fn, "__module__", None)
    qual = getattr(fn, "__qualname__", None)
    name = f"{mod}.{qual}" if mod and qual else repr(fn)
    why = ""
    if not isinstance(mod, str) or not isinstance(qual, str):
        why = "it has no module and qualified name (a callable object, a partial?)"
    elif "<lambda>" in qual or "<locals>" in qual:
        why = "a lambda or a function defined inside another function has no name to import"
    else:
        try:
            found = _lookup(sys.modules[mod], qual)
        except (KeyError, AttributeError):
            found = None
        if found is not fn and found != fn:
            why = f"{name} is not what that name holds in its module (a bound method of an " \
                  f"instance, a decorated or replaced function?)"
        elif mod == "__main__" and main_of() is None:
            why = "its __main__ has no file the workers could run (an interactive session, " \
                  "python -c)"
    if why:
        raise TypeError(f"collectives.futures: cannot send {name} to the workers: functions go "
                        f"by reference (module and qualified name, imported on the worker) and "
                        f"{why}; define it at the top level of a module (or of the main "
                        f"script) and pass that function")
    return [str(mod), str(qual)]


def main_of() -> list[Any] | None:
    """This process's main script as the workers would run it: ``[module
    name or None, path]``; None where there is no file."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if not path or not os.path.isfile(path):
        return None
    spec = getattr(main, "__spec__", None)
    return [getattr(spec, "name", None), os.path.abspath(path)]


def set_main(said: list[Any] | None) -> None:
    """A worker: the master's main script, run on first need (``resolve``)."""
    _main["said"], _main["module"] = said, None


def _main_module() -> Any:
    if _main["module"] is None:
        said = _main["said"]
        if said is None:
            raise ImportError("the master's __main__ has no file the workers could run")
        name, path = said
        _main["running"] = path
        try:
            glb = runpy.run_module(name, run_name="__mp_main__", alter_sys=False) \
                if name and name != "__main__" else runpy.run_path(path, run_name="__mp_main__")
        finally:
            _main["running"] = None
        module = type(sys)("__mp_main__")
        module.__dict__.update(glb)
        sys.modules["__mp_main__"] = module
        _main["module"] = module
    return _main["module"]


def check_not_in_main() -> None:
    """Refuse an executor that a worker's run of the main script would make
    (the script's top level, unguarded: workers spawning workers)."""
    if _main["running"]:
        raise RuntimeError(f"collectives.futures: a worker, running the main script "
                           f"{_main['running']} to find a task's function there, met an "
                           f"executor made at the script's top level: put that code under "
                           f"'if __name__ == \"__main__\":'")


def resolve(r: list[str]) -> Any:
    """The object a reference names, imported here."""
    mod, qual = r
    module = _main_module() if mod == "__main__" else importlib.import_module(mod)
    return _lookup(module, qual)


def _default(o: Any, arrays: list[np.ndarray]) -> Any:
    if isinstance(o, tuple):
        return msgpack.ExtType(_TUPLE, _packb(list(o), arrays))
    if isinstance(o, np.ndarray):
        if o.dtype.hasobject:
            raise TypeError("an array of Python objects")
        arrays.append(o)
        return msgpack.ExtType(_ARRAY, (len(arrays) - 1).to_bytes(4, "little"))
    if isinstance(o, np.generic):
        return o.item()
    kinds: tuple[Callable[[Any], Any], ...] = (bool, int, float, str, bytes, list, dict)
    for kind in kinds:      # (their subclasses: an IntEnum, a str or dict subclass)
        if isinstance(o, kind):     # type: ignore[arg-type]
            return kind(o)
    raise TypeError(f"an object of type {type(o).__name__}")


def _packb(obj: Any, arrays: list[np.ndarray]) -> bytes:
    return msgpack.packb(obj, use_bin_type=True, strict_types=True,
                         default=lambda o: _default(o, arrays))


def _loads(data: bytes, arrays: list[np.ndarray]) -> Any:
    def hook(code: int, raw: bytes) -> Any:
        if code == _TUPLE:
            return tuple(_loads(raw, arrays))
        if code == _ARRAY:
            return arrays[int.from_bytes(raw, "little")]
        return msgpack.ExtType(code, raw)
    return msgpack.unpackb(data, raw=False, strict_map_key=False, ext_hook=hook)


def dumps(obj: Any, what: str) -> tuple[bytes, list[np.ndarray]]:
    """``obj`` as msgpack bytes and the arrays in it; a TypeError naming
    ``what`` where msgpack and arrays cannot carry it."""
    arrays: list[np.ndarray] = []
    try:
        return _packb(obj, arrays), arrays
    except (TypeError, ValueError, OverflowError) as e:
        raise TypeError(f"collectives.futures: {what} cannot go to another process ({e}): "
                        f"numbers, strings, bytes, None, lists, tuples, dicts and numpy arrays "
                        f"do (msgpack, never pickle)") from None


def send(comm: Any, dest: int, tag: int, obj: Any, what: str) -> None:
    """``obj`` to ``dest`` of ``comm`` (an mpi4py-like communicator): one
    message of bytes, then each array (``recv`` takes them from the same
    source and tag, in order)."""
    data, arrays = dumps(obj, what)
    comm.send([data, len(arrays)], dest=dest, tag=tag)
    for a in arrays:
        comm.send(np.ascontiguousarray(a), dest=dest, tag=tag)


def finish(comm: Any, head: Any, source: int, tag: int) -> Any:
    """The object whose first message ``head`` came from ``source``."""
    data, n = head
    arrays = [comm.recv(source=source, tag=tag) for _ in range(n)]
    return _loads(data, arrays)


def recv(comm: Any, source: int, tag: int) -> Any:
    return finish(comm, comm.recv(source=source, tag=tag), source, tag)


def exc_out(e: BaseException, where: str) -> list[Any]:
    """A task's exception to send: its type's reference, its arguments
    (where they can go), its text and the traceback, headed by ``where``."""
    tb = "".join(traceback.format_exception(type(e), e, e.__traceback__))
    args: Any = list(e.args)
    try:
        dumps(args, "")
    except TypeError:
        args = None
    return [[type(e).__module__, type(e).__qualname__], args, str(e),
            f'\n### {where}\n"""\n{tb}"""']


def exc_in(said: list[Any]) -> BaseException:
    """The exception ``exc_out`` sent, its ``__cause__`` a RemoteTraceback
    of the worker's text; a RuntimeError of its type's name and text where
    the type cannot be imported or made here."""
    (mod, qual), args, text, tb = said
    exc: BaseException | None = None
    try:
        kind = _lookup(importlib.import_module(mod), qual)
        if isinstance(kind, type) and issubclass(kind, BaseException) and args is not None:
            exc = kind(*args)
    except Exception:
        exc = None
    if exc is None:
        exc = RuntimeError(f"{mod}.{qual}: {text}")
    exc.__cause__ = RemoteTraceback(tb)
    return exc
