"""Imported last by mesh.spawn's fork server, once the modules it preloads
are loaded: where mesh.spawn started the server with OPENBLAS_NUM_THREADS=1
(numpy's OpenBLAS then has no pool for a fork to stop), the server, and
what it forks for others (the caller's own fork-server processes), get the
caller's value back; and the preloaded modules' objects are frozen out of
the garbage collector's way (``gc.freeze``, as Python's documentation
advises before forks): every rank re-scanned them in each full collection,
0.15-0.35 s of CPU a rank with torch and torch._dynamo preloaded, paid at
each ``engine.distribute`` (its measurements start with one) and whenever
Python's own thresholds ran one."""
import gc
import os

_was = os.environ.pop("MESH_SERVER_OPENBLAS", None)
if _was is not None:
    if _was.startswith("="):
        os.environ["OPENBLAS_NUM_THREADS"] = _was[1:]
    else:
        os.environ.pop("OPENBLAS_NUM_THREADS", None)

gc.collect()      # (the imports' own garbage first: frozen, it would live on in every rank)
gc.freeze()
