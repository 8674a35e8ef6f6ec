"""`awq`: activation-aware weight scaling (Lin et al., 2024) before weight-only INT4 quantization.

Per group of linears that share an input, as the architecture description lists them (Llama: attention q/k/v after
input_layernorm; MLP gate/up after post_attention_layernorm; down_proj after up_proj; o_proj after v_proj when there
is no grouped-query sharing),
channels with large mean |activation| are scaled up in the weights and down in the preceding op:
s = mean|X|^alpha, with alpha searched on a grid to minimise the group's output error after quantizing the scaled
weights with the same quantizer the later pass uses. In float the model computes the same function.
"""
from __future__ import annotations

import itertools
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from .. import arch
from .. import quant as _quant
from ..pipeline import ModelState, PassConfig, PassContext, PassResult
from ..progress import track
from ._torch_calib import CalibratedRescaling, capture_inputs


class AwqConfig(PassConfig):
    bits: Literal[4] = 4
    block_size: Literal[32, 64, 128] = 64
    scheme: Literal["symmetric-positive", "symmetric", "int", "float"] = Field(
        "symmetric-positive", description="the zero-point scheme of the quantizer that follows (must match)")
    grid: int = Field(11, ge=2, le=41, description="alpha values tried in [0, 1]")
    max_tokens: int = Field(512, ge=32, description="calibration tokens used for the error measure")
    weight_grid: int = Field(1, ge=1, le=11, description="exponents beta tried in [0, 1] for s = mean|X|^alpha / "
                             "max|W|^beta (1: beta = 0, the paper's search)")
    lm_head: bool = Field(True, description="also scale lm_head against the final norm (skipped when the head is "
                                            "tied to the input embedding)")


def _groups(model, desc, head: bool):
    """(name, group, source module, member modules, source_index) per group of the architecture description."""
    for i, layer in enumerate(model.get_submodule(desc.layers)):
        for g in desc.groups(model.config):
            yield (desc.layer_prefix(i) + g.name, g, layer.get_submodule(g.source),
                   [layer.get_submodule(m) for m in g.members], desc.source_index(g, model.config))
    g = desc.head_group(model.config) if head else None
    if g is not None:
        yield g.name, g, model.get_submodule(g.source), [model.get_submodule(m) for m in g.members], None


class Awq(CalibratedRescaling):
    name = "awq"
    Config = AwqConfig
    provides = frozenset({"awq"})

    def _quantized(self, w: torch.Tensor) -> torch.Tensor:
        c = self.config
        return torch.from_numpy(_quant.rtn(w.numpy(), c.bits, c.block_size, c.scheme).dequantize())

    def call(self, state: ModelState, ctx: PassContext) -> PassResult:
        model = state.torch_model
        desc = arch.describe(model.config)
        groups = list(_groups(model, desc, self.config.lm_head))
        inputs = capture_inputs(model, {name: members[0] for name, _g, _s, members, _i in groups},
                                ctx.calibration_windows(), max_tokens=self.config.max_tokens, desc="awq calibration")
        alphas = np.linspace(0, 1, self.config.grid)
        betas = np.linspace(0, 1, self.config.weight_grid) if self.config.weight_grid > 1 else [0.0]
        chosen, gains, skipped = {}, [], {}
        with torch.no_grad():
            for name, group, source, members, index in track(groups, desc="awq scale search", unit="group"):
                if any(lin.in_features % self.config.block_size for lin in members):
                    skipped[name] = f"input width is not a multiple of block_size {self.config.block_size}"
                    continue
                x = inputs.pop(name)
                w = torch.cat([lin.weight.float() for lin in members])  # [sum N, K]
                ref = x @ w.T
                mean_abs = x.abs().mean(0).clamp(min=1e-6)
                w_max = w.abs().amax(0).clamp(min=1e-6)
                if index is not None:  # one scale per source row: average the columns that read it
                    count = torch.bincount(index).float()
                    mean_abs, w_max = (torch.zeros(count.numel()).index_add_(0, index, v) / count
                                       for v in (mean_abs, w_max))
                best = (None, None, None, None)  # error, (alpha, beta), scale per source channel, per member column
                for alpha, beta in itertools.product(alphas, betas):
                    s = mean_abs ** float(alpha) / w_max ** float(beta)
                    s = s / (s.max() * s.min()).sqrt()
                    cols = s if index is None else s[index]
                    err = ((x / cols) @ self._quantized(w * cols).T - ref).pow(2).mean().item()
                    if best[0] is None or err < best[0]:
                        best = (err, (float(alpha), float(beta)), s, cols)
                err0 = ((x @ self._quantized(w).T - ref).pow(2).mean().item())
                _, exponents, s, cols = best
                if group.source_kind == "norm":
                    desc.scale_norm(source.weight, s.to(source.weight.dtype))
                else:
                    source.weight.div_(s.to(source.weight.dtype)[:, None])
                    if source.bias is not None:
                        source.bias.div_(s.to(source.bias.dtype))
                for lin in members:
                    lin.weight.mul_(cols.to(lin.weight.dtype))
                chosen[name] = exponents
                gains.append(best[0] / err0 if err0 > 0 else 1.0)
        if self.config.lm_head and desc.head_group(model.config) is None:
            skipped["lm_head"] = "tied to the input embedding (a scale in its columns would scale the embedding)"
        alpha_mean = round(float(np.mean([a for a, _b in chosen.values()])), 3) if chosen else None
        beta_mean = round(float(np.mean([b for _a, b in chosen.values()])), 3) if chosen else None
        return PassResult(bool(chosen), {"groups_scaled": len(chosen), "alpha_mean": alpha_mean, "beta_mean": beta_mean,
                                         "output_error_ratio_mean": round(float(np.mean(gains)), 4) if gains else None,
                                         "skipped": skipped},
                          ["output_error_ratio: quantized-group output error with / without the AWQ scales"])
