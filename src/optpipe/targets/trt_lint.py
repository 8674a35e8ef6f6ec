"""TensorRT-readiness rules for an ONNX graph; each violation names the node (or tensor) at fault.

Rules (TensorRT 10.x ONNX parser, explicit quantization, strongly typed):
 1. only standard ONNX ops: no QOperator ops (QLinearMatMul, MatMulInteger, ...), no `com.microsoft` or other
    custom domains, no model-local functions left;
 2. symmetric quantization: every Q/DQ zero point is absent or 0; INT8 is signed; scales are constants, fp16/fp32;
 3. INT8 (W8A8): per-tensor activation scales; weight DQ per channel (axis 1 of a [K, N] MatMul weight); no output
    quantization (a QuantizeLinear must feed a DequantizeLinear that feeds a MatMul input); bias stays float;
 4. INT4: weight-only, blocked DequantizeLinear with block_size 64 or 128 on one of the last two axes, opset >= 21;
 5. float tensors are fp16 (initializers, graph I/O), every graph input/output states its element type;
 6. default-domain opset within 9..24; model proto under 2 GB (weights in external data).
"""
from __future__ import annotations

import onnx
from onnx import TensorProto

QOPERATOR = {"QLinearMatMul", "MatMulInteger", "QLinearConv", "ConvInteger", "DynamicQuantizeLinear",
             "QLinearAdd", "QLinearMul", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QAttention"}
FLOAT_TYPES = {TensorProto.FLOAT16, TensorProto.FLOAT}
INT4_BLOCKS = {64, 128}


def _const_values(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    out = {t.name: t for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    out[n.output[0]] = a.t
    return out


def _attr(node, name, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def lint(model: onnx.ModelProto) -> list[str]:
    v: list[str] = []
    g = model.graph
    consts = _const_values(model)
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    matmul_outputs = {o for n in g.node if n.op_type == "MatMul" for o in n.output}
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None or not 9 <= opset <= 24:
        v.append(f"model: default-domain opset {opset} outside TensorRT 10's 9..24")
    for o in model.opset_import:
        if o.domain not in ("", "ai.onnx"):
            v.append(f"model: imports non-standard domain {o.domain!r}")
    if model.functions:
        v.append(f"model: {len(model.functions)} local function(s) left (inline them)")
    if model.ByteSize() > 2**31 - 1:
        v.append("model: proto exceeds 2 GB; weights must be in external data")
    for vi in list(g.input) + list(g.output):
        et = vi.type.tensor_type.elem_type
        if et == TensorProto.UNDEFINED:
            v.append(f"io {vi.name}: element type not stated")
        elif et == TensorProto.FLOAT:
            v.append(f"io {vi.name}: float32 (non-quantized parts must be fp16)")
    for t in g.initializer:
        if t.data_type == TensorProto.FLOAT:
            v.append(f"initializer {t.name}: float32 (must be fp16)")
    for n in g.node:
        where = f"node {n.name or n.op_type}"
        if n.domain not in ("", "ai.onnx"):
            v.append(f"{where}: op {n.domain}:{n.op_type} is not a standard ONNX op")
            continue
        if n.op_type in QOPERATOR:
            v.append(f"{where}: QOperator op {n.op_type} (use QuantizeLinear/DequantizeLinear pairs)")
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        scale = consts.get(n.input[1]) if len(n.input) > 1 else None
        if scale is None:
            v.append(f"{where}: scale {n.input[1] if len(n.input) > 1 else '?'} is not a constant")
        elif scale.data_type not in FLOAT_TYPES:
            v.append(f"{where}: scale type {TensorProto.DataType.Name(scale.data_type)} (fp16/fp32 only)")
        if len(n.input) > 2 and n.input[2]:
            zp = consts.get(n.input[2])
            if zp is None:
                v.append(f"{where}: zero point is not a constant")
            else:
                arr = onnx.numpy_helper.to_array(zp)
                if arr.size and (arr != 0).any():
                    v.append(f"{where}: non-zero zero point (TensorRT quantization is symmetric)")
                if zp.data_type == TensorProto.UINT8:
                    v.append(f"{where}: uint8 zero point (INT8 must be signed)")
        if n.op_type == "QuantizeLinear":
            if scale is not None and len(scale.dims) > 0 and max(scale.dims) > 1:
                v.append(f"{where}: activation scale is not per-tensor")
            dq = [c for c in consumers.get(n.output[0], []) if c.op_type == "DequantizeLinear"]
            users = [c for d in dq for c in consumers.get(d.output[0], [])]
            if not users or any(c.op_type != "MatMul" for c in users) or n.input[0] in matmul_outputs:
                v.append(f"{where}: quantizes something other than a MatMul input (output quantization)")
            continue
        x = consts.get(n.input[0])
        if x is None:
            continue  # activation DQ, checked through its QuantizeLinear
        users = consumers.get(n.output[0], [])
        block = _attr(n, "block_size", 0)
        if x.data_type == TensorProto.INT4:
            rank = len(x.dims)
            axis = _attr(n, "axis", 1) % rank
            if block not in INT4_BLOCKS:
                v.append(f"{where}: INT4 block_size {block} (64 or 128)")
            if axis < rank - 2:
                v.append(f"{where}: INT4 blocks on axis {axis}, not one of the last two")
            if opset is not None and opset < 21:
                v.append(f"{where}: blocked INT4 needs opset >= 21")
        elif x.data_type == TensorProto.INT8:
            if block:
                v.append(f"{where}: blocked INT8 weights (use per-channel)")
            if any(u.op_type == "MatMul" and u.input[1] == n.output[0] for u in users):
                axis = _attr(n, "axis", 1)
                if len(x.dims) == 2 and (axis % 2 != 1 or scale is None or list(scale.dims) != [x.dims[1]]):
                    v.append(f"{where}: MatMul weight scale must be per output channel (axis 1, shape [N])")
        elif x.data_type == TensorProto.UINT8:
            v.append(f"{where}: unsigned INT8 weight")
        if any(u.op_type == "Add" for u in users):
            v.append(f"{where}: dequantized tensor feeds an Add (bias must stay float)")
    return v


def lint_profile(model: onnx.ModelProto, shapes: dict | None) -> list[str]:
    """The optimization profile TensorRT needs for dynamic inputs: min/opt/max for each, of the input's rank,
    agreeing with its fixed dimensions, min <= opt <= max."""
    dynamic = {}
    for vi in model.graph.input:
        dims = vi.type.tensor_type.shape.dim
        if any(not d.HasField("dim_value") for d in dims):
            dynamic[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    if not dynamic:
        return []
    if not shapes or any(level not in shapes for level in ("min", "opt", "max")):
        return [f"profile: missing (dynamic inputs {', '.join(sorted(dynamic)[:3])}... need min/opt/max shapes)"]
    v = []
    for name, dims in dynamic.items():
        got = [shapes[level].get(name) for level in ("min", "opt", "max")]
        if any(g is None for g in got):
            v.append(f"profile: input {name} has no min/opt/max shape")
            continue
        if any(len(g) != len(dims) for g in got):
            v.append(f"profile: input {name} shape rank differs from the graph's ({len(dims)})")
            continue
        for axis, fixed in enumerate(dims):
            lo, opt, hi = (g[axis] for g in got)
            if fixed is not None and not lo == opt == hi == fixed:
                v.append(f"profile: input {name} axis {axis} is fixed at {fixed} in the graph")
            elif not lo <= opt <= hi:
                v.append(f"profile: input {name} axis {axis}: min {lo} <= opt {opt} <= max {hi} does not hold")
    return v
