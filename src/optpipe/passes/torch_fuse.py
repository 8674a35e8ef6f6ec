"""`fuse` (cpu-torch): one matmul for q/k/v and one for gate/up, by module rewrites that keep HF's forward.

transformers' attention calls `q_proj(h)`, `k_proj(h)`, `v_proj(h)` in turn on the same tensor (and the MLP
`gate_proj(x)` then `up_proj(x)`). The rewrite puts one Linear over the concatenated weights in a holder
module (`qkv_proj` / `gate_up_proj`) and turns the original names into views: the first call on a tensor runs
the fused matmul, the others return their slice of that result. Run it before quantization, so the fused
Linear is quantized as one layer: one kernel launch instead of three (two) per layer and token.
"""
from __future__ import annotations

import torch

from ..pipeline import ModelState, Pass, PassConfig, PassContext, PassResult, register
from ..runtime.torch_modules import fuse_projections

GROUPS = {"self_attn": ("qkv_proj", ("q_proj", "k_proj", "v_proj")), "mlp": ("gate_up_proj", ("gate_proj", "up_proj"))}


def fusable(model) -> list[tuple[str, str, tuple[str, ...]]]:
    out = []
    for name, mod in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in GROUPS:
            fused, parts = GROUPS[leaf]
            if all(type(getattr(mod, p, None)) is torch.nn.Linear for p in parts):
                out.append((name, fused, parts))
    return out


@register
class TorchFuse(Pass):
    name = "fuse"
    Config = PassConfig
    input_stage = "torch"
    output_stage = "torch"
    provides = frozenset({"fused-projections"})
    targets = frozenset({"cpu-torch"})

    def call(self, state: ModelState, ctx: PassContext) -> PassResult:
        model = state.torch_model
        groups = fusable(model)
        fuse_projections(model, groups)
        state.info["fused"] = [list(g[:2]) + [list(g[2])] for g in groups]
        counts = {f: sum(1 for g in groups if g[1] == f) for f in ("qkv_proj", "gate_up_proj")}
        return PassResult(bool(groups), {"qkv_fused": counts["qkv_proj"], "gate_up_fused": counts["gate_up_proj"]},
                          ["fused Linear layers are quantized as one by the quantize passes that follow"])
