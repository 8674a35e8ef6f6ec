"""`qdq-int8`: W8A8 with explicit Q/DQ (TensorRT's INT8 path): per-channel symmetric INT8 weights
(DequantizeLinear axis 1 on a [K, N] weight), per-tensor symmetric INT8 activations with scales from calibration,
bias and outputs left in float. Pair with `smoothquant` for models with activation outliers; layers matched by
`exclude` stay in float (listed in the manifest)."""
from __future__ import annotations

from onnx import numpy_helper
from pydantic import Field

from .. import quant as _quant
from ..pipeline import ModelState, OnnxQuantizePass, PassConfig, PassContext, PassResult, Patterns
from ._nbits import activation_stats, select_matmuls
from ._onnx import GraphEdit, ensure_opset
from ._qdq import quantize_activation, replace_weight


class QdqInt8Config(PassConfig):
    include: Patterns = Field(default_factory=list, description="regexes on MatMul node names; empty = all")
    exclude: Patterns = Field(default_factory=lambda: ["lm_head"])
    activation_margin: float = Field(1.0, gt=0, le=2, description="multiplies the calibrated |x| max")


class QdqInt8(OnnxQuantizePass):
    targets = frozenset({"gpu-tensorrt"})  # TensorRT's QDQ/fp16 route; cpu-onnx has its own quantizers
    name = "qdq-int8"
    Config = QdqInt8Config
    needs = frozenset({"calibration"})

    def call(self, state: ModelState, ctx: PassContext) -> PassResult:
        model = state.onnx_model
        selected, skipped = select_matmuls(model, self.config.include, self.config.exclude)
        absmax = activation_stats(model, sorted({n.input[0] for n in selected}), ctx.calibration_windows(),
                                  ctx.threads, "absmax")
        edit = GraphEdit(model)
        errors = []
        for node in selected:
            w = edit.array(node.input[1])  # [K, N]
            q, scale = _quant.symmetric_int8(w, axis=1)  # one scale per output column N
            errors.append(_quant.relative_error(q * scale, w))
            replace_weight(edit, node, numpy_helper.from_array(q, node.name + ".weight_q"), scale, axis=1)
            quantize_activation(edit, node, float(absmax[node.input[0]]) * self.config.activation_margin)
        edit.commit()
        ensure_opset(model, "", 21)
        state.handoff.quantized.update({n.name: "int8 W8A8 qdq" for n in selected})
        state.handoff.unquantized.update(skipped)
        return PassResult(bool(selected), {"layers_quantized": len(selected), "layers_skipped": len(skipped),
                                           **_quant.error_summary(errors), "skipped": skipped}, [])
