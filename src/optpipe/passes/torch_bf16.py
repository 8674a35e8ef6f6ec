"""`bf16-autocast` (cpu-torch): weights and activations in bfloat16 where the CPU computes bf16 natively.

RMSNorm computes its variance in fp32 inside the module and SDPA's CPU kernel accumulates the softmax in
fp32, so only the storage and the matmuls drop to bf16. A CPU without avx512_bf16 or AMX emulates bf16
(slower than fp32), and a CPU with avx512_bf16 may still run torch's bf16 matmul slower than fp32 (timed on the
model's own decode-step shapes: `hw.bf16_matmul_speedup`). What happens there is the recipe's choice, made before the
model is loaded:
`fallback: refuse` (a bf16 recipe truly needs the ISA: exit 2, naming the alternative), `fallback: fp32`
(keep fp32 for the unquantized parts and record it; quantized modules still feed their kernels bf16, which
is those kernels' fast path on every x86 ISA), or `force: true` (convert anyway).
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from .. import arch, hw
from ..errors import RecipeError
from ..pipeline import ModelState, PassConfig, PassContext, PassResult, TorchPass


class Bf16Config(PassConfig):
    force: bool = Field(False, description="convert even when the CPU has no native bf16 (avx512_bf16 / AMX)")
    fallback: Literal["refuse", "fp32"] = Field(
        "refuse", description="on a CPU without native bf16: refuse the build before loading the model, or keep fp32 "
                              "(recorded in the manifest)")


def decode_shapes(config) -> tuple[tuple[int, int, int], ...] | None:
    """The weights one decoded token is multiplied by (the family's description), or None where the model's
    family or widths are unknown (the measurement then times a stand-in matrix)."""
    model_type = None if config is None else arch.setting(config, "model_type")
    if model_type not in arch.supported():
        return None
    try:
        return arch.describe(model_type).decode_matmuls(config)
    except (TypeError, ValueError):  # a width the config (or GGUF header) does not give
        return None


def bf16_shortfall(config=None) -> str | None:
    """Why bf16 is not measurably faster than fp32 on this CPU for a model of `config` (a transformers config or the
    facts' dict; None: a stand-in shape), or None."""
    isa = hw.isa()
    if not (isa.get("avx512_bf16") or isa.get("amx_bf16")):
        return "this CPU has no avx512_bf16 or AMX: bf16 would be emulated and slower than fp32"
    shapes = decode_shapes(config)
    ratio, low = hw.bf16_matmul_speedup(shapes) if shapes else hw.bf16_matmul_speedup()
    if low < 1.0:  # bf16 must be measurably faster: a point near 1.0 would flip the decision from run to run
        what = "this model's decode-step matmuls" if shapes else "a decode-shaped 2048x1024 matmul"
        return (f"this CPU has avx512_bf16 but torch's bf16 matmul measured {ratio:.2f}x the fp32 speed here (95% "
                f"interval from {low:.2f}x; {what}): bf16 is not measurably faster than fp32")
    return None


class Bf16Autocast(TorchPass):
    name = "bf16-autocast"
    Config = Bf16Config
    provides = frozenset({"bf16"})
    targets = frozenset({"cpu-torch", "cpu-ipex"})

    def check_machine(self, facts=None) -> None:
        self.refuse_if(bf16_shortfall(facts.config if facts else None))

    def refuse_if(self, why: str | None) -> None:
        if why and not self.config.force and self.config.fallback == "refuse":
            raise RecipeError(f"{why}. Use `fallback: fp32` (keeps fp32 here), `force: true`, or an fp32/INT8/INT4 variant "
                              "of the recipe (e.g. recipes/smollm2-135m-cpu-torch-int8.yaml)")

    def call(self, state: ModelState, ctx: PassContext) -> PassResult:
        model = state.torch_model
        why = bf16_shortfall(model.config)  # the measurement made before loading (cached per shapes)
        self.refuse_if(why)
        native = why is None
        if not native and not self.config.force:  # fallback: fp32
            return PassResult(False, {"dtype": "float32", "native_bf16": False},
                              [f"{why}: fp32 kept (fallback: fp32); quantized modules still compute in "
                               "bf16 inside their kernels"])
        converted = sum(p.numel() for p in model.parameters() if p.dtype == torch.float32)
        model.to(torch.bfloat16)
        return PassResult(converted > 0, {"parameters_converted": converted, "dtype": "bfloat16",
                                          "native_bf16": native},
                          ["RMSNorm variance and SDPA softmax accumulate in fp32 inside their kernels"])
