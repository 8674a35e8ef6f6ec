"""A deliberately broken cpu-torch pass (test plugin): scrambles the INT4 scales of every quantized layer."""
import torch

from optpipe.pipeline import Pass, PassResult
from optpipe.runtime.torch_modules import Int4WeightOnlyLinear


class CorruptTorchScales(Pass):
    name = "corrupt-torch-scales"
    input_stage = "torch"
    output_stage = "torch"

    def call(self, state, ctx):
        g = torch.Generator().manual_seed(0)
        n = 0
        for mod in state.torch_model.modules():
            if isinstance(mod, Int4WeightOnlyLinear):
                noise = (torch.rand(mod.scales.shape, generator=g) - 0.5) * 16  # flips signs, scales up to 8x
                mod.scales.mul_(noise.to(mod.scales.dtype))
                mod.prepare()
                n += 1
        return PassResult(n > 0, {"layers_corrupted": n})
