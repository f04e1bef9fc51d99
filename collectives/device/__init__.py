"""Collectives on device arrays: ``paths`` picks CUDA IPC (``cuda_ipc``), the
ring through pinned slots (``ring``) or whole-array staging; ``gpu`` holds a
call's array and streams."""
