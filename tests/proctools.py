"""Helpers shared by the tests that check no process outlives a job."""
from __future__ import annotations

__all__ = ["alive"]


def alive(pid: int) -> bool:
    """True while pid is a live process (a zombie awaiting its reaper is dead)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:
        return True
