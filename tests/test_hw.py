"""Machine facts the gates rely on."""
import subprocess
import sys
import time

import pytest

from optpipe import hw


@pytest.mark.skipif(not hasattr(__import__("os"), "sched_getaffinity"), reason="per-CPU affinity is Linux-only")
def test_background_load_sees_a_cpu_bound_process_and_not_this_one():
    quiet = hw.BackgroundLoad()
    t = time.process_time()
    while time.process_time() - t < 0.5:  # this process's own work is not background
        pass
    own = quiet.cpus()
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)  # let it start
        loaded = hw.BackgroundLoad()
        time.sleep(1.0)
        others = loaded.cpus()
    finally:
        hog.kill()
    if own is None:
        pytest.skip("no per-CPU counters on this machine")
    # on a quiet machine own ~0 and others ~1; whatever else runs, the hog adds about a CPU the busy loop did not
    assert others - own > 0.4, (own, others)


@pytest.mark.parametrize("threads, others, cpus, expected", [
    (2, 0.0, 2, 2), (2, 0.2, 2, 2),   # quiet, or noise under a quarter CPU: the default stands
    (2, 1.0, 2, 1), (2, 1.9, 2, 1),   # a hog takes a CPU; never fewer than one thread
    (4, 1.0, 4, 3), (1, 0.0, 4, 1),   # never more than asked
    (2, None, 2, 2),                  # load unknown: unchanged
])
def test_threads_beside_load_leaves_the_busy_cpus_to_their_owners(threads, others, cpus, expected):
    assert hw.threads_beside_load(threads, others, cpus) == expected
