"""qdq-int4 (TensorRT's form): INT4 codes in [-8, 7], positive block scales on K, and ONNX Runtime reading the
packed nibbles the way they are decoded here by hand."""
import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from optpipe.passes.qdq_int4 import QdqInt4, QdqInt4Config, _layer_groups
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


def test_sequential_gptq_walks_layers_in_order_with_the_rest_last():
    names = ["lm_head", "model.layers.10.mlp", "model.layers.2.attn", "model.layers.2.mlp"]
    nodes = [helper.make_node("MatMul", [], [], name=n) for n in names]
    assert [[n.name for n in g] for g in _layer_groups(nodes)] == [
        ["model.layers.2.attn", "model.layers.2.mlp"], ["model.layers.10.mlp"], ["lm_head"]]
