"""`fp16`: the non-quantized parts of the graph in float16, numerically sensitive units kept in float32.

Every float initializer, constant, cast target and graph input/output becomes float16 (so the I/O types are
stated: logits and the KV cache are float16). The model-local functions from `export` (RMSNorm and attention:
reductions, softmax, rotary) are wrapped to cast their float inputs to float32 and their outputs back, because
squared activations with outliers overflow float16. Quantize/dequantize scales become float16 too.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..pipeline import ModelState, Pass, PassConfig, PassContext, PassResult
from ._onnx import set_metadata

NON_FLOAT_INPUTS = {"attention_mask"}  # the export functions' only integer input


def _wrap_fp32(fn: onnx.FunctionProto) -> onnx.FunctionProto:
    pre = [helper.make_node("Cast", [f"in__{x}"], [x], to=TensorProto.FLOAT) for x in fn.input
           if x not in NON_FLOAT_INPUTS]
    post = [helper.make_node("Cast", [y], [f"out__{y}"], to=TensorProto.FLOAT16) for y in fn.output]
    inputs = [x if x in NON_FLOAT_INPUTS else f"in__{x}" for x in fn.input]
    return helper.make_function(fn.domain, fn.name, inputs, [f"out__{y}" for y in fn.output],
                                pre + list(fn.node) + post, list(fn.opset_import))


def _to_fp16(t: onnx.TensorProto) -> onnx.TensorProto:
    return numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name)


class Fp16(Pass):
    targets = frozenset({"gpu-tensorrt"})  # TensorRT's QDQ/fp16 route; cpu-onnx has its own quantizers
    name = "fp16"
    Config = PassConfig
    requires = frozenset({"onnx"})
    provides = frozenset({"fp16"})

    def call(self, state: ModelState, ctx: PassContext) -> PassResult:
        model = state.onnx_model
        g = model.graph
        inits = 0
        for i, t in enumerate(g.initializer):
            if t.data_type == TensorProto.FLOAT:
                g.initializer[i].CopyFrom(_to_fp16(t))
                inits += 1
        consts = casts = 0
        for n in g.node:
            if n.op_type == "Constant":
                for a in n.attribute:
                    if a.name == "value" and a.t.data_type == TensorProto.FLOAT:
                        a.t.CopyFrom(_to_fp16(a.t))
                        consts += 1
            elif n.op_type == "Cast":
                for a in n.attribute:
                    if a.name == "to" and a.i == TensorProto.FLOAT:
                        a.i = TensorProto.FLOAT16
                        casts += 1
        io = 0
        for vi in list(g.input) + list(g.output):
            if vi.type.tensor_type.elem_type == TensorProto.FLOAT:
                vi.type.tensor_type.elem_type = TensorProto.FLOAT16
                io += 1
        del g.value_info[:]  # stale float32 annotations
        wrapped = [_wrap_fp32(f) for f in model.functions]
        del model.functions[:]
        model.functions.extend(wrapped)
        set_metadata(model, optpipe__float_type="float16")
        state.handoff.float32_islands = [f.name for f in wrapped]
        return PassResult(True, {"initializers_fp16": inits, "constants_fp16": consts, "casts_retargeted": casts,
                                 "io_fp16": io, "functions_kept_fp32": len(wrapped)},
                          [f"kept in float32 (cast at the boundary): {', '.join(f.name for f in wrapped)}"])
