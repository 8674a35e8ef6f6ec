"""`quantize-int4` / `quantize-int8` for cpu-torch: swap linear modules for quantized ones in place.

Linear modules are nn.Linear and transformers' Conv1D (GPT-2), see runtime.torch_modules.linear_weight.

INT4 is weight-only, per group along the input axis, with a float zero point (RTN, or GPTQ with the
Hessian of each layer's input from calibration text); INT8 is per-channel symmetric, weight-only or with
dynamic per-token activation quantization. The modules run on torch's own CPU kernels (torch_runtime).
"""
from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from .. import quant as _quant
from ..pipeline import ModelState, PassConfig, PassContext, PassResult, Patterns, TorchPass, calibrated_when
from ..progress import track
from ..runtime.torch_modules import (
    Int4WeightOnlyLinear,
    Int8Linear,
    linear_weight,
    select_linears,
    set_module,
    untie_lm_head,
)
from ._torch_calib import capture_inputs


class TorchInt4Config(PassConfig):
    renamed = {"group_size": "block_size"}
    algorithm: Literal["rtn", "gptq"] = "rtn"
    block_size: Literal[32, 64, 128] = 32
    zero_point: Literal["float", "symmetric"] = Field("float", description="float: exact on GGUF Q4_1-style grids")
    include: Patterns = Field(default_factory=list, description="regexes on module names; empty = all linears")
    exclude: Patterns = Field(default_factory=lambda: ["lm_head"])
    damp: _quant.Damp
    act_order: bool = Field(False, description="GPTQ: columns by decreasing Hessian diagonal, static groups")
    max_calibration_tokens: int | None = Field(None, ge=16)


class TorchInt8Config(PassConfig):
    mode: Literal["weight-only", "dynamic"] = "weight-only"
    include: Patterns = Field(default_factory=list, description="regexes on module names; empty = all linears")
    exclude: Patterns = Field(default_factory=list)


def _select(model, include: list[str], exclude: list[str]):
    """Linear layers to quantize; a tied lm_head gets its own weight first (the embedding stays float)."""
    chosen, skipped = select_linears(model, include, exclude)
    if "lm_head" in chosen and untie_lm_head(model):
        chosen["lm_head"] = model.get_output_embeddings()
    return chosen, skipped


def _record(state: ModelState, quantized: dict[str, str], skipped: dict[str, str], rel: list[float]) -> dict:
    state.handoff.quantized.update(quantized)
    return {"layers_quantized": len(quantized), "layers_skipped": len(skipped), **_quant.error_summary(rel),
            "skipped": skipped}


class _TorchQuantize(TorchPass):
    """Swaps linear modules for the cpu-torch runtime's quantized ones."""
    provides = frozenset({"quantized"})
    targets = frozenset({"cpu-torch"})


class TorchQuantizeInt4(_TorchQuantize):
    name = "quantize-int4"
    Config = TorchInt4Config

    needs = calibrated_when(algorithm="gptq")  # type: ignore[assignment]

    def call(self, state: ModelState, ctx: PassContext) -> PassResult:
        c = self.config
        model = state.torch_model
        chosen, skipped = _select(model, c.include, c.exclude)
        fit, notes = _quant.fit_blocks({n: linear_weight(lin).shape[1] for n, lin in chosen.items()}, c.block_size,
                                       skipped, "in_features")
        for name, lin in chosen.items():  # in module order: the manifest's `skipped` keeps it
            out_features = linear_weight(lin).shape[0]
            if name in fit and out_features % 16:
                skipped[name] = f"out_features={out_features} is not a multiple of 16 (the CPU int4 kernel's packing)"
        chosen = {name: lin for name, lin in chosen.items() if name not in skipped}
        hessians = {}
        if c.algorithm == "gptq" and chosen:
            stats = capture_inputs(model, chosen, ctx.calibration_windows(), reduce=_quant.HessianSum.reducer(),
                                   max_tokens=c.max_calibration_tokens, desc="gptq calibration")
            hessians = {name: s.hessian() for name, s in stats.items()}
        scheme = c.zero_point
        rel, done = [], {}
        for name, lin in track(chosen.items(), desc=f"quantize int4 ({c.algorithm})", unit="layer"):
            w = linear_weight(lin).detach().float().numpy()
            if c.algorithm == "gptq":
                qw = _quant.gptq(w, hessians[name], 4, c.block_size, scheme, damp=c.damp, act_order=c.act_order)
            else:
                qw = _quant.rtn(w, 4, c.block_size, scheme)
            minimum = qw.minimum if qw.minimum is not None else -qw.scale * qw.zero.astype(np.float32)  # w = q*scale + minimum
            mod = Int4WeightOnlyLinear.from_codes(qw.q.reshape(w.shape), qw.scale, minimum, lin.bias)
            rel.append(_quant.relative_error(mod.dequantize(), w))
            set_module(model, name, mod)
            done[name] = f"int4 {c.algorithm} group{c.block_size} {scheme} (bf16 compute)"
        return PassResult(bool(done), _record(state, done, skipped, rel),
                          notes + ["scales and zero points are stored in bf16 (what the CPU int4 kernel takes)"])


class TorchQuantizeInt8(_TorchQuantize):
    name = "quantize-int8"
    Config = TorchInt8Config

    def call(self, state: ModelState, ctx: PassContext) -> PassResult:
        c = self.config
        model = state.torch_model
        chosen, skipped = _select(model, c.include, c.exclude)
        rel, done = [], {}
        dynamic = c.mode == "dynamic"
        for name, lin in track(chosen.items(), desc=f"quantize int8 ({c.mode})", unit="layer"):
            w = linear_weight(lin)
            mod = Int8Linear.from_float(w, lin.bias, dynamic)
            rel.append(_quant.relative_error(mod.dequantize(), w.detach().float()))
            set_module(model, name, mod)
            done[name] = f"int8 per-channel symmetric, {c.mode}"
        return PassResult(bool(done), _record(state, done, skipped, rel))
