"""`artifact.gate_record`: the one place that turns gate results into a manifest's verdict, figures and summary
(used by `build` and by `optpipe gate`)."""
from optpipe import artifact
from optpipe.gates import GateResult


def _gates(speed_passed):
    acc = GateResult("accuracy", True, {"ppl_delta_pct": 1.2, "ppl_delta_pct_ci95": [0.5, 2.0], "mean_kl": 0.01},
                     {"max_ppl_delta_pct": 3.0})
    spd = GateResult("speed", speed_passed, {"decode_speedup": 1.1} if speed_passed is not None else {"reason": "x"},
                     {"min_decode_speedup": 2.0}, [] if speed_passed is not False else ["decode 1.10x < 2.00x"])
    return {"accuracy": acc, "speed": spd}


def test_a_failed_gate_rejects_and_lists_its_failure():
    rec = artifact.gate_record(_gates(False), {"tokens": 10})
    assert rec["status"] == "rejected" and rec["failures"] == ["speed: decode 1.10x < 2.00x"]
    assert rec["gates"]["speed"]["status"] == "failed" and rec["evaluation"] == {"tokens": 10}
    assert rec["summary"]["gates.accuracy.ppl_delta_pct"] == 1.2
    assert rec["summary"]["gates.accuracy.ppl_delta_pct_ci95"] == [0.5, 2.0]
    assert rec["summary"]["gates.speed.decode_speedup"] == 1.1 and rec["summary"]["gates.speed.status"] == "failed"
    assert rec["summary"]["gates.accuracy.kl_p99"] is None  # a figure the gate did not report stays visible as None


def test_an_unmeasured_gate_does_not_reject():
    rec = artifact.gate_record(_gates(None))
    assert rec["status"] == "passed" and rec["failures"] == [] and "evaluation" not in rec
    assert rec["gates"]["speed"]["status"] == "not measured"
