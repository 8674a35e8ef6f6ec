"""`awq`: activation-aware weight scaling (Lin et al., 2024) before weight-only INT4 quantization.

Per group of linears that share an input, as the architecture description lists them (Llama: attention q/k/v after
input_layernorm; MLP gate/up after post_attention_layernorm; down_proj after up_proj; o_proj after v_proj when there
is no grouped-query sharing),
channels with large mean |activation| are scaled up in the weights and down in the preceding op:
s = mean|X|^alpha, with alpha searched on a grid to minimise the group's output error after quantizing the scaled
weights with the same quantizer the later pass uses. In float the model computes the same function.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import Field

from .. import arch
from .. import quant as _quant
from ..pipeline import ModelState, Pass, PassConfig, PassContext, PassResult, register
from ..progress import track
from ._torch_calib import capture_inputs


class AwqConfig(PassConfig):
    bits: Literal[4] = 4
    block_size: Literal[32, 64, 128] = 64
    scheme: Literal["symmetric-positive", "symmetric", "int", "float"] = Field(
        "symmetric-positive", description="the zero-point scheme of the quantizer that follows (must match)")
    grid: int = Field(11, ge=2, le=41, description="alpha values tried in [0, 1]")
    max_tokens: int = Field(512, ge=32, description="calibration tokens used for the error measure")


def _groups(model):
    """(name, norm or None, previous linear or None, linears) per group of the architecture description."""
    desc = arch.describe(model.config)
    for i, layer in enumerate(model.get_submodule(desc.layers)):
        for g in desc.groups(model.config):
            source = layer.get_submodule(g.source)
            yield (desc.layer_prefix(i) + g.name, source if g.source_kind == "norm" else None,
                   source if g.source_kind == "linear" else None, [layer.get_submodule(m) for m in g.members])


@register
class Awq(Pass):
    name = "awq"
    topology = True
    Config = AwqConfig
    input_stage = "torch"
    output_stage = "torch"
    needs = frozenset({"calibration"})
    provides = frozenset({"awq"})

    def check_recipe(self, recipe, facts, earlier) -> None:
        if any("fused-projections" in p.provides for p in earlier):
            raise ValueError("must come before `fuse`: it rescales the separate q/k/v and gate/up linears that "
                             "fuse packs into one")

    def _quantized(self, w: torch.Tensor) -> torch.Tensor:
        c = self.config
        return torch.from_numpy(_quant.rtn(w.numpy(), c.bits, c.block_size, c.scheme).dequantize())

    def call(self, state: ModelState, ctx: PassContext) -> PassResult:
        model = state.torch_model
        groups = list(_groups(model))
        inputs = capture_inputs(model, {name: linears[0] for name, _n, _p, linears in groups}, ctx.calibration_windows(),
                                max_tokens=self.config.max_tokens, desc="awq calibration")
        alphas = np.linspace(0, 1, self.config.grid)
        chosen, gains = [], []
        with torch.no_grad():
            for name, norm, prev, linears in track(groups, desc="awq scale search", unit="group"):
                if any(lin.in_features % self.config.block_size for lin in linears):
                    continue
                x = inputs.pop(name)
                w = torch.cat([lin.weight.float() for lin in linears])  # [sum N, K]
                ref = x @ w.T
                mean_abs = x.abs().mean(0).clamp(min=1e-6)
                best = (None, None, None)
                for alpha in alphas:
                    s = mean_abs ** float(alpha)
                    s = s / (s.max() * s.min()).sqrt()
                    err = ((x / s) @ self._quantized(w * s).T - ref).pow(2).mean().item()
                    if best[0] is None or err < best[0]:
                        best = (err, float(alpha), s)
                err0 = ((x @ self._quantized(w).T - ref).pow(2).mean().item())
                _, alpha, s = best
                if norm is not None:
                    arch.describe(model.config).scale_norm(norm.weight, s.to(norm.weight.dtype))
                else:
                    prev.weight.div_(s.to(prev.weight.dtype)[:, None])
                for lin in linears:
                    lin.weight.mul_(s.to(lin.weight.dtype))
                chosen.append(alpha)
                gains.append(best[0] / err0 if err0 > 0 else 1.0)
        return PassResult(True, {"groups_scaled": len(chosen), "alpha_mean": round(float(np.mean(chosen)), 3),
                                 "output_error_ratio_mean": round(float(np.mean(gains)), 4)},
                          ["output_error_ratio: quantized-group output error with / without the AWQ scales"])
