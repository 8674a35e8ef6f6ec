"""qdq-int8 (TensorRT W8A8): per-channel INT8 weights and per-tensor activation scales from calibration, by hand."""
import numpy as np
import pytest
from onnx import numpy_helper

from optpipe import models
from optpipe.errors import BuildError
from optpipe.passes._nbits import activation_stats
from optpipe.passes.export import ExportConfig, build_decoder_graph
from optpipe.passes.qdq_int8 import QdqInt8, QdqInt8Config
from optpipe.pipeline import ModelState, PassContext
from optpipe.recipe import ModelSpec
from optpipe.runtime.ort_decoder import OnnxDecoder


def _state(tiny_llama):
    model = models.load(ModelSpec(source=str(tiny_llama)))[0]
    return ModelState("onnx", onnx_model=build_decoder_graph(model, ExportConfig(max_positions=128)))


def test_qdq_int8_weights_and_activation_scales_by_hand(tiny_llama):
    state = _state(tiny_llama)
    before = {t.name: numpy_helper.to_array(t) for t in state.onnx_model.graph.initializer}
    prompt = np.arange(5, 37)
    want = OnnxDecoder.from_proto(state.onnx_model, optimize=False).logits(prompt)
    windows = [np.random.default_rng(i).integers(0, 256, 48) for i in range(3)]
    with pytest.raises(BuildError, match="calibration"):
        QdqInt8(QdqInt8Config()).call(_state(tiny_llama), PassContext())
    inputs = {n.name: n.input[0] for n in state.onnx_model.graph.node if n.op_type == "MatMul"}
    absmax = activation_stats(state.onnx_model, sorted(set(inputs.values())), windows, 1, "absmax")
    res = QdqInt8(QdqInt8Config(activation_margin=1.5)).call(state, PassContext(calibration=lambda: windows))
    g = state.onnx_model.graph
    assert res.changes["layers_quantized"] == 2 * 7 and "lm_head" in res.changes["skipped"]
    assert set(state.handoff.quantized.values()) == {"int8 W8A8 qdq"} and "lm_head" in state.handoff.unquantized
    inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    dq = {n.output[0]: n for n in g.node if n.op_type == "DequantizeLinear"}
    weight_dq = [n for n in dq.values() if n.input[0] in inits and inits[n.input[0]].dtype == np.int8
                 and inits[n.input[0]].ndim == 2]
    assert len(weight_dq) == 2 * 7
    for n in weight_dq:  # scale per output column = max |w| / 127 of the float weight it replaced
        q, scale = inits[n.input[0]], inits[n.input[1]]
        original = next(w for w in before.values() if w.shape == q.shape and np.allclose(w, q * scale, atol=scale.max()))
        np.testing.assert_allclose(scale, np.abs(original).max(0) / 127.0, rtol=1e-6)
        assert np.abs(q).max() <= 127
    # activations: a Q/DQ pair per quantized MatMul input, symmetric (zero point 0), scale = margin * |x|max / 127
    act_q = {n.name.removesuffix("/input_q"): n for n in g.node if n.op_type == "QuantizeLinear"}
    assert len(act_q) == 2 * 7 and "lm_head" not in " ".join(act_q)
    for name, n in act_q.items():
        np.testing.assert_allclose(float(inits[n.input[1]]), 1.5 * float(absmax[inputs[name]]) / 127.0, rtol=1e-6)
        assert int(inits[n.input[2]]) == 0
    got = OnnxDecoder.from_proto(state.onnx_model, optimize=False).logits(prompt)
    # 8-bit activations with one scale per tensor on a random tiny model: a few percent of the logits' spread
    rms = float(np.sqrt(((got - want) ** 2).mean()) / want.std())
    assert rms < 0.1, rms
    assert (got.argmax(-1) == want.argmax(-1)).mean() > 0.8
