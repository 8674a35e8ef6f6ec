"""MatMulNBits INT4: the float zero point is exact on grid weights; GPTQ needs and uses calibration."""
import copy

import numpy as np
import onnx
import pytest

from optpipe import models
from optpipe.errors import BuildError
from optpipe.passes.export import ExportConfig, build_decoder_graph
from optpipe.passes.fuse import Fuse, FuseConfig
from optpipe.passes.quantize_int4 import Int4Config, QuantizeInt4
from optpipe.pipeline import ModelState, PassContext
from optpipe.recipe import ModelSpec
from optpipe.runtime.ort_decoder import OnnxDecoder


def load(path):
    model, tok, _ = models.load(ModelSpec(source=str(path)))
    return model


def test_int4_float_zero_point_keeps_grid_weights(tiny_llama):
    """Weights put on a block-32 4-bit grid with float16 scale and minimum (GGUF Q4_1's) are fitted exactly and
    stored in integer form (`quant.integer_form`: codes, float16 scales, zero points, the remainder in two digit
    blocks), so the artifact's logits stay within 2e-3 of the float graph's (accuracy_level 0: fp32 compute) --
    over 100x closer than integer zero points, which drop the remainder."""
    import torch

    from optpipe import quant as _quant

    model = load(tiny_llama)
    with torch.no_grad():
        for name, lin in model.named_modules():
            if isinstance(lin, torch.nn.Linear) and name.startswith("model.layers."):
                w = lin.weight.numpy()
                lin.weight.copy_(torch.from_numpy(_quant.rtn(w, 4, 32, "float", scale_dtype=np.float16).dequantize()))
    state = ModelState("onnx", onnx_model=build_decoder_graph(model, ExportConfig(max_positions=256)))
    Fuse(FuseConfig()).call(state, PassContext())
    prompt = np.arange(10, 30)
    want = OnnxDecoder.from_proto(state.onnx_model).logits(prompt)
    int_zp = copy.deepcopy(state)
    QuantizeInt4(Int4Config(accuracy_level=0, exclude=["lm_head"], zero_point="int")).call(int_zp, PassContext())
    int_error = np.abs(OnnxDecoder.from_proto(int_zp.onnx_model).logits(prompt) - want).max()
    res = QuantizeInt4(Int4Config(accuracy_level=0, exclude=["lm_head"])).call(state, PassContext())
    assert res.changes["layers_quantized"] == 8 and "lm_head" in res.changes["skipped"]
    assert res.changes["weight_rel_error_max"] < 1e-5
    assert any(n.op_type == "MatMulNBits" for n in state.onnx_model.graph.node)
    base = "model.layers.0.mlp.down_proj"
    stored = {t.name[len(base) + 1:]: t for t in state.onnx_model.graph.initializer if t.name.startswith(base + ".")}
    assert set(stored) == {"qweight", "scales", "zero_points"} and stored["scales"].data_type == onnx.TensorProto.FLOAT16
    assert stored["qweight"].dims[1] == 128 // 32 + 2  # down_proj's K=128: 4 weight blocks and 2 digit blocks
    error = np.abs(OnnxDecoder.from_proto(state.onnx_model).logits(prompt) - want).max()
    assert error < 2e-3 and error < int_error / 100, (error, int_error)


def test_gptq_needs_and_uses_calibration(tiny_llama):
    model = load(tiny_llama)
    state = ModelState("onnx", onnx_model=build_decoder_graph(model, ExportConfig(max_positions=256)))
    Fuse(FuseConfig()).call(state, PassContext())
    with pytest.raises(BuildError, match="calibration"):
        QuantizeInt4(Int4Config(algorithm="gptq")).call(copy.deepcopy(state), PassContext())
    windows = [np.random.default_rng(i).integers(0, 256, 64) for i in range(3)]
    plain = copy.deepcopy(state)
    res = QuantizeInt4(Int4Config(algorithm="gptq", zero_point="int")).call(plain, PassContext(calibration=lambda: windows))
    assert res.changes["layers_quantized"] == 8
    assert set(plain.handoff.quantized.values()) == {"int4 gptq block32 int"}
    res = QuantizeInt4(Int4Config(algorithm="gptq", zero_point="int", act_order=True)).call(
        state, PassContext(calibration=lambda: windows))
    assert res.changes["layers_quantized"] == 8
    assert set(state.handoff.quantized.values()) == {"int4 gptq act-order block32 int"}


def test_sequential_gptq_fits_each_linear_to_the_input_the_quantized_graph_gives_it(tiny_llama, monkeypatch):
    """Sequential GPTQ measures each Hessian with every linear before it already quantized: the Hessian the last
    linear (layer 1's down_proj) was fitted against is the one the finished INT4 graph feeds it (fp32 compute),
    and clearly not the unquantized model's."""
    from optpipe import quant as _quant
    from optpipe.passes._nbits import activation_stats

    model = load(tiny_llama)
    state = ModelState("onnx", torch_model=model, onnx_model=build_decoder_graph(model, ExportConfig(max_positions=256)))
    Fuse(FuseConfig()).call(state, PassContext())
    down_in = next(n.input[0] for n in state.onnx_model.graph.node if n.name == "model.layers.1.mlp.down_proj")
    windows = [np.random.default_rng(i).integers(0, 256, 64) for i in range(3)]
    before = activation_stats(state.onnx_model, [down_in], windows, 1, "hessian")[down_in]
    fitted, real = [], _quant.gptq
    monkeypatch.setattr(_quant, "gptq", lambda w, h, *a, **k: fitted.append(h) or real(w, h, *a, **k))
    res = QuantizeInt4(Int4Config(algorithm="gptq", zero_point="int", accuracy_level=0, sequential=True)).call(
        state, PassContext(calibration=lambda: windows))
    assert res.changes["layers_quantized"] == 8 and len(fitted) == 8
    assert set(state.handoff.quantized.values()) == {"int4 gptq sequential block32 int"}
    after = activation_stats(state.onnx_model, [down_in], windows, 1, "hessian")[down_in]

    def rel(a, b):
        return np.linalg.norm(a - b) / np.linalg.norm(b)

    assert rel(fitted[-1], after) < 1e-4
    assert rel(before, after) > 100 * rel(fitted[-1], after)


def test_mixed_precision_puts_named_and_edge_layer_linears_in_int8(tmp_path):
    """`int8`: the MatMuls a pattern names and every linear of the first and last decoder layer go to INT8
    MatMulNBits (bits 8) in the same pass; the rest are INT4; the manifest strings and counts say which."""
    from onnx import helper

    from ..conftest import make_tiny

    model = load(make_tiny(tmp_path / "m", layers=4))
    state = ModelState("onnx", onnx_model=build_decoder_graph(model, ExportConfig(max_positions=256)))
    Fuse(FuseConfig()).call(state, PassContext())
    prompt = np.arange(10, 30)
    want = OnnxDecoder.from_proto(state.onnx_model).logits(prompt)
    all4 = copy.deepcopy(state)
    QuantizeInt4(Int4Config(accuracy_level=0)).call(all4, PassContext())
    res = QuantizeInt4(Int4Config(accuracy_level=0, int8={"include": ["down_proj"], "edge_layers": 1})).call(
        state, PassContext())
    bits = {n.name: helper.get_attribute_value(next(a for a in n.attribute if a.name == "bits"))
            for n in state.onnx_model.graph.node if n.op_type == "MatMulNBits"}
    eight = {n for n, b in bits.items() if b == 8}
    assert eight == {f"model.layers.{i}.{m}" for i in (0, 3) for m in ("self_attn.qkv_proj", "self_attn.o_proj",
                                                                          "mlp.gate_up_proj", "mlp.down_proj")} | {
        "model.layers.1.mlp.down_proj", "model.layers.2.mlp.down_proj"}
    assert len(bits) == 16 and res.changes["layers_quantized"] == 6 and res.changes["int8"]["layers_quantized"] == 10
    assert res.changes["skipped"] == {"lm_head": "excluded by pattern 'lm_head'"}
    assert {state.handoff.quantized[n] for n in eight} == {"int8 rtn block32 symmetric"}
    err = {k: np.abs(OnnxDecoder.from_proto(s.onnx_model).logits(prompt) - want).mean() for k, s in
           (("mixed", state), ("int4", all4))}
    assert err["mixed"] < 0.5 * err["int4"], err


def test_when_edge_layers_cover_every_layer_the_pass_counts_its_int8_layers_and_coverage_passes(tiny_llama):
    """A 2-layer model with int8.edge_layers 2: every selected MatMul is INT8. The pass quantized them, so the
    coverage gate's floor (each quantize pass quantized a layer) must count them, not refuse the pass as empty."""
    from optpipe.builder import quantize_intent
    from optpipe.gates import coverage
    from optpipe.pipeline import PassRecord
    from optpipe.recipe import CoverageGate

    state = ModelState("onnx", onnx_model=build_decoder_graph(load(tiny_llama), ExportConfig(max_positions=256)))
    res = QuantizeInt4(Int4Config(accuracy_level=0, int8={"edge_layers": 2})).call(state, PassContext())
    assert res.modified and res.changes["layers_quantized"] == 0 and res.changes["int8"]["layers_quantized"] == 14
    assert "no MatMul is in INT4: `int8` took every one this pass selected" in res.notes
    intent = quantize_intent([PassRecord("quantize-int4", {}, 0.0, True, res.changes, res.notes).to_json()])
    assert intent == [("passes[0] (quantize-int4)", 14)]
    metrics = {"linears": 15, "quantized": 14, "quantized_fraction": 0.9333}
    assert coverage.check(metrics, CoverageGate(), intent).passed
    assert not coverage.check(metrics, CoverageGate(), [("passes[0] (quantize-int4)", 0)]).passed


def test_mixed_precision_edge_layers_needs_to_know_the_layers(tiny_llama):
    model = load(tiny_llama)
    state = ModelState("onnx", onnx_model=build_decoder_graph(model, ExportConfig(max_positions=256)))
    del state.onnx_model.metadata_props[:]
    with pytest.raises(BuildError, match="int8.edge_layers: the graph does not say"):
        QuantizeInt4(Int4Config(int8={"edge_layers": 1})).call(state, PassContext())


def test_calibration_sees_a_quantized_graph_as_onnx_runtime_runs_it(tiny_llama):
    """Float16 scales reach MatMulNBits through a Cast that only constant folding makes constant (accuracy_level 4
    packs scales when the session loads; unfolded, ONNX Runtime computes garbage): statistics measured on a graph
    already quantized (lm_head's input, after INT4 decoder layers, as the INT4 recipe's GPTQ head sees it) are those
    of the graph as an artifact runs it."""
    import onnxruntime as ort

    from optpipe.passes._nbits import activation_stats
    from optpipe.passes._onnx import prefill_feeds
    from optpipe.runtime.ort_decoder import session_options

    state = ModelState("onnx", onnx_model=build_decoder_graph(load(tiny_llama), ExportConfig(max_positions=256)))
    Fuse(FuseConfig()).call(state, PassContext())
    QuantizeInt4(Int4Config(accuracy_level=4)).call(state, PassContext())
    x = next(n.input[0] for n in state.onnx_model.graph.node if n.name == "lm_head")
    ids = np.arange(3, 40)
    measured = activation_stats(state.onnx_model, [x], [ids], 1, "absmax")[x]
    probe = copy.deepcopy(state.onnx_model)
    probe.graph.output.append(onnx.ValueInfoProto(name=x))
    deployed = ort.InferenceSession(probe.SerializeToString(), session_options(1),
                                    providers=["CPUExecutionProvider"]).run([x], prefill_feeds(probe, ids))[0]
    assert measured == pytest.approx(float(np.abs(deployed).max()), rel=1e-3)
