"""Imported last by mesh.spawn's fork server, once the modules it preloads
are loaded: where mesh.spawn started the server with OPENBLAS_NUM_THREADS=1
(numpy's OpenBLAS then has no pool for a fork to stop), the server, and
what it forks for others (the caller's own fork-server processes), get the
caller's value back."""
import os

_was = os.environ.pop("MESH_SERVER_OPENBLAS", None)
if _was is not None:
    if _was.startswith("="):
        os.environ["OPENBLAS_NUM_THREADS"] = _was[1:]
    else:
        os.environ.pop("OPENBLAS_NUM_THREADS", None)
