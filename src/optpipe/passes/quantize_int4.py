"""`quantize-int4`: block-wise weight-only INT4 (MatMulNBits), RTN or GPTQ, int8 compute on CPU by default."""
from __future__ import annotations

from typing import Literal

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
from ._nbits import quantize_matmuls


class Int4Config(PassConfig):
    algorithm: Literal["rtn", "gptq"] = "rtn"
    block_size: Literal[32, 64, 128] = 32
    zero_point: Literal["float", "int", "symmetric"] = Field(
        "float", description="float: exact on GGUF Q4_1-style grids; int: ORT-style; symmetric: Q4_0-style")
    accuracy_level: Literal[0, 1, 4] = Field(4, description="4 = int8 activations x int4 weights (VNNI); 0/1 = fp32")
    include: Patterns = Field(default_factory=list, description="regexes on MatMul node names; empty = all")
    exclude: Patterns = Field(default_factory=lambda: ["lm_head"])
    damp: Damp = _quant.GPTQ_DAMP
    act_order: bool = Field(False, description="GPTQ: columns in order of decreasing activation (static groups)")
    sequential: bool = Field(False, description="GPTQ: layer by layer, each linear's Hessian measured with the linears "
                                                "before it already quantized (one walk through the model)")
    clip_search: bool = Field(False, description="float/int zero points: search shrunken block ranges for the least "
                                                 "squared error (Hessian-diagonal weighted under GPTQ); exact grids "
                                                 "stay exact")
    bits: Literal[2, 4] = Field(4, description="2 is for experiments only (it is refused by any sane gate)")


@register
class QuantizeInt4(Pass):
    name = "quantize-int4"
    streams = True
    Config = Int4Config
    requires = frozenset({"onnx"})
    provides = frozenset({"quantized"})
    targets = frozenset({"cpu-onnx"})

    needs = calibrated_when(algorithm="gptq")  # type: ignore[assignment]

    def call(self, state: ModelState, ctx: PassContext) -> PassResult:
        c = self.config
        changes, notes = quantize_matmuls(state, ctx, bits=c.bits, block=c.block_size, scheme=c.zero_point,
                                          algorithm=c.algorithm, accuracy_level=c.accuracy_level,
                                          include=c.include, exclude=c.exclude, damp=c.damp,
                                          act_order=c.act_order, sequential=c.sequential,
                                          clip=c.clip_search)
        return PassResult(changes["layers_quantized"] > 0, changes, notes)
