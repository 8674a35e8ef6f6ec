"""The speed gate's statistics: paired rounds, an interval that decides, more rounds when it cannot, busy rounds
discarded, and "inconclusive" (a refusal) when the bound runs out."""
import itertools

import numpy as np
import pytest

from optpipe.gates import speed
from optpipe.recipe import SpeedGate
from optpipe.runtime.generation import Generation

PROMPT = np.arange(8)


class FakeRunner:
    """A runner whose decode takes the next of `seconds` (cycled): speed without a model."""

    def __init__(self, seconds):
        self.seconds = itertools.cycle(seconds)

    def generate(self, ids, max_new_tokens, eos_token_id=None, pick=None, on_token=None):
        s = next(self.seconds)
        return Generation([1] * max_new_tokens, s / 10, s, prefill_cpu_seconds=s / 5, decode_cpu_seconds=2 * s)


def gate_run(ref_s, cand_s, monkeypatch, busy=lambda i: 0.0, **gate):
    calls = itertools.count()
    monkeypatch.setattr(speed.BackgroundLoad, "cpus", lambda self: busy(next(calls)))
    g = SpeedGate(**{"repeats": 5, "prompt_tokens": 8, "new_tokens": 4, **gate})
    m = speed.measure(FakeRunner(ref_s), FakeRunner(cand_s), PROMPT, 4, g, threads=2, cpus=2, sleep=lambda s: None)
    return speed.check(m, g, 2)


def test_interval_is_geometric_mean_with_t_bounds():
    point, lo, hi = speed.ratio_interval([2.0, 2.0, 2.0])
    assert (point, lo, hi) == pytest.approx((2.0, 2.0, 2.0))
    point, lo, hi = speed.ratio_interval([1.0, 4.0])
    assert point == pytest.approx(2.0) and lo < 1.0 and hi > 4.0  # two rounds: t with 1 df is wide
    assert speed.ratio_interval([3.0])[1:] == (0.0, float("inf"))


def test_clear_speedup_passes_after_the_minimum_rounds(monkeypatch):
    r = gate_run([1.0, 1.02, 0.98], [0.5, 0.51, 0.49], monkeypatch, min_decode_speedup=1.5)
    assert r.passed and r.metrics["rounds"] == 5 and r.metrics["rounds_busy"] == 0
    lo, hi = r.metrics["decode_speedup_ci95"]
    assert lo > 1.5 and lo <= r.metrics["decode_speedup"] <= hi
    assert r.metrics["decode_speedup_cpu_time"] == pytest.approx(r.metrics["decode_speedup"], rel=0.05)


def test_clear_slowdown_fails_with_the_interval_in_the_reason(monkeypatch):
    r = gate_run([1.0, 1.02, 0.98], [1.0, 0.99, 1.01], monkeypatch, min_decode_speedup=1.5)
    assert r.passed is False and not r.inconclusive and r.metrics["rounds"] == 5
    assert "95% interval" in r.failures[0] and "below min_decode_speedup 1.5x" in r.failures[0]
    assert r.to_json()["status"] == "failed"


def test_a_ratio_straddling_the_threshold_is_inconclusive_not_a_coin_flip(monkeypatch):
    r = gate_run([1.0, 1.3, 0.8, 1.1], [0.7, 0.75, 0.62, 0.9, 0.66], monkeypatch, min_decode_speedup=1.5,
                 max_repeats=12)
    assert r.passed is False and r.inconclusive and r.metrics["rounds"] == 12
    assert r.failures[0].startswith("inconclusive:") and r.to_json()["status"] == "inconclusive"
    # the same measurement decided on the point estimate gives a verdict
    assert gate_run([1.0, 1.3, 0.8, 1.1], [0.7, 0.75, 0.62, 0.9, 0.66], monkeypatch, min_decode_speedup=1.5,
                    max_repeats=12, decide_on="point").inconclusive is False


def test_busy_rounds_are_discarded_and_recorded(monkeypatch):
    r = gate_run([1.0], [0.5], monkeypatch, busy=lambda i: 1.5 if i < 3 else 0.0, min_decode_speedup=1.5)
    assert r.passed and r.metrics["rounds"] == 5 and r.metrics["rounds_busy"] == 3
    assert r.metrics["busy_background_cpus"] == [1.5, 1.5, 1.5]


def test_a_machine_busy_throughout_is_inconclusive_naming_the_load(monkeypatch):
    r = gate_run([1.0], [0.5], monkeypatch, busy=lambda i: 1.0, min_decode_speedup=1.5, max_repeats=6)
    assert r.passed is False and r.inconclusive and r.metrics["rounds"] == 0
    assert "other processes kept 1.0 CPU(s) busy" in r.failures[0]


def test_load_on_idle_cpus_is_allowed(monkeypatch):
    g = SpeedGate(repeats=3, min_decode_speedup=1.5)
    monkeypatch.setattr(speed.BackgroundLoad, "cpus", lambda self: 2.0)
    m = speed.measure(FakeRunner([1.0]), FakeRunner([0.5]), PROMPT, 4, g, threads=2, cpus=4, sleep=lambda s: None)
    assert m["rounds"] == 3 and m["rounds_busy"] == 0  # a 2-thread gate on 4 CPUs leaves 2 to others


def test_max_repeats_below_repeats_names_both_fields():
    with pytest.raises(ValueError, match=r"max_repeats \(3\) must be >= repeats \(5\)"):
        SpeedGate(repeats=5, max_repeats=3)
    assert SpeedGate(repeats=2).max_repeats == 10 and SpeedGate(repeats=5).max_repeats == 15
