"""collectives.tools.threadcpu: a process's CPU thread by thread."""
import sys
import threading
import time

import pytest

from collectives.tools import threadcpu
from collectives.tools.threadcpu import Snapshot, snapshot, spent


def test_spent_is_each_kinds_cpu_per_call_and_counts_what_ended_threads_took() -> None:
    before = Snapshot({1: ("main", 10_000_000, 0), 2: ("lane", 0, 0),
                       3: ("gloo", 5_000_000, 1_000_000)}, total=0.100)
    # thread 3 ended; thread 4 (progress) started; the process took 0.080 s in all
    after = Snapshot({1: ("main", 50_000_000, 2_000_000), 2: ("lane", 20_000_000, 4_000_000),
                      4: ("progress", 6_000_000, 0)}, total=0.180)
    got = spent(before, after, calls=2)
    assert got["main"] == pytest.approx(0.020) and got["lane"] == pytest.approx(0.010)
    assert got["progress"] == pytest.approx(0.003) and got["gloo"] == 0
    assert got["other"] == 0 and got["ended"] == pytest.approx((0.080 - 0.066) / 2)
    assert got["waited"] == pytest.approx(0.003)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="schedstat is Linux's")
def test_a_lanes_cpu_is_told_apart_from_the_main_threads() -> None:
    burnt, stop = threading.Event(), threading.Event()

    def burn() -> None:
        t = time.thread_time()
        while time.thread_time() - t < 0.05:
            pass
        burnt.set()
        stop.wait(10)
    lane = threading.Thread(target=burn, name="collectives-lane")
    before = snapshot()
    lane.start()
    t = time.thread_time()
    while time.thread_time() - t < 0.02:
        pass
    assert burnt.wait(10)
    got = spent(before, snapshot())
    stop.set()
    lane.join()
    assert got["lane"] >= 0.04 and got["main"] >= 0.015, got
    assert set(got) == {*threadcpu.KINDS, "waited"}
