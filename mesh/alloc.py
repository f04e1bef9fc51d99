"""The C allocator's thresholds, for a rank that receives from other hosts.

ZeroMQ's I/O thread reads a large message from a tcp:// socket into buffers
it allocates, a frame at a time (mesh.wire.FRAME_BYTES, 1 MiB), and frees
them once the message is copied into place. glibc's malloc serves those
from its heap or maps them fresh, and gives the heap's freed top back to
the kernel past a threshold of twice the largest block it last unmapped:
which one a process falls into decided, run by run, whether every 64 MiB
message also paid 16384 page faults. Across two network namespaces a
64 MiB ping-pong took 31-34 ms in some runs and 40-50 ms in others
(BENCHMARKS.md, thirty-second session); with blocks under 32 MiB always
from the heap and up to 128 MiB of its freed top kept, 31 ms in every run
(a threshold of 2 or 8 MiB made 16 MiB messages 10% slower). MPI libraries
do the same (MVAPICH and UCX set these too). The price: up to 128 MiB of
freed memory stays with the process.

Done once per process, on Linux with glibc, when the mesh has a peer on
another host, unless MESH_MALLOC_TUNE=0 or the user set glibc's own
MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ / GLIBC_TUNABLES.
"""
from __future__ import annotations

import ctypes
import os
import sys

from .peer import config_flag

__all__ = ["tune", "tuned"]

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 << 20    # (the most glibc's own moving threshold reaches)
TRIM_THRESHOLD = 128 << 20
tuned = False


def tune() -> bool:
    """Set the thresholds (once); whether they are set now."""
    global tuned
    if tuned:
        return True
    if not sys.platform.startswith("linux") or not config_flag("MESH_MALLOC_TUNE", True):
        return False
    if any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_",
                                     "GLIBC_TUNABLES")):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version       # glibc's thresholds only (not musl's malloc)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    tuned = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and \
        bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return tuned
