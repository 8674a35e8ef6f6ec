"""A deliberately destructive plugin pass (for gate-rejection tests): scrambles MatMulNBits scales."""
import numpy as np
from onnx import numpy_helper

from optpipe.pipeline import Pass, PassConfig, PassResult


class CorruptConfig(PassConfig):
    factor: float = 25.0


class CorruptScales(Pass):
    """Every block's scale times ±factor; a float zero point's minimum of the same block (stored [nb, N] beside
    scales [N*nb]) takes the same factor, so each block's weights are scaled as a whole (w = d*q + m -> f*w) rather
    than shifted towards one sign, which on a random model can land near the uniform output and pass a ppl gate."""
    name = "corrupt-scales"
    Config = CorruptConfig
    requires = frozenset({"quantized"})

    def call(self, state, ctx):
        rng = np.random.default_rng(0)
        inits = {t.name: i for i, t in enumerate(state.onnx_model.graph.initializer)}
        hit = 0
        for name, i in list(inits.items()):
            if not name.endswith((".scales", ".weight_scale")):
                continue
            t = state.onnx_model.graph.initializer[i]
            a = numpy_helper.to_array(t)
            f = rng.choice([-self.config.factor, self.config.factor], size=a.shape).astype(a.dtype)
            state.onnx_model.graph.initializer[i].CopyFrom(numpy_helper.from_array(a * f, name))
            minimum = name[:-len("scales")] + "minimum"
            if minimum in inits:
                j = inits[minimum]
                m = numpy_helper.to_array(state.onnx_model.graph.initializer[j])  # [nb, N]
                m = m * f.reshape(m.shape[1], m.shape[0]).T
                state.onnx_model.graph.initializer[j].CopyFrom(numpy_helper.from_array(m, minimum))
            hit += 1
        return PassResult(hit > 0, {"scales_corrupted": hit})
