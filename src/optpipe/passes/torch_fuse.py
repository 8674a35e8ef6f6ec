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

GROUPS = {"self_attn": ("qkv_proj", ("q_proj", "k_proj", "v_proj")), "mlp": ("gate_up_proj", ("gate_proj", "up_proj"))}


class FusedProjection(torch.nn.Module):
    """Holds the fused Linear (`linear`) and the last input it saw with its output."""

    def __init__(self, linear: torch.nn.Module, sizes: list[int]):
        super().__init__()
        self.linear = linear
        self.sizes = sizes
        self._last: tuple | None = None

    def output(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self._last is None or self._last[0] is not x:
            self._last = (x, torch.split(self.linear(x), self.sizes, dim=-1))
        return self._last[1]


class ProjectionSlice(torch.nn.Module):
    """Stands where q_proj (etc.) stood: slice `index` of the holder's fused output. The holder is not a
    registered submodule here (it is one of the parent), so the weights appear once in the state dict."""

    def __init__(self, holder: FusedProjection, index: int):
        super().__init__()
        object.__setattr__(self, "holder", holder)
        self.index = index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.holder.output(x)[self.index]
        if self.index == len(self.holder.sizes) - 1:
            self.holder._last = None  # the group is complete: drop the reference to its input
        return out


def fusable(model) -> list[tuple[str, str, tuple[str, ...]]]:
    out = []
    for name, mod in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in GROUPS:
            fused, parts = GROUPS[leaf]
            if all(type(getattr(mod, p, None)) is torch.nn.Linear for p in parts):
                out.append((name, fused, parts))
    return out


def fuse_projections(model, groups: list[tuple[str, str, tuple[str, ...]]], device=None) -> None:
    """Apply the rewrite for `groups` (from `fusable`); with device='meta' it only rebuilds the structure (load)."""
    for parent_name, fused_name, parts in groups:
        parent = model.get_submodule(parent_name)
        linears = [getattr(parent, p) for p in parts]
        sizes = [lin.out_features for lin in linears]
        bias = all(lin.bias is not None for lin in linears)
        fused = torch.nn.Linear(linears[0].in_features, sum(sizes), bias=bias, device=device or linears[0].weight.device,
                                dtype=linears[0].weight.dtype)
        if device != "meta":
            with torch.no_grad():
                fused.weight.copy_(torch.cat([lin.weight for lin in linears]))
                if bias:
                    fused.bias.copy_(torch.cat([lin.bias for lin in linears]))
        holder = FusedProjection(fused, sizes)
        setattr(parent, fused_name, holder)
        for i, p in enumerate(parts):
            setattr(parent, p, ProjectionSlice(holder, i))


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
