"""The host collectives' arguments, checked the same way by every call
(collectives.host.paths): an array as numpy takes it (_array), the
caller's result memory where it can be written straight (_into, _apart,
_parts_into), a root and rows divisible by the group (_root, _rows), an
uneven call's counts (_uneven, _counts_fp, _passes), a scatter's row as
the receiver wants it (_row_as_wanted), and a call's fingerprint (_fp).
collectives.userop and collectives.device.paths use them too."""
from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from mesh import Comm, MismatchError, device
from mesh.comm import group_rank_hint
from mesh.payload import MASKED, is_masked
from mesh.tensors import dtype_name, is_tensor

from ..plan import spans
from ..runner import Ctx, named


_ONE_ARRAY = {      # what to do with a list of arrays, by collective ("": the others)
    "": "call it once per array, or stack them into one (np.stack, torch.stack)",
    "all_reduce": "call it once per array, or stack them into one (np.stack, torch.stack; "
                  "collectives.all_reduce_grads(g, grads) reduces a list of gradients)",
    "scatter": "stack the rows for the ranks into one, shaped (group size, ...) (np.stack, "
               "torch.stack)",
    "all_to_all": "stack them into one (np.stack, torch.stack; all_to_all sends its rows in "
                  "rank order), or for blocks of unequal sizes use "
                  "collectives.all_to_all_v(g, rows, send_counts)",
    "all_to_all_v": "concatenate the blocks for the ranks into one, in rank order "
                    "(np.concatenate, torch.cat), with send_counts their numbers of rows",
}


def _array(name: str, a: Any, writable: bool = False) -> np.ndarray:
    if is_masked(a):
        raise TypeError(f"{name}: {MASKED}")
    if not isinstance(a, np.ndarray):
        kind = f"{type(a).__module__}.{type(a).__name__}"
        if is_tensor(a) or device.is_device(a):     # collectives.host.paths called directly
            raise TypeError(f"{name}: collectives.host.paths takes numpy arrays; torch tensors "
                            f"and device arrays ({kind}) go through collectives.{name}")
        if hasattr(a, "__dlpack_device__"):
            raise TypeError(f"{name}: a {kind} is neither a numpy array, a torch tensor nor "
                            f"a CUDA array; np.from_dlpack(a) gives a numpy array of it")
        if isinstance(a, (list, tuple)) and any(isinstance(x, np.ndarray) or is_tensor(x)
                                                or device.is_device(x) for x in a):
            raise TypeError(f"{name} takes one array (or tensor), got a {type(a).__name__} "
                            f"of {len(a)}: {_ONE_ARRAY.get(name, _ONE_ARRAY[''])}")
        if writable:
            raise TypeError(f"{name} works in place: it needs an array it can write (a "
                            f"numpy array, a torch tensor or a device array), got "
                            f"{type(a).__name__}")
        given, a = a, np.asarray(a)
        if a.dtype.kind not in "biufc" or a.dtype.fields is not None:
            raise TypeError(f"{name}: takes a numeric or bool array, got "
                            f"{kind.removeprefix('builtins.')} "
                            f"{given!r:.60}")
    if a.dtype.kind not in "biufc" or a.dtype.fields is not None:
        raise TypeError(f"{name}: dtype {a.dtype} cannot be sent; numeric and bool arrays only")
    if writable and not a.flags.writeable:
        raise ValueError(f"{name} works in place but the array is read-only")
    return a



def _into(out: Any, arr: np.ndarray | None, shape: tuple[int, ...],
          dtype: Any = None, mine: int | None = None) -> Any:
    """``out`` (a result's memory given by the caller: the torch backend's
    output tensor, so that no second result of its size is made) as the
    result's ``shape``, or None where it cannot be written straight: not a
    C-contiguous writable array of ``arr``'s dtype (``dtype`` where there is
    no ``arr``) and size, or one that overlaps ``arr`` (the call then makes
    its own and the caller copies). A list (of shape[0] such arrays apart
    from each other, one per row) is returned as the list of its rows, each
    shaped shape[1:]. ``arr`` may be row ``mine`` of ``out`` exactly (a
    gather's own row, in place as FSDP passes it: the paths write there
    only the values it holds)."""
    if isinstance(out, list):
        return _apart([_into(o, arr, shape[1:], dtype, 0 if j == mine else None)
                       for j, o in enumerate(out)], shape[0])
    want = np.dtype(dtype) if arr is None else arr.dtype
    if (out is None or type(out) is not np.ndarray or out.dtype != want
            or dtype_name(out.dtype) != dtype_name(want)
            or out.size != math.prod(shape) or not out.flags.c_contiguous
            or not out.flags.writeable):
        return None
    if arr is not None and np.may_share_memory(out, arr) and (
            mine is None or not arr.flags.c_contiguous
            or arr.ctypes.data != out.ctypes.data + mine * arr.nbytes):
        return None
    return out.reshape(shape)



def _apart(rows: list[Any], n: int) -> list[Any] | None:
    """``rows`` (_into's of a list), or None where they are not ``n``, one
    is None or two overlap."""
    if len(rows) != n or any(o is None for o in rows):
        return None
    spans = sorted((o.ctypes.data, o.nbytes) for o in rows)
    return None if any(a + k > b for (a, k), (b, _) in zip(spans, spans[1:])) else rows



def _fp(coll: str, a: np.ndarray | None = None, **kw: Any) -> dict:
    fp: dict[str, Any] = {"coll": coll}
    if a is not None:
        fp["dtype"] = dtype_name(a.dtype)
        fp["shape"] = list(a.shape)
    fp.update((k, v) for k, v in kw.items() if v is not None)
    return fp



def _root(g: Comm, root: int) -> int:
    if not isinstance(root, (int, np.integer)) or not 0 <= root < g.size:
        hint = group_rank_hint(g, root)
        raise ValueError(f"root {root!r} is not a rank of group {g.name} "
                         f"(0..{g.size - 1}{f'; {hint}' if hint else ''})")
    return int(root)



def _rows(name: str, a: np.ndarray, n: int) -> None:
    if a.ndim == 0 or a.shape[0] % n:
        raise ValueError(f"{name} needs a.shape[0] divisible by the group size {n}, "
                         f"got shape {a.shape}")



def _counts_fp(counts: list[int]) -> Any:
    """Row counts as an uneven call's fingerprint holds them: the list, so
    that a rank given other counts raises MismatchError naming both lists
    (on every rank: the fingerprint travels with every message and every
    board post); in a large group one that packs short (its first counts,
    their number, sum and a digest), which still tells the lists apart."""
    if len(counts) <= 64:
        return list(counts)
    import hashlib
    digest = hashlib.blake2b(np.asarray(counts, np.int64).tobytes(), digest_size=6).hexdigest()
    return f"{str(list(counts[:6]))[:-1]}, ...] ({len(counts)} counts, sum {sum(counts)}, " \
           f"digest {digest})"



def _passes(check: Callable[[], Any] | None) -> bool:
    """Whether an uneven call's ``check`` passes, run before the call (the
    short way's, collectives.shm.tiny: a call whose check raises takes the
    long way, which raises it under the call's tag, on every rank)."""
    if check is not None:
        try:
            check()
        except Exception:
            return False
    return True



def _parts_into(out: Any, arr: np.ndarray, counts: list[int], g: Comm) -> list[Any] | None:
    """An uneven all_gather's ``out`` (a list of g.size arrays, one a rank:
    counts[j] rows of arr.shape[1:]) as _into takes each, or None."""
    return _apart([_into(o, arr, (k,) + arr.shape[1:], mine=0 if j == g.rank else None)
                   for j, (o, k) in enumerate(zip(out, counts))], g.size)



def _uneven(name: str, a: Any, counts: list[int], n: int, want: int | None = None
            ) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """An uneven call's array (C-contiguous, with rows) and its chunks: the
    flat [lo, hi) of each rank's ``counts`` rows, in rank order, in an
    array of sum(counts) rows of a.shape[1:]. ``want``: the rows ``a`` must
    have (else ValueError, naming the rows and the counts)."""
    arr = np.asarray(_array(name, a), order="C")
    if arr.ndim == 0:
        raise ValueError(f"{name}: needs an array of rows, got a 0-d array")
    if len(counts) != n or any(not isinstance(k, (int, np.integer)) or isinstance(k, bool)
                               or k < 0 for k in counts):
        raise ValueError(f"{name}: counts must be {n} integers >= 0 (one a rank), got "
                         f"{list(counts)!r:.200}")
    if want is not None and arr.shape[0] != want:
        raise ValueError(f"{name}: the array has {arr.shape[0]} rows where counts "
                         f"{_counts_fp(list(counts))} give it {want}")
    row = math.prod(arr.shape[1:])     # (plain ints: numpy's cumsum cost a small call 10 us more)
    return arr, spans([int(k) * row for k in counts])



def _row_as_wanted(ctx: Ctx, want: np.dtype | None, form: tuple[int, ...] | None,
                   got: np.dtype, shape: tuple[int, ...], root: int, row: str = "row") -> None:
    """A scatter's row of dtype ``got`` and ``shape`` is what this rank
    wants (``want``, ``form``: None, anything), or MismatchError, inside
    the call (which aborts it)."""
    if want is not None and (want != got or dtype_name(want) != dtype_name(got)):
        raise MismatchError(f"{ctx.where()}: {named(ctx.g, ctx.g.rank)} wants its {row} as "
                            f"{dtype_name(want)} (its tensor's dtype, or dtype=) but "
                            f"{named(ctx.g, root, 'root')} scatters {dtype_name(got)}")
    if form is not None and tuple(form) != tuple(shape):
        raise MismatchError(f"{ctx.where()}: {named(ctx.g, ctx.g.rank)} wants its row shaped "
                            f"{list(form)} but {named(ctx.g, root, 'root')} scatters rows "
                            f"shaped {list(shape)}")
