"""`bf16-autocast` (cpu-torch): weights and activations in bfloat16 where the CPU computes bf16 natively.

RMSNorm computes its variance in fp32 inside the module and SDPA's CPU kernel accumulates the softmax in
fp32, so only the storage and the matmuls drop to bf16. A CPU without avx512_bf16 or AMX emulates bf16
(slower than fp32), so the pass refuses unless `force: true`.
"""
from __future__ import annotations

import torch
from pydantic import Field

from .. import hw
from ..errors import BuildError
from ..pipeline import ModelState, Pass, PassConfig, PassContext, PassResult, register


class Bf16Config(PassConfig):
    force: bool = Field(False, description="convert even when the CPU has no native bf16 (avx512_bf16 / AMX)")


def native_bf16() -> bool:
    isa = hw.isa()
    return bool(isa.get("avx512_bf16") or isa.get("amx_bf16"))


@register
class Bf16Autocast(Pass):
    name = "bf16-autocast"
    Config = Bf16Config
    input_stage = "torch"
    output_stage = "torch"
    provides = frozenset({"bf16"})
    targets = frozenset({"cpu-torch", "cpu-ipex"})

    def call(self, state: ModelState, ctx: PassContext) -> PassResult:
        if not native_bf16() and not self.config.force:
            raise BuildError("this CPU has no avx512_bf16 or AMX: bf16 would be emulated and slower than fp32 "
                             "(set force: true to convert anyway)")
        model = state.torch_model
        converted = sum(p.numel() for p in model.parameters() if p.dtype == torch.float32)
        model.to(torch.bfloat16)
        state.info["dtype"] = "bfloat16"
        return PassResult(converted > 0, {"parameters_converted": converted, "dtype": "bfloat16",
                                          "native_bf16": native_bf16()},
                          ["RMSNorm variance and SDPA softmax accumulate in fp32 inside their kernels"])
