"""cpu-ipex: without IPEX (the default environment) the build stops at once and says how to install it;
with IPEX (scripts/check_ipex.sh's environment; marked `ipex`, skipped elsewhere) tiny builds run and the
speed gate refuses weight-only INT4 on a CPU without AVX512-FP16/AMX, naming that cause."""
import importlib.util

import pytest

import optpipe
from optpipe.cli import main
from optpipe.errors import GateFailed
from optpipe.targets.cpu_ipex import fast_woq_kernels

from ..conftest import make_tiny, tiny_recipe, write_recipe

HAVE_IPEX = importlib.util.find_spec("intel_extension_for_pytorch") is not None
needs_ipex = pytest.mark.skipif(not HAVE_IPEX, reason="intel-extension-for-pytorch not installed "
                                                      "(run scripts/check_ipex.sh)")


def ipex_recipe(model_dir, passes, **speed):
    r = tiny_recipe(model_dir, passes, speed={"min_decode_speedup": 0.05, "prompt_tokens": 16, "new_tokens": 8,
                                              "repeats": 1, "threads": 1, **speed})
    r["target"] = "cpu-ipex"
    return r


@pytest.mark.skipif(HAVE_IPEX, reason="checks the message shown where IPEX is missing")
def test_missing_ipex_stops_before_loading_with_install_hint(tmp_path, capsys):
    recipe = write_recipe(tmp_path, ipex_recipe("/nonexistent/model", [{"name": "ipex-optimize"}]))
    assert main(["build", str(recipe), "-o", str(tmp_path / "art")]) == 2
    err = capsys.readouterr().err
    assert "intel-extension-for-pytorch is not importable" in err and "scripts/check_ipex.sh" in err
    assert "Traceback" not in err and not (tmp_path / "art").exists()


@pytest.mark.skipif(HAVE_IPEX, reason="checks the message shown where IPEX is missing")
def test_missing_ipex_is_said_before_a_cpu_measurement_refuses_a_pass(tmp_path, monkeypatch, capsys):
    """A missing backend is certain; a pass's CPU check may be a timing: the user hears the certain cause, always."""
    from optpipe.errors import RecipeError
    from optpipe.passes.torch_bf16 import Bf16Autocast

    def measured_slow(self, facts=None):
        raise RecipeError("bf16 measured 0.97x fp32 here")

    monkeypatch.setattr(Bf16Autocast, "check_machine", measured_slow)
    recipe = write_recipe(tmp_path, ipex_recipe("/nonexistent/model", [{"name": "bf16-autocast"},
                                                                        {"name": "ipex-optimize"}]))
    assert main(["validate", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "intel-extension-for-pytorch is not importable" in err and "measured" not in err


def test_ipex_pass_is_refused_for_other_targets(tiny_llama):
    r = ipex_recipe(tiny_llama, [{"name": "ipex-optimize"}])
    r["target"] = "cpu-torch"
    with pytest.raises(optpipe.RecipeError, match=r"ipex-optimize\): not available for target cpu-torch"):
        optpipe.build(r, output="/tmp/never", log=lambda m: None)


@pytest.mark.ipex
@needs_ipex
def test_ipex_fp32_build_passes_and_reloads(tiny_llama, tmp_path):
    out = tmp_path / "art"
    res = optpipe.build(ipex_recipe(tiny_llama, [{"name": "ipex-optimize"}]), output=out, log=lambda m: None)
    assert res.passed and res.manifest["target"]["ipex"]["weight_only"] == "none"
    assert abs(res.metrics["gates.accuracy.ppl_delta_pct"]) < 0.5
    assert len(optpipe.load(out, threads=1).generate(__import__("numpy").arange(5, 20), 5, eos_token_id=None).tokens) == 5
    assert isinstance(optpipe.load(out, threads=1).generate("hello", 2).text, str)  # the tokenizer beside the weights


@pytest.mark.ipex
@needs_ipex
@pytest.mark.skipif(fast_woq_kernels()[0], reason="this CPU has IPEX's fast WOQ kernels (AVX512-FP16/AMX)")
def test_ipex_woq_int4_is_refused_by_speed_gate_naming_the_cause(tmp_path):
    # SmolLM2's layer shapes (4 layers, random weights): on a toy width the dequantization cost would not show
    model_dir = make_tiny(tmp_path / "m", "llama", layers=4, hidden_size=576, intermediate_size=1536,
                          num_attention_heads=9, num_key_value_heads=3)
    passes = [{"name": "ipex-optimize", "weight_only": "int4", "block_size": 32, "lowp_mode": "bf16"}]
    recipe = ipex_recipe(model_dir, passes, min_decode_speedup=1.0, repeats=3, new_tokens=16)
    recipe["gates"]["accuracy"] = {"max_ppl_delta_pct": 100.0}
    with pytest.raises(GateFailed) as e:
        optpipe.build(recipe, output=tmp_path / "art", log=lambda m: None)
    assert "neither AVX512-FP16 nor AMX" in str(e.value)
    assert not (tmp_path / "art").exists()
