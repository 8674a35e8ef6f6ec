"""Coverage gate: precision per linear read from the artifact; a quantize pass that matched nothing is refused."""
import pytest

import optpipe
from optpipe.gates import coverage
from optpipe.recipe import CoverageGate

from ..conftest import FUSED_INT4, tiny_recipe


def test_measure_and_check_by_hand():
    m = coverage.measure({"a": "int4", "b": "int4", "c": "float32", "d": "int8"})
    assert (m["linears"], m["quantized"], m["quantized_fraction"]) == (4, 3, 0.75)
    assert m["by_precision"] == {"float32": 1, "int4": 2, "int8": 1}
    assert coverage.check(m, CoverageGate(), [("passes[3] (quantize-int4)", 2)]).passed
    res = coverage.check(m, CoverageGate(min_quantized_fraction=0.9), [("passes[3] (quantize-int4)", 2)])
    assert res.passed is False and "quantized fraction 0.750 (3/4 linears) below min_quantized_fraction 0.9" in res.failures[0]
    res = coverage.check(m, CoverageGate(), [("passes[1] (quantize-int8)", 0)])
    assert res.passed is False and "passes[1] (quantize-int8) quantized no layer" in res.failures[0]
    assert coverage.check(coverage.measure({}), CoverageGate(), []).passed is None  # not measurable: not passed


def test_include_matching_nothing_is_refused(tiny_llama, tmp_path):
    passes = FUSED_INT4[:3] + [{"name": "quantize-int4", "block_size": 32, "include": ["^no_such_layer$"]}]
    with pytest.raises(optpipe.GateFailed, match=r"coverage: passes\[3\] \(quantize-int4\) quantized no layer"):
        optpipe.build(tiny_recipe(tiny_llama, passes), output=tmp_path / "o", log=lambda m: None)
    assert not (tmp_path / "o").exists()


def test_manifest_records_every_linear_precision(tiny_llama, tmp_path):
    res = optpipe.build(tiny_recipe(tiny_llama, FUSED_INT4), output=tmp_path / "o", log=lambda m: None)
    cov = res.manifest["gates"]["coverage"]
    assert cov["status"] == "passed"
    # 2 layers x (qkv, o, gate_up, down) quantized; lm_head (excluded by default) stays float
    # (the float-zero-point kernel's helpers, e.g. `<layer>/block_sums`, belong to their layer: not counted apart)
    assert cov["by_precision"] == {"float32": 1, "int4": 8} and cov["linears"] == 9
    assert cov["layers"]["lm_head"] == "float32" and cov["quantized_fraction"] == round(8 / 9, 4)
