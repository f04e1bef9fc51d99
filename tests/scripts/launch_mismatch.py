"""A mesh program for tests/test_mesh_launch.py: rank 1 passes a different shape
to all_reduce, so every rank raises MismatchError."""
import numpy as np

import collectives as C
import mesh

with mesh.init(timeout=20) as world:
    a = np.ones(5 if world.rank == 1 else 4)
    C.all_reduce(world, a)
