"""`ipex-optimize` (cpu-ipex): what `ipex.llm.optimize` does to the model when the artifact is loaded.

IPEX rewrites modules into its own fused kernels and (in deployment mode) traces them to TorchScript; the
result cannot be stored as plain tensors, and IPEX's own deployment archive needs the full HF model in
memory plus a private API to reload. So the artifact keeps the (fp32 or bf16) checkpoint, and this pass
records the IPEX settings that `target.load` applies. It checks now that IPEX imports, so a missing IPEX
stops the build before any work with a message saying how to install it.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..pipeline import ModelState, PassConfig, PassContext, PassResult, TorchPass


class IpexConfig(PassConfig):
    renamed = {"group_size": "block_size"}
    weight_only: Literal["none", "int8", "int4"] = Field("none", description="IPEX weight-only quantization")
    block_size: int = Field(-1, description="WOQ group along the input axis; -1 = per channel")
    lowp_mode: Literal["none", "fp16", "bf16", "int8"] = Field("bf16", description="WOQ compute dtype")
    deployment_mode: bool = Field(True, description="trace to TorchScript at load (IPEX's fast path)")


class IpexOptimize(TorchPass):
    name = "ipex-optimize"
    Config = IpexConfig
    provides = frozenset({"ipex"})
    targets = frozenset({"cpu-ipex"})

    def call(self, state: ModelState, ctx: PassContext) -> PassResult:
        from ..runtime.ipex import import_ipex

        ipex = import_ipex()
        settings = {**self.config.model_dump(), "ipex_version": ipex.__version__}
        state.handoff.ipex = settings
        return PassResult(True, {"weight_only": self.config.weight_only, "lowp_mode": self.config.lowp_mode,
                                 "ipex_version": ipex.__version__},
                          ["applied by ipex.llm.optimize when the artifact is loaded (the gates measure that)"])
