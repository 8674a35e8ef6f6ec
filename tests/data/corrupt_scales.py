"""A deliberately destructive plugin pass (for gate-rejection tests): scrambles MatMulNBits scales."""
import numpy as np
from onnx import numpy_helper

from optpipe.pipeline import Pass, PassConfig, PassResult


class CorruptConfig(PassConfig):
    factor: float = 25.0


class CorruptScales(Pass):
    """Every scale times ±factor: per output row for a MatMulNBits weight (all its blocks, including a float zero
    point's remainder digits, so each row's weights are scaled as a whole, w -> ±f*w, not shifted towards one
    sign, which on a random model can land near the uniform output and pass a ppl gate); per entry elsewhere."""
    name = "corrupt-scales"
    Config = CorruptConfig
    requires = frozenset({"quantized"})

    def call(self, state, ctx):
        rng = np.random.default_rng(0)
        graph = state.onnx_model.graph
        rows = {n.name + ".scales": next(a.i for a in n.attribute if a.name == "N")
                for n in graph.node if n.op_type == "MatMulNBits"}
        hit = 0
        for i, t in enumerate(graph.initializer):
            if not t.name.endswith((".scales", ".weight_scale")):
                continue
            a = numpy_helper.to_array(t)
            n = rows.get(t.name, a.size)
            f = rng.choice([-self.config.factor, self.config.factor], size=(n, 1)).astype(a.dtype)
            graph.initializer[i].CopyFrom(numpy_helper.from_array((a.reshape(n, -1) * f).reshape(a.shape), t.name))
            hit += 1
        return PassResult(hit > 0, {"scales_corrupted": hit})
