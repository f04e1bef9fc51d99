"""A mesh program for tests/test_mesh_p2p.py: rank 0 sends a torch tensor to a
rank that has never imported torch; it arrives as a tensor all the same."""
import sys
import mesh
with mesh.init() as world:
    if world.rank == 0:
        import torch
        world.send(torch.arange(4, dtype=torch.bfloat16), 1)
    else:
        assert "torch" not in sys.modules
        x = world.recv(0)
        print(type(x).__name__, x.dtype, x.tolist())
