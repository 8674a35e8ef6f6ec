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
