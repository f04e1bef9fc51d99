"""examples/torch_ddp.py as it is, then a plain gloo script in the same
ranks (for tests/test_collectives_torchdist.py, under meshrun -n N):

    torch_ddp_then_gloo.py

meshrun's env:// makes torch's store over a mesh; for a gloo group that
mesh must not outlive init_process_group (under torchrun there is none).
Each rank prints the threads and the mesh left after its gloo group's
destroy_process_group."""
import os
import runpy
import threading

import torch
import torch.distributed as dist

from mesh import world as _world

HERE = os.path.dirname(os.path.abspath(__file__))
runpy.run_path(os.path.join(HERE, "..", "..", "examples", "torch_ddp.py"), run_name="__main__")
before = sorted(t.name for t in threading.enumerate())
dist.init_process_group("gloo")
during = sorted(t.name for t in threading.enumerate())
t = torch.ones(3)
dist.all_reduce(t)
assert t.tolist() == [dist.get_world_size()] * 3, t
dist.destroy_process_group()
after = sorted(t.name for t in threading.enumerate())
print(f"gloo: threads before {before} during {during} after {after}, mesh open "
      f"{_world.current() is not None}", flush=True)
