"""mpi4py.futures' documentation example that computes the Julia set
(smaller: 128 x 96), its map with chunksize and an unordered map, then
the tasks/s of a map of tiny tasks at chunksize 1 and 100; the same script
under both runtimes:

    meshrun -n 3 python -m collectives.futures tools/bench_futures.py mesh OUT.pgm
    mpirun -n 3 python -m mpi4py.futures tools/bench_futures.py mpi4py OUT.pgm

Prints the image's sha1 and the maps' results (the same under both), and
the throughput on stderr."""
import hashlib
import sys
import time

if sys.argv[1:2] == ["mesh"]:
    from collectives.futures import MPIPoolExecutor
else:
    from mpi4py.futures import MPIPoolExecutor

x0, x1, w = -2.0, +2.0, 64 * 2
y0, y1, h = -1.5, +1.5, 48 * 2
dx = (x1 - x0) / w
dy = (y1 - y0) / h
c = complex(0, 0.65)


def julia(x, y):
    z = complex(x, y)
    n = 255
    while abs(z) < 3 and n > 1:
        z = z ** 2 + c
        n -= 1
    return n


def julia_line(k):
    line = bytearray(w)
    y = y1 - k * dy
    for j in range(w):
        x = x0 + j * dx
        line[j] = julia(x, y)
    return line


def tiny(x):
    return x + 1


if __name__ == '__main__':
    out = sys.argv[2]
    with MPIPoolExecutor() as executor:
        image = executor.map(julia_line, range(h))
        with open(out, 'wb') as f:
            f.write(b'P5 %d %d %d\n' % (w, h, 255))
            for line in image:
                f.write(line)
        print("julia sha1", hashlib.sha1(open(out, "rb").read()).hexdigest())
        print("pow map chunksize=3", list(executor.map(pow, [2, 3, 4, 5], [6, 7, 8, 9],
                                                      chunksize=3)))
        print("unordered sorted", sorted(executor.map(tiny, range(10), unordered=True)))
        for cs in (1, 100):
            n = 2000
            list(executor.map(tiny, range(50), chunksize=cs))
            t = time.perf_counter()
            got = list(executor.map(tiny, range(n), chunksize=cs))
            dt = time.perf_counter() - t
            assert got == list(range(1, n + 1))
            print(f"THROUGHPUT tiny map chunksize={cs}: {n / dt:.0f} tasks/s", file=sys.stderr)
