"""Shared by `qdq-int8` and `qdq-int4`: explicit QuantizeLinear/DequantizeLinear quantization (TensorRT style)."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .. import quant
from ._onnx import GraphEdit


def int4_tensor(name: str, values: np.ndarray) -> onnx.TensorProto:
    """A signed INT4 initializer: values in [-8, 7], two a byte, first element in the low nibble."""
    flat = values.astype(np.int8).reshape(-1)
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.int8)])
    raw = quant.pack_bits(flat, 4).tobytes()
    t = onnx.TensorProto(name=name, data_type=TensorProto.INT4, dims=list(values.shape))
    t.raw_data = raw
    return t


def replace_weight(edit: GraphEdit, node: onnx.NodeProto, qweight: onnx.TensorProto, scale: np.ndarray,
                   **dq_attrs) -> None:
    """MatMul(x, W) -> MatMul(x, DequantizeLinear(Wq, scale)); the float weight is dropped."""
    base = node.name
    edit.new_inits += [qweight, numpy_helper.from_array(scale.astype(np.float32), base + ".weight_scale")]
    edit.new_nodes.append(helper.make_node("DequantizeLinear", [qweight.name, base + ".weight_scale"],
                                           [base + "/weight_dq"], name=base + "/weight_dq", **dq_attrs))
    edit.drop_inits.add(node.input[1])
    node.input[1] = base + "/weight_dq"


def quantize_activation(edit: GraphEdit, node: onnx.NodeProto, absmax: float) -> float:
    """Per-tensor symmetric INT8 Q/DQ on the MatMul's activation input; returns the scale."""
    base = node.name
    scale = max(float(absmax), 1e-8) / 127.0
    edit.new_inits += [numpy_helper.from_array(np.array(scale, np.float32), base + ".input_scale"),
                       numpy_helper.from_array(np.array(0, np.int8), base + ".input_zero_point")]
    x = node.input[0]
    edit.new_nodes += [
        helper.make_node("QuantizeLinear", [x, base + ".input_scale", base + ".input_zero_point"], [base + "/input_q"],
                         name=base + "/input_q"),
        helper.make_node("DequantizeLinear", [base + "/input_q", base + ".input_scale", base + ".input_zero_point"],
                         [base + "/input_dq"], name=base + "/input_dq"),
    ]
    node.input[0] = base + "/input_dq"
    return scale
