"""A program of mpi4py.futures' (one import changed) whose tasks are
functions of its own ``__main__``: run by ``python`` (two workers spawned)
and by ``python -m collectives.futures`` under ``meshrun -n 3`` (the other
two ranks serve). Prints what each way must print alike."""
import sys

import numpy as np

from collectives.futures import MPIPoolExecutor

SCALE = 10      # (a worker runs this module as __mp_main__: its globals are there)


def scaled(x, y=1):
    return (x * SCALE * y, np.arange(3) * x)


def fails(x):
    raise KeyError(f"no {x}")


if __name__ == "__main__":
    print("args", sys.argv[1:])
    with MPIPoolExecutor(max_workers=2) as ex:
        print("workers", ex.num_workers)
        got = list(ex.map(scaled, range(5), chunksize=2))
        print("map", [v for v, _ in got], [a.tolist() for _, a in got][-1])
        print("submit", ex.submit(scaled, 2, y=3).result()[0])
        try:
            ex.submit(fails, "key").result()
        except KeyError as e:
            print("raised", repr(e), "fails" in str(e.__cause__), "### Worker" in str(e.__cause__))
        try:
            ex.submit(lambda v: v, 1)
        except TypeError as e:
            print("refused", str(e)[:60])
    print("done")
