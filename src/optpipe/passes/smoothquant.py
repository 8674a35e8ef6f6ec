"""`smoothquant`: migrate activation outliers into the weights (Xiao et al., 2023) before INT8 quantization.

For each RMSNorm -> Linear group of the architecture description (attention q/k/v; MLP gate/up) it measures the per-channel max |x| of the
norm's output on calibration text and divides the channel by s_j = max|X_j|^alpha / max|W_j|^(1-alpha),
multiplying the following weights' input columns by the same s_j. In fp32 the model computes the same
function; per-tensor activation quantization afterwards loses much less. Works on the PyTorch model, so it
serves every target.
"""
from __future__ import annotations

import numpy as np
import torch
from pydantic import Field

from .. import arch
from ..layerwise import channel_absmax, walk
from ..pipeline import ModelState, PassConfig, PassContext, PassResult
from ._torch_calib import CalibratedRescaling, capture_inputs


def norm_groups(config) -> list[tuple[str, tuple[str, ...]]]:
    """Per decoder layer: each norm and the linears that read its output (from the architecture description)."""
    return [(g.source, g.members) for g in arch.describe(config).groups(config) if g.source_kind == "norm"]


class SmoothQuantConfig(PassConfig):
    alpha: float = Field(0.5, ge=0, le=1, description="0: all difficulty stays on activations; 1: all on weights")


def smoothing_scale(amax: torch.Tensor, weights, alpha: float) -> torch.Tensor:
    """s_j = max|X_j|^alpha / max|W_j|^(1-alpha) over the group's weights [N, K] (column j = input channel j)."""
    w_max = torch.stack([w.detach().float().abs().amax(0) for w in weights]).amax(0)
    return ((amax.clamp(min=1e-5) ** alpha) / (w_max.clamp(min=1e-5) ** (1 - alpha))).clamp(min=1e-5)


class SmoothQuant(CalibratedRescaling):
    name = "smoothquant"
    streams = True
    Config = SmoothQuantConfig
    provides = frozenset({"smoothed"})

    def call(self, state: ModelState, ctx: PassContext) -> PassResult:
        if state.torch_model is None and state.checkpoint is not None:
            return self._streaming(state, ctx)
        model = state.torch_model
        groups, desc = norm_groups(model.config), arch.describe(model.config)
        layers = model.get_submodule(desc.layers)
        observed = {f"{i}.{norm}": layer.get_submodule(linears[0])
                    for i, layer in enumerate(layers) for norm, linears in groups}
        amax = capture_inputs(model, observed, ctx.calibration_windows(), reduce=channel_absmax,
                              desc="smoothquant calibration")
        a = self.config.alpha
        scales = []
        with torch.no_grad():
            for i, layer in enumerate(layers):
                for norm, linears in groups:
                    lins = [layer.get_submodule(n) for n in linears]
                    s = smoothing_scale(amax[f"{i}.{norm}"], [lin.weight for lin in lins], a)
                    norm_w = layer.get_submodule(norm).weight
                    desc.scale_norm(norm_w, s.to(norm_w.dtype))
                    for lin in lins:
                        lin.weight.mul_(s.to(lin.weight.dtype))
                    scales.append(float(s.max()))
        return self._result(scales, amax.values())

    def _streaming(self, state: ModelState, ctx: PassContext) -> PassResult:
        """Model larger than memory: the same statistics, measured one decoder layer at a time; the scales become
        a view of the checkpoint (weights are rescaled as later passes read them), never a model in memory."""
        a = self.config.alpha
        fns, scales, amaxes = {}, [], []
        config = state.checkpoint.config
        groups, desc = norm_groups(config), arch.describe(config)
        for step in walk(state.checkpoint, ctx.calibration_windows(), desc="smoothquant calibration (layer by layer)"):
            layer, prefix = step.module, desc.layer_prefix(step.index)
            amax = step.observe({norm: layer.get_submodule(linears[0]) for norm, linears in groups}, channel_absmax)
            for norm, linears in groups:
                s = smoothing_scale(amax[norm], [layer.get_submodule(n).weight for n in linears], a)
                fns[prefix + norm + ".weight"] = lambda t, s=s: (t + desc.norm_offset) / s - desc.norm_offset
                fns.update({prefix + n + ".weight": (lambda t, s=s: t * s) for n in linears})
                scales.append(float(s.max()))
            amaxes += amax.values()
        state.checkpoint = state.checkpoint.transformed(fns)
        return self._result(scales, amaxes, ["streaming: statistics measured layer by layer; the scales are "
                                             "applied to the weights as the artifact is written"])

    def _result(self, scales, amaxes, notes=()) -> PassResult:
        return PassResult(True, {"groups_smoothed": len(scales), "alpha": self.config.alpha,
                                 "max_scale": round(float(np.max(scales)), 3),
                                 "max_activation": round(float(max(float(v.max()) for v in amaxes)), 3)}, list(notes))
