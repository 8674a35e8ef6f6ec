"""`bf16-autocast` (cpu-torch): weights and activations in bfloat16 where the CPU computes bf16 natively.

RMSNorm computes its variance in fp32 inside the module and SDPA's CPU kernel accumulates the softmax in
fp32, so only the storage and the matmuls drop to bf16. A CPU without avx512_bf16 or AMX emulates bf16
(slower than fp32), and a CPU with avx512_bf16 may still run torch's bf16 matmul slower than fp32 (measured
once per process: `hw.bf16_matmul_speedup`). What happens there is the recipe's choice, made before the model is loaded:
`fallback: refuse` (a bf16 recipe truly needs the ISA: exit 2, naming the alternative), `fallback: fp32`
(keep fp32 for the unquantized parts and record it; quantized modules still feed their kernels bf16, which
is those kernels' fast path on every x86 ISA), or `force: true` (convert anyway).
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from .. import hw
from ..errors import RecipeError
from ..pipeline import ModelState, PassConfig, PassContext, PassResult, TorchPass


class Bf16Config(PassConfig):
    force: bool = Field(False, description="convert even when the CPU has no native bf16 (avx512_bf16 / AMX)")
    fallback: Literal["refuse", "fp32"] = Field(
        "refuse", description="on a CPU without native bf16: refuse the build before loading the model, or keep fp32 "
                              "(recorded in the manifest)")


def native_bf16() -> bool:
    """bf16 instructions (avx512_bf16 / AMX) *and* torch's bf16 matmul measurably faster than fp32 here."""
    return bf16_shortfall() is None


def bf16_shortfall() -> str | None:
    """Why bf16 is not measurably faster than fp32 on this CPU, or None."""
    isa = hw.isa()
    if not (isa.get("avx512_bf16") or isa.get("amx_bf16")):
        return "this CPU has no avx512_bf16 or AMX: bf16 would be emulated and slower than fp32"
    ratio, low = hw.bf16_matmul_speedup()
    if low < 1.0:  # bf16 must be measurably faster: a point near 1.0 would flip the decision from run to run
        return (f"this CPU has avx512_bf16 but torch's bf16 matmul measured {ratio:.2f}x the fp32 speed here (95% "
                f"interval from {low:.2f}x; a decode-shaped matmul): bf16 is not measurably faster than fp32")
    return None


class Bf16Autocast(TorchPass):
    name = "bf16-autocast"
    Config = Bf16Config
    provides = frozenset({"bf16"})
    targets = frozenset({"cpu-torch", "cpu-ipex"})

    def check_machine(self) -> None:
        why = bf16_shortfall()
        if why and not self.config.force and self.config.fallback == "refuse":
            raise RecipeError(f"{why}. Use `fallback: fp32` (keeps fp32 here), `force: true`, or an fp32/INT8/INT4 variant "
                              "of the recipe (e.g. recipes/smollm2-135m-cpu-torch-int8.yaml)")

    def call(self, state: ModelState, ctx: PassContext) -> PassResult:
        self.check_machine()
        native = native_bf16()
        if not native and not self.config.force:  # fallback: fp32
            return PassResult(False, {"dtype": "float32", "native_bf16": False},
                              [f"{bf16_shortfall()}: fp32 kept (fallback: fp32); quantized modules still compute in "
                               "bf16 inside their kernels"])
        model = state.torch_model
        converted = sum(p.numel() for p in model.parameters() if p.dtype == torch.float32)
        model.to(torch.bfloat16)
        return PassResult(converted > 0, {"parameters_converted": converted, "dtype": "bfloat16",
                                          "native_bf16": native},
                          ["RMSNorm variance and SDPA softmax accumulate in fp32 inside their kernels"])
