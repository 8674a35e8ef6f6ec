"""`qdq-int4`: weight-only INT4 with block-wise `DequantizeLinear` (opset 21 `block_size` on the K axis of a
[K, N] weight), symmetric with positive scales and no zero point, as TensorRT takes it. RTN or GPTQ."""
from __future__ import annotations

import re
from typing import Literal

import numpy as np
from pydantic import Field

from .. import quant as _quant
from ..pipeline import (
    Damp,
    ModelState,
    Pass,
    PassConfig,
    PassContext,
    PassResult,
    Patterns,
    calibrated_when,
    register,
)
from ..progress import bar
from ._nbits import activation_stats, select_matmuls
from ._onnx import GraphEdit, ensure_opset
from ._qdq import int4_tensor, replace_weight


def _layer_groups(nodes) -> list[list]:
    """MatMuls grouped by decoder layer (`layers.<i>.` in the node name), in layer order; others last."""
    groups: dict[int, list] = {}
    for n in nodes:
        m = re.search(r"layers\.(\d+)\.", n.name)
        groups.setdefault(int(m.group(1)) if m else 1 << 30, []).append(n)
    return [groups[k] for k in sorted(groups)]


class QdqInt4Config(PassConfig):
    algorithm: Literal["rtn", "gptq"] = "gptq"
    block_size: Literal[64, 128] = 128
    include: Patterns = Field(default_factory=list)
    exclude: Patterns = Field(default_factory=lambda: ["lm_head"])
    damp: Damp = _quant.GPTQ_DAMP
    act_order: bool = Field(True, description="GPTQ: most-activated columns first, static groups")
    sequential: bool = Field(False, description="GPTQ: layer by layer, each layer's Hessians measured with the "
                                                "layers before it already quantized (one calibration run a layer)")


@register
class QdqInt4(Pass):
    targets = frozenset({"gpu-tensorrt"})  # TensorRT's QDQ/fp16 route; cpu-onnx has its own quantizers
    name = "qdq-int4"
    Config = QdqInt4Config
    requires = frozenset({"onnx"})
    provides = frozenset({"quantized"})

    needs = calibrated_when(algorithm="gptq")  # type: ignore[assignment]

    def _quantize_group(self, model, names, c, ctx, errors, b) -> None:
        edit = GraphEdit(model)
        by_name = {n.name: n for n in model.graph.node}
        group = [by_name[name] for name in names]
        hess = {}
        if c.algorithm == "gptq":
            hess = activation_stats(model, sorted({n.input[0] for n in group}), ctx.calibration_windows(),
                                    ctx.threads, "hessian")
        for node in group:
            errors.append(self._quantize(edit, node, hess.get(node.input[0])))
            b.update(1)
        edit.commit()

    def _quantize(self, edit: GraphEdit, node, hessian) -> float:
        c = self.config
        w = edit.array(node.input[1]).T.astype(np.float32)  # [N, K]
        if c.algorithm == "gptq":
            qw = _quant.gptq(w, hessian, 4, c.block_size, "symmetric-positive", damp=c.damp, act_order=c.act_order)
        else:
            qw = _quant.rtn(w, 4, c.block_size, "symmetric-positive")
        signed = (qw.q.astype(np.int8) - 8).reshape(w.shape).T  # [K, N] in [-8, 7]
        replace_weight(edit, node, int4_tensor(node.name + ".weight_q4", signed), qw.scale.T, axis=0,
                       block_size=c.block_size)
        return _quant.relative_error(qw.dequantize(), w)

    def call(self, state: ModelState, ctx: PassContext) -> PassResult:
        c = self.config
        model = state.onnx_model
        selected, skipped = select_matmuls(model, c.include, c.exclude)
        edit = GraphEdit(model)
        usable = []
        for node in selected:
            k = edit.inits[node.input[1]].dims[0]
            if k % c.block_size:
                skipped[node.name] = f"K={k} is not a multiple of block_size {c.block_size}"
            else:
                usable.append(node)
        groups = _layer_groups(usable) if c.algorithm == "gptq" and c.sequential else [usable]
        groups = [[n.name for n in g] for g in groups]  # a commit rebuilds the node list: find nodes by name again
        ensure_opset(model, "", 21)
        errors = []
        desc = f"qdq int4 ({c.algorithm}{', sequential' if len(groups) > 1 else ''})"
        with bar(len(usable), desc, "layer") as b:
            for names in groups:
                self._quantize_group(model, names, c, ctx, errors, b)
        state.handoff.quantized.update(
            {n.name: f"int4 weight-only qdq block{c.block_size} {c.algorithm}" for n in usable})
        state.handoff.unquantized.update(skipped)
        return PassResult(bool(usable), {"layers_quantized": len(usable), "layers_skipped": len(skipped),
                                         **_quant.error_summary(errors), "skipped": skipped}, [])
