"""meshrun: start the workers of a job, relay their output, and stop them all
as soon as one fails, naming the rank that failed first and showing its own
Python traceback.

    meshrun -n 4 train.py --lr 0.1        # 4 workers on this host
    meshrun -n 2 -m package.module        # run a module, like python -m
    MESH_SECRET=... meshrun --nnodes 2 --node-rank 0 --master-addr host0 \\
        --master-port 29500 -n 4 train.py # one meshrun per host

The launcher serves the rendezvous (on node 0) and hands each worker its
place in the job through the environment (see ``mesh.env.from_env``).
"""
from .cli import build_parser, launch, main
from .report import format_report

__all__ = ["main", "launch", "build_parser", "format_report"]
