"""How long meshrun takes to stop a job, from Ctrl-C to its exit, for two
trees side by side (base and head, trials alternating):

    python tools/bench_stop.py BASE_TREE HEAD_TREE [TRIALS] [RANKS]

The job is tests/scripts/launch_where.py (of this tree): rank 1 waits in a
receive that never comes, rank 0 computes in a Python loop, and with 3
ranks rank 2 never answers meshrun's question of where it is (wedged in
native code, a C call that holds the GIL). Prints each tree's times in
milliseconds, their median and best."""
from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "tests", "scripts", "launch_where.py")


def stop_ms(tree: str, ranks: int) -> float:
    """One job of ``tree``'s meshrun, stopped by SIGINT once rank 0 computes."""
    with tempfile.TemporaryDirectory() as d:
        env = dict(os.environ, PYTHONPATH=tree, MESH_HEARTBEAT="0.1")
        proc = subprocess.Popen([sys.executable, "-m", "mesh.launch", "-n", str(ranks), SCRIPT,
                                 d], cwd=tree, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            want = ["0.ready"] + (["2.ready"] if ranks > 2 else [])
            deadline = time.monotonic() + 60
            while not all(os.path.exists(os.path.join(d, w)) for w in want):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{tree}: the ranks never got ready")
                time.sleep(0.01)
            time.sleep(0.2)
            t0 = time.perf_counter()
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=60)
            return (time.perf_counter() - t0) * 1000
        finally:
            proc.kill()
            proc.wait()


def main() -> None:
    base, head = sys.argv[1], sys.argv[2]
    trials = int(sys.argv[3]) if len(sys.argv) > 3 else 5
    ranks = int(sys.argv[4]) if len(sys.argv) > 4 else 2
    times: dict[str, list[float]] = {base: [], head: []}
    for _ in range(trials):
        for tree in (base, head):
            times[tree].append(stop_ms(tree, ranks))
    for name, tree in (("base", base), ("head", head)):
        t = times[tree]
        print(f"{name}: median {statistics.median(t):.0f} ms, best {min(t):.0f} ms  "
              f"({', '.join(f'{x:.0f}' for x in t)})")


if __name__ == "__main__":
    main()
