"""A mesh program for tests/test_mesh_launch.py: join through mesh.init(), have
rank 0 greet every rank and collect the replies, then leave."""
import mesh

with mesh.init(timeout=20) as world:
    if world.rank == 0:
        for dst in range(1, world.size):
            world.send({"hello": dst}, dst)
        replies = [world.recv(src)["from"] for src in range(1, world.size)]
        print(f"rank 0 heard from {replies}")
    else:
        msg = world.recv(0)
        world.send({"from": world.rank, "echo": msg["hello"]}, 0)
        print(f"rank {world.rank} got {msg}")
