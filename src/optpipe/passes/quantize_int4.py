"""`quantize-int4`: block-wise weight-only INT4 (MatMulNBits), RTN or GPTQ, int8 compute on CPU by default."""
from __future__ import annotations

import re
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from .. import quant as _quant
from ..errors import BuildError
from ..pipeline import ModelState, OrtQuantizePass, PassConfig, PassContext, PassResult, Patterns, calibrated_when
from ._nbits import quantize_matmuls, select_matmuls
from ._onnx import metadata


class Int8Part(BaseModel):
    """Mixed precision: MatMuls this pass would quantize that go to INT8 instead (weight-only MatMulNBits,
    symmetric, RTN), for the linears 4 bits cannot carry. `scripts/layer_sensitivity.py` measures which."""

    model_config = ConfigDict(extra="forbid")
    include: Patterns = Field(default_factory=list, description="regexes on MatMul node names")
    edge_layers: int = Field(0, ge=0, description="every linear of the first and the last N decoder layers")
    block_size: Literal[32, 64, 128] = 32


LAYER_INDEX = re.compile(r"layers\.(\d+)[./]")


class Int4Config(PassConfig):
    algorithm: Literal["rtn", "gptq"] = "rtn"
    block_size: Literal[32, 64, 128] = 32
    zero_point: Literal["float", "int", "symmetric"] = Field(
        "float", description="float: exact on GGUF Q4_1-style grids; int: ORT-style; symmetric: Q4_0-style")
    accuracy_level: Literal[0, 1, 4] = Field(4, description="4 = int8 activations x int4 weights (VNNI); 0/1 = fp32")
    include: Patterns = Field(default_factory=list, description="regexes on MatMul node names; empty = all")
    exclude: Patterns = Field(default_factory=lambda: ["lm_head"])
    damp: _quant.Damp
    act_order: bool = Field(False, description="GPTQ: columns in order of decreasing activation (static groups)")
    sequential: bool = Field(False, description="GPTQ: layer by layer, each linear's Hessian measured with the linears "
                                                "before it already quantized (one walk through the model)")
    clip_search: bool = Field(False, description="float/int zero points: search shrunken block ranges for the least "
                                                 "squared error (Hessian-diagonal weighted under GPTQ); exact grids "
                                                 "stay exact")
    int8: Optional[Int8Part] = Field(None, description="mixed precision: these MatMuls go to INT8 instead")
    scale_dtype: _quant.ScaleDtype
    bits: Literal[2, 4] = Field(4, description="2 is for experiments only (it is refused by any sane gate)")


class QuantizeInt4(OrtQuantizePass):
    name = "quantize-int4"
    Config = Int4Config

    needs = calibrated_when(algorithm="gptq")  # type: ignore[assignment]

    def call(self, state: ModelState, ctx: PassContext) -> PassResult:
        c = self.config
        wide = self._int8_names(state.onnx_model) if c.int8 else []
        keep_wide = [f"^{re.escape(n)}$" for n in wide]
        changes, notes = quantize_matmuls(state, ctx, bits=c.bits, block=c.block_size, scheme=c.zero_point,
                                          algorithm=c.algorithm, accuracy_level=c.accuracy_level,
                                          include=c.include, exclude=c.exclude + keep_wide, damp=c.damp,
                                          act_order=c.act_order, sequential=c.sequential,
                                          clip=c.clip_search, scale_dtype=c.scale_dtype)
        if wide:
            wide_changes, wide_notes = quantize_matmuls(
                state, ctx, bits=8, block=c.int8.block_size, scheme="symmetric", algorithm="rtn",
                accuracy_level=c.accuracy_level, include=keep_wide, exclude=[],
                scale_dtype=c.scale_dtype)
            changes["skipped"] = {k: v for k, v in changes["skipped"].items() if k not in wide}
            changes["layers_skipped"] = len(changes["skipped"])
            changes["int8"] = {k: wide_changes[k] for k in wide_changes if k != "skipped"}
            notes += [f"mixed precision: {len(wide)} MatMuls in INT8 (symmetric, block {c.int8.block_size})"]
            if not changes["layers_quantized"]:
                notes.append("no MatMul is in INT4: `int8` took every one this pass selected")
            return PassResult(True, changes, notes + wide_notes)
        return PassResult(changes["layers_quantized"] > 0, changes, notes)

    def _int8_names(self, model) -> list[str]:
        """The MatMuls this pass selects that `int8` names (by pattern, or in an edge decoder layer)."""
        c, part = self.config, self.config.int8
        chosen = [n.name for n in select_matmuls(model, c.include, c.exclude)[0]]
        edges: set[int] = set()
        if part.edge_layers:
            layers = metadata(model).get("optpipe.num_layers")
            if layers is None:
                raise BuildError("quantize-int4 int8.edge_layers: the graph does not say how many decoder layers "
                                 "it has (optpipe.num_layers metadata from `export`)")
            n = int(layers)
            edges = set(range(min(part.edge_layers, n))) | set(range(max(0, n - part.edge_layers), n))
        out = []
        for name in chosen:
            m = LAYER_INDEX.search(name)
            if any(re.search(p, name) for p in part.include) or (m and int(m.group(1)) in edges):
                out.append(name)
        if part.edge_layers and not any(LAYER_INDEX.search(n) for n in chosen):
            raise BuildError("quantize-int4 int8.edge_layers: no MatMul name says its decoder layer "
                             "('layers.<i>.' in the name)")
        return out
