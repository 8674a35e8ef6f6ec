import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from optpipe.passes._qdq import int4_tensor
from optpipe.targets.trt_lint import lint

H = TensorProto.FLOAT16


def model(nodes, inits, opset=21, io_type=H, extra_opsets=()):
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", io_type, [1, 4])],
                          [helper.make_tensor_value_info("y", io_type, [1, 4])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset), *extra_opsets])
    return m


def f16(name, arr):
    return numpy_helper.from_array(np.asarray(arr, np.float16), name)


def w8a8(zp_value=0, zp_type=np.int8, act_scale_shape=(), w_axis=1):
    inits = [numpy_helper.from_array(np.ones((4, 4), np.int8), "w"), f16("ws", np.ones(4)),
             f16("as", np.ones(act_scale_shape)), numpy_helper.from_array(np.array(zp_value, zp_type), "az")]
    nodes = [helper.make_node("DequantizeLinear", ["w", "ws"], ["wd"], name="w_dq", axis=w_axis),
             helper.make_node("QuantizeLinear", ["x", "as", "az"], ["xq"], name="x_q"),
             helper.make_node("DequantizeLinear", ["xq", "as", "az"], ["xd"], name="x_dq"),
             helper.make_node("MatMul", ["xd", "wd"], ["y"], name="mm")]
    return model(nodes, inits)


def test_clean_w8a8_and_int4_graphs_pass():
    assert lint(w8a8()) == []
    inits = [int4_tensor("w4", np.zeros((128, 4), np.int8)), f16("s", np.ones((1, 4)))]
    nodes = [helper.make_node("DequantizeLinear", ["w4", "s"], ["wd"], name="w4_dq", axis=0, block_size=128),
             helper.make_node("MatMul", ["x", "wd"], ["y"], name="mm")]
    assert lint(model(nodes, inits)) == []


@pytest.mark.parametrize("kwargs,needle", [
    ({"zp_value": 3}, "x_q: non-zero zero point"),
    ({"zp_type": np.uint8}, "uint8 zero point"),
    ({"act_scale_shape": (4,)}, "x_q: activation scale is not per-tensor"),
    ({"w_axis": 0}, "w_dq: MatMul weight scale must be per output channel"),
])
def test_w8a8_rule_violations_name_the_node(kwargs, needle):
    assert any(needle in v for v in lint(w8a8(**kwargs)))


def test_contrib_ops_qoperators_functions_types_and_opset():
    nodes = [helper.make_node("MatMulNBits", ["x", "b"], ["y"], name="nbits", domain="com.microsoft"),
             helper.make_node("MatMulInteger", ["x", "b"], ["z"], name="mmi")]
    v = lint(model(nodes, [numpy_helper.from_array(np.ones((4, 4), np.float32), "b")], opset=25,
                   io_type=TensorProto.FLOAT, extra_opsets=[helper.make_opsetid("com.microsoft", 1)]))
    joined = "\n".join(v)
    for needle in ("node nbits: op com.microsoft:MatMulNBits", "node mmi: QOperator op MatMulInteger",
                   "initializer b: float32", "io x: float32", "opset 25 outside", "non-standard domain 'com.microsoft'"):
        assert needle in joined


def test_int4_block_and_output_quantization_rules():
    inits = [int4_tensor("w4", np.zeros((32, 4), np.int8)), f16("s", np.ones((1, 4))),
             f16("os", np.ones(())), numpy_helper.from_array(np.array(0, np.int8), "oz")]
    nodes = [helper.make_node("DequantizeLinear", ["w4", "s"], ["wd"], name="w4_dq", axis=0, block_size=32),
             helper.make_node("MatMul", ["x", "wd"], ["m"], name="mm"),
             helper.make_node("QuantizeLinear", ["m", "os", "oz"], ["mq"], name="out_q"),
             helper.make_node("DequantizeLinear", ["mq", "os", "oz"], ["y"], name="out_dq")]
    v = "\n".join(lint(model(nodes, inits)))
    assert "w4_dq: INT4 block_size 32" in v and "out_q: quantizes something other than a MatMul input" in v


def test_profile_rules_report_missing_and_inconsistent_profiles():
    from optpipe.targets.trt_lint import lint_profile

    g = helper.make_graph([helper.make_node("Identity", ["ids"], ["y"], name="id")], "g",
                          [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "sequence"])],
                          [helper.make_tensor_value_info("y", TensorProto.INT64, ["batch", "sequence"])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    ok = {"min": {"ids": [1, 1]}, "opt": {"ids": [1, 64]}, "max": {"ids": [4, 512]}}
    assert lint_profile(m, ok) == []
    assert "profile: missing" in lint_profile(m, None)[0]
    assert "has no min/opt/max shape" in lint_profile(m, {"min": {}, "opt": {}, "max": {}})[0]
    bad = {"min": {"ids": [1, 128]}, "opt": {"ids": [1, 64]}, "max": {"ids": [4, 512]}}
    assert "axis 1: min 128 <= opt 64 <= max 512 does not hold" in lint_profile(m, bad)[0]
