"""A deliberately destructive plugin pass (for gate-rejection tests): scrambles MatMulNBits scales."""
import numpy as np
from onnx import numpy_helper

from optpipe.pipeline import Pass, PassConfig, PassResult


class CorruptConfig(PassConfig):
    factor: float = 25.0


class CorruptScales(Pass):
    name = "corrupt-scales"
    Config = CorruptConfig
    requires = frozenset({"quantized"})

    def call(self, state, ctx):
        rng = np.random.default_rng(0)
        hit = 0
        for i, t in enumerate(state.onnx_model.graph.initializer):
            if t.name.endswith((".scales", ".weight_scale")):
                a = numpy_helper.to_array(t)
                a = a * rng.choice([-self.config.factor, self.config.factor], size=a.shape).astype(a.dtype)
                state.onnx_model.graph.initializer[i].CopyFrom(numpy_helper.from_array(a, t.name))
                hit += 1
        return PassResult(hit > 0, {"scales_corrupted": hit})
