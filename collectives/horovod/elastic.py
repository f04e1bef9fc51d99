"""``hvd.elastic`` refused by name: Horovod's elastic examples
(``@hvd.elastic.run``, ``hvd.elastic.TorchState``) fail at their first use
with what to do instead, not a bare AttributeError on ``hvd``."""
from __future__ import annotations

from typing import NoReturn

__all__: list[str] = []

WHY = ("a mesh does not grow or shrink in place; for restarts after a failure run "
       "`meshrun -n N --max-restarts K train.py` and resume from a checkpoint (rank 0 "
       "saves, hvd.broadcast_object(resume_from_epoch) on restart), or respawn with "
       "fewer ranks in a loop around mesh.spawn catching WorkerError (README: Coming "
       "from Horovod)")


def __getattr__(name: str) -> NoReturn:
    if name.startswith("__"):       # (the import system's and pickle's probes)
        raise AttributeError(name)
    raise NotImplementedError(f"hvd.elastic.{name}: Horovod's elastic training is not "
                              f"available on meshrun: {WHY}")
