"""Streaming build (model.streaming): weights read tensor by tensor from safetensors, quantized while the
artifact is written, fp32 reference computed layer by layer — same artifact as the in-memory path."""
import json

import numpy as np
import pytest

import optpipe

from .conftest import tiny_recipe

CHAIN = [{"name": "export"}, {"name": "fuse"}, {"name": "static-kv-cache", "max_length": 256},
         {"name": "quantize-int4", "block_size": 32, "accuracy_level": 0, "exclude": ["lm_head"]},
         {"name": "quantize-int8", "include": ["lm_head"], "accuracy_level": 0}]


CALIBRATED = [{"name": "smoothquant", "alpha": 0.5}, {"name": "export"}, {"name": "fuse"},
              {"name": "static-kv-cache", "max_length": 256},
              {"name": "quantize-int4", "algorithm": "gptq", "block_size": 32, "accuracy_level": 0, "exclude": []}]


def test_streaming_build_equals_in_memory_build(tiny_qwen2, tmp_path):
    mem = optpipe.build(tiny_recipe(tiny_qwen2, CHAIN), output=tmp_path / "mem", log=lambda m: None)
    recipe = tiny_recipe(tiny_qwen2, CHAIN)
    recipe["model"] = {"source": str(tiny_qwen2), "streaming": True}
    st = optpipe.build(recipe, output=tmp_path / "st", log=lambda m: None)
    m = st.manifest
    assert m["model"]["streaming"] and m["target"]["streamed"] and "layer by layer" in m["reference"]
    assert m["passes"][0]["changes"]["streaming"] is True
    assert st.metrics["gates.accuracy.ppl_reference"] == pytest.approx(mem.metrics["gates.accuracy.ppl_reference"], rel=1e-5)
    assert st.metrics["gates.accuracy.ppl_candidate"] == pytest.approx(mem.metrics["gates.accuracy.ppl_candidate"], rel=1e-5)
    ids = np.arange(5, 30)
    a = optpipe.load(tmp_path / "mem", threads=1).logits(ids)
    b = optpipe.load(tmp_path / "st", threads=1).logits(ids)
    assert np.abs(a - b).max() < 1e-4
    assert json.loads((tmp_path / "st" / "manifest.json").read_text())["status"] == "passed"


def test_streaming_refuses_whole_model_passes(tiny_llama, tmp_path):
    recipe = tiny_recipe(tiny_llama, [{"name": "awq"}] + CHAIN)
    recipe["model"] = {"source": str(tiny_llama), "streaming": True}
    with pytest.raises(optpipe.RecipeError, match=r"passes\[0\] \(awq\): not available with model.streaming"):
        optpipe.build(recipe, output=tmp_path / "x", log=lambda m: None)
    dynamic = tiny_recipe(tiny_llama, CHAIN[:3] + [{"name": "quantize-int8", "mode": "static"}])
    dynamic["model"] = {"source": str(tiny_llama), "streaming": True}
    with pytest.raises(optpipe.BuildError, match="use mode: weight-only or dynamic"):
        optpipe.build(dynamic, output=tmp_path / "y", log=lambda m: None)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_streaming_smoothquant_and_gptq_equal_in_memory(tiny_llama, tmp_path):
    """SmoothQuant and GPTQ measured one decoder layer at a time fit the same scales and codes as the in-memory
    passes (which run the whole model on the calibration text); lm_head's Hessian comes from the final norm."""
    mem = optpipe.build(tiny_recipe(tiny_llama, CALIBRATED), output=tmp_path / "mem", log=lambda m: None)
    recipe = tiny_recipe(tiny_llama, CALIBRATED)
    recipe["model"] = {"source": str(tiny_llama), "streaming": True}
    st = optpipe.build(recipe, output=tmp_path / "st", log=lambda m: None)
    smooth_mem, smooth_st = mem.manifest["passes"][0]["changes"], st.manifest["passes"][0]["changes"]
    assert smooth_st["max_scale"] == pytest.approx(smooth_mem["max_scale"], rel=1e-4)
    assert smooth_st["groups_smoothed"] == smooth_mem["groups_smoothed"] == 4
    q = st.manifest["passes"][-1]
    assert q["changes"]["layers_quantized"] == 9 and "layer by layer" in q["notes"][0]
    assert q["changes"]["weight_rel_error_mean"] == pytest.approx(
        mem.manifest["passes"][-1]["changes"]["weight_rel_error_mean"], rel=1e-3)
    ids = np.arange(5, 30)
    a = optpipe.load(tmp_path / "mem", threads=1).logits(ids)
    b = optpipe.load(tmp_path / "st", threads=1).logits(ids)
    assert np.abs(a - b).max() < 1e-3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mem", "st"]  # scratch (parked GPTQ results) removed


def both_builds(model, chain, tmp_path):
    """The chain built in memory (to tmp_path/mem) and streaming (tmp_path/st): (in-memory result, streaming result,
    the streaming recipe)."""
    mem = optpipe.build(tiny_recipe(model, chain), output=tmp_path / "mem", log=lambda m: None)
    recipe = tiny_recipe(model, chain)
    recipe["model"] = {"source": str(model), "streaming": True}
    return mem, optpipe.build(recipe, output=tmp_path / "st", log=lambda m: None), recipe


def test_streaming_gptq_sees_earlier_quantization(tiny_llama, tmp_path):
    """A GPTQ pass after an RTN pass fits lm_head to the inputs of the already-quantized layers in both paths (the
    in-memory one runs the quantized graph; the streaming walk swaps in the dequantized weights, fused or not)."""
    chain = CHAIN[:3] + [
        {"name": "quantize-int4", "block_size": 32, "accuracy_level": 0, "zero_point": "int", "exclude": ["lm_head"]},
        {"name": "quantize-int4", "algorithm": "gptq", "block_size": 32, "accuracy_level": 0, "include": ["lm_head"],
         "exclude": []}]
    mem, st, _ = both_builds(tiny_llama, chain, tmp_path)
    err = [b.manifest["passes"][-1]["changes"]["weight_rel_error_mean"] for b in (mem, st)]
    assert err[1] == pytest.approx(err[0], rel=1e-4)
    ids = np.arange(5, 30)
    a = optpipe.load(tmp_path / "mem", threads=1).logits(ids)
    b = optpipe.load(tmp_path / "st", threads=1).logits(ids)
    assert np.abs(a - b).max() < 1e-3


def test_streaming_smoothquant_w8a8_dynamic_matches_in_memory(tiny_qwen2, tmp_path):
    """W8A8 (per-tensor dynamic u8 activations, per-channel s8 weights) after SmoothQuant in the streaming build:
    DynamicQuantizeMatMul written directly, the same arithmetic as ONNX Runtime's quantize_dynamic in memory."""
    chain = [{"name": "smoothquant"}, {"name": "export"}, {"name": "quantize-int8", "mode": "dynamic"}]
    mem = optpipe.build(tiny_recipe(tiny_qwen2, chain), output=tmp_path / "mem", log=lambda m: None)
    recipe = tiny_recipe(tiny_qwen2, chain)
    recipe["model"] = {"source": str(tiny_qwen2), "streaming": True}
    st = optpipe.build(recipe, output=tmp_path / "st", log=lambda m: None)
    assert st.manifest["passes"][-1]["changes"]["ops"] == {"DynamicQuantizeMatMul": 15}
    assert st.metrics["gates.accuracy.ppl_candidate"] == pytest.approx(mem.metrics["gates.accuracy.ppl_candidate"],
                                                                        rel=1e-5)
    ids = np.arange(5, 30)
    a = optpipe.load(tmp_path / "mem", threads=1).logits(ids)
    b = optpipe.load(tmp_path / "st", threads=1).logits(ids)
    assert np.abs(a - b).max() < 1e-4  # bit-identical here: the same kernel after ORT fuses its own pattern


def test_streaming_sequential_gptq_equals_in_memory(tiny_llama, tmp_path):
    """`sequential: true` takes the same walk in both builds (the model in memory, or the checkpoint's files): the
    same fits and the same artifact logits."""
    chain = CHAIN[:3] + [{"name": "quantize-int4", "algorithm": "gptq", "sequential": True, "block_size": 32,
                          "accuracy_level": 0, "exclude": []}]
    mem, st, recipe = both_builds(tiny_llama, chain, tmp_path)
    err = [b.manifest["passes"][-1]["changes"]["weight_rel_error_mean"] for b in (mem, st)]
    assert err[1] == pytest.approx(err[0], rel=1e-4)
    assert "int4 gptq sequential block32 float" in json.dumps(st.manifest)
    chain[-1]["sequential"] = False  # the walk's choice shows: fitted on the unquantized model, other codes
    optpipe.build(dict(recipe, passes=chain), output=tmp_path / "once", log=lambda m: None)
    ids = np.arange(5, 30)
    a, b, c = (optpipe.load(tmp_path / d, threads=1).logits(ids) for d in ("mem", "st", "once"))
    assert np.abs(a - b).max() < 1e-3 < np.abs(b - c).max()
