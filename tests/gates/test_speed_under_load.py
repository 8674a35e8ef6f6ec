"""The speed gate beside a CPU hog that starts after the gates' load probe (another job on a shared runner): with
the default thread count it moves both runners to the CPUs left free and reaches a verdict; with the count fixed
(the user's word) the same load leaves it inconclusive."""
import subprocess
import sys
import time

import numpy as np
import pytest

from optpipe import hw
from optpipe.gates import speed
from optpipe.recipe import SpeedGate

pytestmark = pytest.mark.skipif(hw.usable_cpus() < 2, reason="needs two CPUs: one for the hog, one for the gate")


@pytest.fixture(scope="module")
def runners(tiny_llama):
    from transformers import AutoModelForCausalLM

    from optpipe.targets.torch_eager import TorchEagerRunner

    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    cpus = hw.usable_cpus()
    return lambda: (TorchEagerRunner(model, cpus), TorchEagerRunner(model, cpus))


def _gate_beside_a_hog(reference, candidate, adapt: bool) -> dict:
    cpus = hw.usable_cpus()
    hogs: list = []

    def sleep(seconds):  # the gate's first wait: the load starts here, after any probe that came before the gate
        if not hogs:
            hogs.extend(subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cpus - 1))
            time.sleep(0.3)
        time.sleep(seconds)

    # decided on the point estimate: the question here is whether rounds are measured at all beside the load (an
    # interval's width is another matter); so the only way to "inconclusive" is every round discarded as busy
    gate = SpeedGate(repeats=3, max_repeats=6, prompt_tokens=16, new_tokens=8, min_decode_speedup=0.5,
                     decide_on="point")
    try:
        m = speed.measure(reference, candidate, np.arange(16) % 200, 8, gate, cpus, cpus, sleep=sleep,
                          adapt_threads=adapt)
        return {"metrics": m, "result": speed.check(m, gate, cpus)}
    finally:
        for h in hogs:
            h.kill()
            h.wait()


def test_a_load_started_mid_gate_is_met_at_the_cpus_it_leaves_free(runners):
    got = _gate_beside_a_hog(*runners(), adapt=True)
    m, r = got["metrics"], got["result"]
    assert not r.inconclusive, r.failures
    assert r.passed is True and m["rounds"] >= 3
    assert m["threads"] == 1 and m["threads_lowered"][0]["from"] == hw.usable_cpus()
    assert m["threads_lowered"][0]["background_cpus"] >= 0.5  # the hog was seen
    assert r.thresholds["threads"] == 1  # the manifest says at how many threads it was measured


def test_a_fixed_thread_count_beside_the_same_load_stays_inconclusive(runners):
    got = _gate_beside_a_hog(*runners(), adapt=False)
    assert got["result"].inconclusive and got["metrics"]["rounds"] == 0
    assert "threads_lowered" not in got["metrics"]
