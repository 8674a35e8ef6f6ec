"""`smoothquant`: migrate activation outliers into the weights (Xiao et al., 2023) before INT8 quantization.

For each RMSNorm -> Linear group (attention q/k/v; MLP gate/up) it measures the per-channel max |x| of the
norm's output on calibration text and divides the channel by s_j = max|X_j|^alpha / max|W_j|^(1-alpha),
multiplying the following weights' input columns by the same s_j. In fp32 the model computes the same
function; per-tensor activation quantization afterwards loses much less. Works on the PyTorch model, so it
serves every target.
"""
from __future__ import annotations

import numpy as np
import torch
from pydantic import Field

from ..pipeline import ModelState, Pass, PassConfig, PassContext, PassResult, register
from ._torch_calib import capture_inputs


class SmoothQuantConfig(PassConfig):
    alpha: float = Field(0.5, ge=0, le=1, description="0: all difficulty stays on activations; 1: all on weights")


def _groups(model):
    for i, layer in enumerate(model.model.layers):
        a, m = layer.self_attn, layer.mlp
        yield f"model.layers.{i}.input_layernorm", layer.input_layernorm, [a.q_proj, a.k_proj, a.v_proj]
        yield f"model.layers.{i}.post_attention_layernorm", layer.post_attention_layernorm, [m.gate_proj, m.up_proj]


def _channel_absmax(prev: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    m = x.abs().amax(0)
    return m if prev is None else torch.maximum(prev, m)


@register
class SmoothQuant(Pass):
    name = "smoothquant"
    Config = SmoothQuantConfig
    input_stage = "torch"
    output_stage = "torch"
    needs = frozenset({"calibration"})
    provides = frozenset({"smoothed"})

    def call(self, state: ModelState, ctx: PassContext) -> PassResult:
        model = state.torch_model
        groups = list(_groups(model))
        amax = capture_inputs(model, {name: linears[0] for name, _norm, linears in groups}, ctx.calibration_windows(),
                              reduce=_channel_absmax, desc="smoothquant calibration")
        a = self.config.alpha
        scales = []
        with torch.no_grad():
            for name, norm, linears in groups:
                w_max = torch.stack([lin.weight.abs().amax(0) for lin in linears]).amax(0).float()
                s = (amax[name].clamp(min=1e-5) ** a) / (w_max.clamp(min=1e-5) ** (1 - a))
                s = s.clamp(min=1e-5)
                norm.weight.div_(s.to(norm.weight.dtype))
                for lin in linears:
                    lin.weight.mul_(s.to(lin.weight.dtype))
                scales.append(float(s.max()))
        return PassResult(True, {"groups_smoothed": len(groups), "alpha": a,
                                 "max_scale": round(float(np.max(scales)), 3),
                                 "max_activation": round(float(max(v.max() for v in amax.values())), 3)})
