"""`fuse` (cpu-torch): one matmul for q/k/v and one for gate/up, by module rewrites that keep HF's forward.

transformers' attention calls `q_proj(h)`, `k_proj(h)`, `v_proj(h)` in turn on the same tensor (and the MLP
`gate_proj(x)` then `up_proj(x)`). The rewrite puts one Linear over the concatenated weights in a holder
module (`qkv_proj` / `gate_up_proj`) and turns the original names into views: the first call on a tensor runs
the fused matmul, the others return their slice of that result. Run it before quantization, so the fused
Linear is quantized as one layer: one kernel launch instead of three (two) per layer and token.
"""
from __future__ import annotations

import torch

from .. import arch
from ..pipeline import ModelState, PassConfig, PassContext, PassResult, TorchPass
from ..runtime.torch_modules import fuse_projections


def fusable(model) -> list[tuple[str, str, tuple[str, ...]]]:
    """(parent module, fused leaf name, member leaf names) for every fusable group of the architecture description
    whose members are still plain Linears."""
    desc = arch.describe(model.config)
    out = []
    for i, layer in enumerate(model.get_submodule(desc.layers)):
        for fused, members in desc.fused.items():
            parent = fused.rsplit(".", 1)[0]
            if any(m.rsplit(".", 1)[0] != parent for m in members):
                continue  # members under different modules: the holder trick needs one parent
            if all(type(layer.get_submodule(m)) is torch.nn.Linear for m in members):
                out.append((desc.layer_prefix(i) + parent, fused.rsplit(".", 1)[1],
                            tuple(m.rsplit(".", 1)[1] for m in members)))
    return out


class TorchFuse(TorchPass):
    name = "fuse"
    topology = True
    Config = PassConfig
    provides = frozenset({"fused-projections"})
    targets = frozenset({"cpu-torch"})

    def call(self, state: ModelState, ctx: PassContext) -> PassResult:
        model = state.torch_model
        groups = fusable(model)
        fuse_projections(model, groups)
        state.handoff.fused_projections = groups
        counts = {f: sum(1 for g in groups if g[1] == f) for f in ("qkv_proj", "gate_up_proj")}
        return PassResult(bool(groups), {"qkv_fused": counts["qkv_proj"], "gate_up_fused": counts["gate_up_proj"]},
                          ["fused Linear layers are quantized as one by the quantize passes that follow"])
