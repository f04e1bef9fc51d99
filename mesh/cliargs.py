"""Argument types for the command-line tools (``python -m mesh.bench``,
``collectives.tools.*``, ``engine.bench``, ``engine.show`` ...).

Each turns a nonsense value into argparse's own usage error, naming the
option and what it takes, instead of a traceback from deep inside a run.
"""
from __future__ import annotations

import argparse
import math
from typing import Any, Callable, Iterable

__all__ = ["positive", "nonnegative", "positive_float", "nonnegative_float", "checked",
           "names_in", "positive_list", "size_text"]


def _number(text: str, kind: type) -> Any:
    try:
        value = kind(text)
    except ValueError:
        return None
    return value if kind is int or math.isfinite(value) else None


def _bounded(kind: type, ok: Callable[[Any], bool], what: str) -> Callable[[str], Any]:
    """An argument type: ``text`` as a ``kind`` (int, or a finite float) for
    which ``ok`` holds, else a usage error saying ``what`` it takes."""
    def typed(text: str) -> Any:
        x = _number(text, kind)
        if x is None or not ok(x):
            raise argparse.ArgumentTypeError(f"{text!r}: {what}")
        return kind(x)
    typed.__name__ = what
    return typed


positive = _bounded(int, lambda n: n >= 1, "a whole number of at least 1")
nonnegative = _bounded(int, lambda n: n >= 0, "a whole number of at least 0")
positive_float = _bounded(float, lambda x: x > 0, "a number above 0")
nonnegative_float = _bounded(float, lambda x: x >= 0, "a number of at least 0")


def checked(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """``parse`` as an argument type: its ValueError's message becomes the
    usage error (argparse alone would say only "invalid value")."""
    def typed(text: str) -> Any:
        try:
            return parse(text)
        except (ValueError, KeyError, TypeError) as e:
            said = str(e)
            raise argparse.ArgumentTypeError(
                said if repr(text) in said else f"{text!r}: {said}") from None
    typed.__name__ = getattr(parse, "__name__", "value")
    return typed


def positive_list(text: str) -> list[int]:
    """``"2,4"`` -> ``[2, 4]``: comma-separated whole numbers of at least 1."""
    parts = [p for p in text.split(",") if p.strip()]
    if not parts:
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated whole numbers, e.g. 2,4")
    return [positive(p.strip()) for p in parts]


def names_in(allowed: Iterable[str], empty: bool = False) -> Callable[[str], list[str]]:
    """A type for ``"a,b"``: comma-separated names, each one of ``allowed``
    (``""``, none at all, where ``empty``)."""
    known = list(allowed)

    def typed(text: str) -> list[str]:
        names = [p.strip() for p in text.split(",") if p.strip()]
        wrong = [n for n in names if n not in known]
        if wrong or not (names or empty):
            raise argparse.ArgumentTypeError(
                f"{text!r}: comma-separated names out of {', '.join(known)}"
                + (f" ({', '.join(map(repr, wrong))} is not one)" if wrong else ""))
        return names
    typed.__name__ = "names"
    return typed


def size_text(n: int) -> str:
    """A size in bytes as the tools print it and take it (``--sizes``,
    mesh.peer.parse_size): 65536 -> "64K", 3 << 30 -> "3G", 1000 -> "1000"."""
    for unit, k in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= k and n % k == 0:
            return f"{n // k}{unit}"
    return str(n)
