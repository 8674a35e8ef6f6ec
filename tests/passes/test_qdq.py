"""passes/_qdq: the Q/DQ emitters shared by qdq-int8 and qdq-int4, checked on a one-MatMul graph by hand and by
ONNX Runtime (what runs the graph must compute what the emitter says)."""
import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from optpipe.passes._onnx import GraphEdit
from optpipe.passes._qdq import int4_tensor, quantize_activation, replace_weight


def _matmul_model(w: np.ndarray) -> onnx.ModelProto:
    k, n = w.shape
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
                              [numpy_helper.from_array(w, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def _run(model, x):
    """Unoptimized, as the gpu-tensorrt target checks its graph: ONNX Runtime's optimizer would fuse an INT4
    DequantizeLinear + MatMul into MatMulNBits with int8 activations, which is its semantics, not the graph's."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_int4_tensor_packs_two_codes_a_byte_low_nibble_first():
    codes = np.array([[-8, 7, 1], [-1, 0, 3]], np.int8)  # 6 codes: three bytes; an odd count is padded
    t = int4_tensor("q", codes)
    assert t.data_type == TensorProto.INT4 and list(t.dims) == [2, 3]
    assert t.raw_data == bytes([0x78, 0xF1, 0x30])  # (-8 | 7 << 4), (1 | -1 << 4), (0 | 3 << 4)
    assert int4_tensor("odd", np.array([5], np.int8)).raw_data == bytes([0x05])
    np.testing.assert_array_equal(numpy_helper.to_array(t), codes)


def test_replace_weight_dequantizes_codes_times_scale_and_drops_the_float_weight():
    w = np.array([[0.5, -1.0], [0.25, 2.0]], np.float32)
    model = _matmul_model(w)
    edit = GraphEdit(model)
    q = np.array([[1, -2], [1, 4]], np.int8)
    scale = np.array([0.5, 0.5], np.float32)  # per output column N (axis 1 of [K, N])
    replace_weight(edit, model.graph.node[0], int4_tensor("mm.weight_q", q), scale, axis=1)
    edit.commit()
    assert "w" not in {i.name for i in model.graph.initializer}
    assert [n.op_type for n in model.graph.node] == ["DequantizeLinear", "MatMul"]
    x = np.array([[2.0, 4.0]], np.float32)
    np.testing.assert_allclose(_run(model, x), x @ (q * scale), rtol=0, atol=1e-6)


def test_quantize_activation_rounds_the_input_to_int8_steps_of_absmax_over_127():
    model = _matmul_model(np.eye(3, dtype=np.float32))
    edit = GraphEdit(model)
    scale = quantize_activation(edit, model.graph.node[0], absmax=1.27)
    edit.commit()
    assert abs(scale - 0.01) < 1e-9
    x = np.array([[0.123, -2.0, 1.0]], np.float32)  # -2.0 lies beyond absmax: saturates at int8's -128 steps
    np.testing.assert_allclose(_run(model, x), [[0.12, -1.28, 1.0]], atol=1e-6)
    zero = _matmul_model(np.eye(3, dtype=np.float32))
    e = GraphEdit(zero)
    assert quantize_activation(e, zero.graph.node[0], absmax=0.0) > 0  # an all-zero calibration stays finite
