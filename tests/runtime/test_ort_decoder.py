"""What precision each weight matmul of an ONNX artifact runs in, read from the graph alone (the coverage gate's
input), for every quantized form the passes write."""
import numpy as np
from onnx import TensorProto, helper, numpy_helper

from optpipe.runtime.ort_decoder import graph_precisions


def _init(name, dtype, shape=(4, 4)):
    return helper.make_tensor(name, dtype, shape, np.zeros(int(np.prod(shape)), np.int32).tolist()
                              if dtype in (TensorProto.INT8, TensorProto.UINT8, TensorProto.INT4) else
                              np.zeros(int(np.prod(shape))).tolist())


def test_every_quantized_form_and_float_weight_is_named_with_its_precision():
    nodes = [
        helper.make_node("MatMulNBits", ["x", "q4", "s"], ["a"], name="l0.q_proj", domain="com.microsoft", bits=4),
        helper.make_node("MatMulNBits", ["x", "q8", "s"], ["b"], name="lm_head", domain="com.microsoft", bits=8),
        helper.make_node("DynamicQuantizeMatMul", ["x", "w8", "s"], ["c"], name="l0.up_proj", domain="com.microsoft"),
        helper.make_node("DequantizeLinear", ["wq4", "s"], ["w_dq4"], name="dq4"),
        helper.make_node("MatMul", ["x", "w_dq4"], ["d"], name="l0.down_proj"),
        helper.make_node("DequantizeLinear", ["wq8", "s"], ["w_dq8"], name="dq8"),
        helper.make_node("MatMul", ["x", "w_dq8"], ["e"], name="l0.gate_proj"),
        helper.make_node("MatMul", ["x", "w16"], ["f"], name="l0.o_proj"),
        helper.make_node("MatMul", ["x", "w32"], ["g"], name="l0.k_proj"),
        # the float-zero-point remainder of a quantized layer belongs to that layer, not a layer of its own
        helper.make_node("MatMul", ["x", "w32"], ["h"], name="l0.q_proj/block_sums"),
        helper.make_node("MatMul", ["x", "y"], ["i"], name="attention_scores"),  # no weight: not a linear
    ]
    inits = [_init("q4", TensorProto.UINT8), _init("q8", TensorProto.UINT8), _init("w8", TensorProto.INT8),
             _init("wq4", TensorProto.INT4), _init("wq8", TensorProto.INT8), _init("w16", TensorProto.FLOAT16),
             _init("w32", TensorProto.FLOAT), numpy_helper.from_array(np.ones(4, np.float32), "s")]
    graph = helper.make_graph(nodes, "g", [], [], initializer=inits)
    assert graph_precisions(helper.make_model(graph)) == {
        "l0.q_proj": "int4", "lm_head": "int8", "l0.up_proj": "int8", "l0.down_proj": "int4",
        "l0.gate_proj": "int8", "l0.o_proj": "float16", "l0.k_proj": "float32"}
