"""`qdq-int4`: weight-only INT4 with block-wise `DequantizeLinear` (opset 21 `block_size` on the K axis of a
[K, N] weight), symmetric with positive scales and no zero point, as TensorRT takes it. RTN or GPTQ."""
from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from .. import quant as _quant
from ..pipeline import ModelState, OnnxQuantizePass, PassConfig, PassContext, PassResult, Patterns, calibrated_when
from ..progress import track
from ._nbits import activation_stats, select_matmuls
from ._onnx import GraphEdit, ensure_opset
from ._qdq import int4_tensor, replace_weight


class QdqInt4Config(PassConfig):
    algorithm: Literal["rtn", "gptq"] = "gptq"
    block_size: Literal[64, 128] = 128
    include: Patterns = Field(default_factory=list)
    exclude: Patterns = Field(default_factory=lambda: ["lm_head"])
    damp: _quant.Damp
    act_order: bool = Field(True, description="GPTQ: most-activated columns first, static groups")
    sequential: bool = Field(False, description="GPTQ: layer by layer, each linear's Hessian measured with the "
                                                "linears before it already quantized (one walk through the model)")


class QdqInt4(OnnxQuantizePass):
    targets = frozenset({"gpu-tensorrt"})  # TensorRT's QDQ/fp16 route; cpu-onnx has its own quantizers
    name = "qdq-int4"
    Config = QdqInt4Config

    needs = calibrated_when(algorithm="gptq")  # type: ignore[assignment]

    def _gptq(self, state, edit: GraphEdit, nodes, ctx) -> dict:
        """MatMul name -> QuantizedWeight. Hessians from one run of the graph, or, sequential, from a walk through
        the model's layers with the linears before each one already quantized."""
        c = self.config
        fit = lambda w, h: _quant.gptq(w, h, 4, c.block_size, "symmetric-positive", damp=c.damp,  # noqa: E731
                                       act_order=c.act_order)
        weight = lambda n: edit.array(n.input[1]).T.astype(np.float32)  # noqa: E731
        if c.sequential:
            from ._layerwise_gptq import gptq_walk

            fits: dict = {}
            gptq_walk(state, nodes, weight, fit, ctx.calibration_windows(), fits.__setitem__, sequential=True)
            return fits
        hess = activation_stats(edit.model, sorted({n.input[0] for n in nodes}), ctx.calibration_windows(),
                                ctx.threads, "hessian")
        return {n.name: fit(weight(n), hess[n.input[0]]) for n in nodes}

    def _replace(self, edit: GraphEdit, node, qw) -> float:
        """The MatMul's weight -> INT4 DequantizeLinear (`qw`, or RTN when None); returns the relative error."""
        block = self.config.block_size
        w = edit.array(node.input[1]).T.astype(np.float32)  # [N, K]
        qw = qw if qw is not None else _quant.rtn(w, 4, block, "symmetric-positive")
        signed = (qw.q.astype(np.int8) - 8).reshape(w.shape).T  # [K, N] in [-8, 7]
        replace_weight(edit, node, int4_tensor(node.name + ".weight_q4", signed), qw.scale.T, axis=0, block_size=block)
        return _quant.relative_error(qw.dequantize(), w)

    def call(self, state: ModelState, ctx: PassContext) -> PassResult:
        c = self.config
        model = state.onnx_model
        selected, skipped = select_matmuls(model, c.include, c.exclude)
        edit = GraphEdit(model)
        widths = {n.name: edit.inits[n.input[1]].dims[0] for n in selected}
        in_blocks, notes = _quant.fit_blocks(widths, c.block_size, skipped)
        usable = [n for n in selected if n.name in in_blocks]
        ensure_opset(model, "", 21)
        fits = self._gptq(state, edit, usable, ctx) if c.algorithm == "gptq" and usable else {}
        how = c.algorithm + (" act-order" if c.algorithm == "gptq" and c.act_order else "") + (
            " sequential" if c.algorithm == "gptq" and c.sequential else "")
        errors = [self._replace(edit, node, fits.pop(node.name, None)) for node in track(usable, f"qdq int4 ({how})", "layer")]
        edit.commit()
        state.handoff.quantized.update({n.name: f"int4 weight-only qdq block{c.block_size} {how}" for n in usable})
        state.handoff.unquantized.update(skipped)
        return PassResult(bool(usable), {"layers_quantized": len(usable), "layers_skipped": len(skipped),
                                         **_quant.error_summary(errors), "skipped": skipped}, notes)
