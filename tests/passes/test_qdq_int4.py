"""qdq-int4 (TensorRT's form): INT4 codes in [-8, 7], positive block scales on K, and ONNX Runtime reading the
packed nibbles the way they are decoded here by hand."""
import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from optpipe.passes.qdq_int4 import QdqInt4, QdqInt4Config
from optpipe.pipeline import ModelState, PassContext
from optpipe.runtime.ort_decoder import session_options

K, N = 128, 24


def _one_matmul(w: np.ndarray) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "model.layers.0.mlp.up_proj.weight_t"], ["y"], name="model.layers.0.mlp.up_proj")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, N])],
        initializer=[numpy_helper.from_array(w, "model.layers.0.mlp.up_proj.weight_t")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _nibbles(t: onnx.TensorProto) -> np.ndarray:
    """Signed INT4 values, first element in the low nibble (the ONNX spec), decoded without optpipe's code."""
    raw = np.frombuffer(t.raw_data, np.uint8)
    pairs = np.stack([raw & 0x0F, raw >> 4], axis=1).reshape(-1).astype(np.int8)
    return np.where(pairs > 7, pairs - 16, pairs)[: int(np.prod(t.dims))].reshape(list(t.dims))


def test_rtn_writes_block_scaled_int4_that_onnx_runtime_reads_as_written():
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.05, (K, N)).astype(np.float32)
    model = _one_matmul(w)
    state = ModelState("onnx", onnx_model=model)
    res = QdqInt4(QdqInt4Config(algorithm="rtn", block_size=64, exclude=[])).call(state, PassContext())
    assert res.changes["layers_quantized"] == 1
    inits = {t.name: t for t in model.graph.initializer}
    codes = _nibbles(inits["model.layers.0.mlp.up_proj.weight_q4"])
    scales = numpy_helper.to_array(inits["model.layers.0.mlp.up_proj.weight_scale"])
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear")
    assert {a.name: helper.get_attribute_value(a) for a in dq.attribute} == {"axis": 0, "block_size": 64}
    assert codes.shape == (K, N) and scales.shape == (K // 64, N)
    assert codes.min() >= -8 and codes.max() <= 7 and (scales > 0).all()
    # the scale comes from ±7 (clipped): -8 only where a block's negative tail was clipped
    assert (np.abs(codes) == 8).sum() < 0.02 * codes.size
    w_hat = codes.astype(np.float32) * np.repeat(scales, 64, axis=0)
    assert np.linalg.norm(w_hat - w) / np.linalg.norm(w) < 0.15
    x = rng.normal(size=(1, K)).astype(np.float32)
    # unoptimized, as the gpu-tensorrt target runs it: ORT's optimizer would fuse DQ+MatMul into MatMulNBits with
    # int8 activations (session.qdq_matmulnbits_accuracy_level 4), which TensorRT does not do
    sess = ort.InferenceSession(model.SerializeToString(), session_options(1, optimize=False),
                                providers=["CPUExecutionProvider"])
    y = sess.run(None, {"x": x})[0]
    np.testing.assert_allclose(y, x @ w_hat, rtol=1e-5, atol=1e-5)
    assert "int4 weight-only qdq block64 rtn" in state.handoff.quantized.values()


def test_a_weight_whose_k_does_not_fill_a_block_is_skipped_with_the_reason():
    model = _one_matmul(np.ones((K, N), np.float32))
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.ones((96, N), np.float32),
                                                                "model.layers.0.mlp.up_proj.weight_t"))
    state = ModelState("onnx", onnx_model=model)
    res = QdqInt4(QdqInt4Config(algorithm="rtn", block_size=64, exclude=[])).call(state, PassContext())
    assert not res.modified and state.handoff.unquantized == {
        "model.layers.0.mlp.up_proj": "K=96 is not a multiple of block_size 64"}


def test_sequential_gptq_fits_the_last_linear_to_the_input_the_quantized_graph_gives_it(tiny_llama, monkeypatch):
    """Sequential: the Hessian layer 1's down_proj was fitted against is what the finished QDQ graph feeds it."""
    from optpipe import models
    from optpipe import quant as _quant
    from optpipe.passes._nbits import activation_stats
    from optpipe.passes.export import ExportConfig, build_decoder_graph
    from optpipe.recipe import ModelSpec

    model = models.load(ModelSpec(source=str(tiny_llama)))[0]
    state = ModelState("onnx", torch_model=model, onnx_model=build_decoder_graph(model, ExportConfig(max_positions=256)))
    down_in = next(n.input[0] for n in state.onnx_model.graph.node if n.name == "model.layers.1.mlp.down_proj")
    windows = [np.random.default_rng(i).integers(0, 256, 64) for i in range(3)]
    before = activation_stats(state.onnx_model, [down_in], windows, 1, "hessian")[down_in]
    fitted, real = [], _quant.gptq
    monkeypatch.setattr(_quant, "gptq", lambda w, h, *a, **k: fitted.append(h) or real(w, h, *a, **k))
    res = QdqInt4(QdqInt4Config(block_size=64, sequential=True)).call(state, PassContext(calibration=lambda: windows))
    assert res.changes["layers_quantized"] == 14 and len(fitted) == 14
    assert set(state.handoff.quantized.values()) == {"int4 weight-only qdq block64 gptq act-order sequential"}
    after = activation_stats(state.onnx_model, [down_in], windows, 1, "hessian")[down_in]
    rel = lambda a, b: np.linalg.norm(a - b) / np.linalg.norm(b)  # noqa: E731
    assert rel(fitted[-1], after) < 1e-4
    assert rel(before, after) > 100 * rel(fitted[-1], after)
