"""The accuracy gate's arithmetic against hand-computed values, and its decision on the stated statistic."""
import math

import numpy as np
import pytest

from optpipe.gates import accuracy
from optpipe.recipe import AccuracyGate


def test_token_stats_by_hand():
    lr = np.log(np.array([[0.5, 0.5]]))
    lc = np.log(np.array([[0.25, 0.75]]))
    s = accuracy.token_stats(lr, lc, np.array([1]))
    assert s["nll_ref"][0] == pytest.approx(math.log(2))
    assert s["nll_cand"][0] == pytest.approx(-math.log(0.75))
    assert s["kl"][0] == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3))
    assert not s["same_top1"][0]  # argmax: 0 (first of a tie) vs 1
    assert s["dp"][0] == pytest.approx(0.25)


def test_log_softmax_is_stable_and_normalized():
    x = np.array([[1000.0, 1000.0, -1000.0]])
    lp = accuracy.log_softmax(x)
    assert np.isfinite(lp).all() and np.exp(lp).sum() == pytest.approx(1.0)
    assert lp[0, 0] == pytest.approx(math.log(0.5))


def test_ppl_delta_and_summary_by_hand():
    nr, nc = np.ones(64), np.full(64, 1.1)
    assert accuracy.ppl_delta_pct(nr, nc) == pytest.approx(100 * (math.exp(0.1) - 1))
    s = accuracy.summarize({"nll_ref": nr, "nll_cand": nc, "kl": np.linspace(0, 1, 64),
                            "same_top1": np.arange(64) % 4 != 0, "dp": np.full(64, 0.02)})
    assert s["ppl_reference"] == pytest.approx(math.e, abs=1e-4)
    assert s["ppl_delta_pct"] == pytest.approx(10.5171, abs=1e-4)
    assert s["ppl_delta_pct_ci95"] == pytest.approx([10.5171, 10.5171], abs=1e-4)  # a constant shift: no spread
    assert s["top1_agreement"] == 0.75 and s["rms_dp_pct"] == pytest.approx(2.0)
    assert s["kl_p99"] == pytest.approx(np.percentile(np.linspace(0, 1, 64), 99))
    assert s["tokens"] == 64


def test_bootstrap_interval_covers_the_point_and_narrows_with_more_tokens():
    rng = np.random.default_rng(1)
    widths = []
    for n in (1024, 16384):
        nr = rng.gamma(2.0, 1.5, n)
        nc = nr + rng.normal(0.01, 0.2, n)
        lo, hi = accuracy.bootstrap_interval(nr, nc)
        point = accuracy.ppl_delta_pct(nr, nc)
        assert lo < point < hi
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 3  # ~1/sqrt(16) of the width
    assert accuracy.bootstrap_interval(nr, nc) == accuracy.bootstrap_interval(nr, nc)  # seeded: reproducible


def _metrics(point, lo, hi):
    return {"ppl_delta_pct": point, "ppl_delta_pct_ci95": [lo, hi], "mean_kl": 0.01, "kl_p99": 0.1,
            "top1_agreement": 0.9, "tokens": 1000}


def test_the_gate_decides_on_the_upper_bound_by_default():
    gate = AccuracyGate(max_ppl_delta_pct=3.0)
    assert gate.decide_on == "upper_95"
    res = accuracy.check(_metrics(2.9, 2.1, 3.4), gate)
    assert res.passed is False
    assert "perplexity delta +3.40% (upper 95% bound) exceeds" in res.failures[0] and "point +2.90%" in res.failures[0]
    assert accuracy.check(_metrics(2.9, 2.1, 3.4), AccuracyGate(max_ppl_delta_pct=3.0, decide_on="point")).passed
    assert accuracy.check(_metrics(1.0, 0.5, 1.5), gate).passed


def test_kl_tail_and_non_finite_candidates_fail():
    res = accuracy.check(_metrics(0.1, 0.0, 0.2), AccuracyGate(max_kl_p99=0.05))
    assert res.passed is False and "KL p99" in res.failures[0]
    bad = {"ppl_reference": None, "ppl_candidate": float("inf"), "ppl_delta_pct": float("inf"),
           "ppl_delta_pct_ci95": [float("inf"), float("inf")], "mean_kl": float("inf"), "top1_agreement": 0.0,
           "tokens": 0, "non_finite_logits": True}
    res = accuracy.check(bad, AccuracyGate())
    assert res.passed is False and res.failures[0] == "candidate produced NaN/inf logits"
