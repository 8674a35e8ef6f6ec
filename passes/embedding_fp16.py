"""Out-of-tree pass example: store the token-embedding table in fp16 (a Gather reads one row a token, so the
cast back to fp32 costs nothing; the table is the largest float tensor left after weight quantization).

Use it from a recipe by path (relative to the recipe file):

    passes:
      - name: embedding-fp16
        path: ../passes/embedding_fp16.py
"""
from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from optpipe.pipeline import Pass, PassConfig, PassResult


class EmbeddingFp16Config(PassConfig):
    initializer: str = "model.embed_tokens.weight"


class EmbeddingFp16(Pass):
    name = "embedding-fp16"
    Config = EmbeddingFp16Config
    requires = frozenset({"onnx"})

    def call(self, state, ctx):
        model = state.onnx_model
        graph = model.graph
        idx = next((i for i, t in enumerate(graph.initializer) if t.name == self.config.initializer), None)
        if idx is None:
            return PassResult(False, {}, [f"no initializer {self.config.initializer!r}"])
        table = numpy_helper.to_array(graph.initializer[idx])
        if table.dtype != np.float32:
            return PassResult(False, {}, [f"{self.config.initializer} is {table.dtype}, not float32"])
        half = table.astype(np.float16)
        graph.initializer[idx].CopyFrom(numpy_helper.from_array(half, self.config.initializer))
        nodes, gathers = [], 0
        for n in graph.node:  # each Cast right after its Gather keeps the node list topologically sorted
            nodes.append(n)
            if n.op_type == "Gather" and n.input[0] == self.config.initializer:
                out = n.output[0]
                n.output[0] = out + "/fp16"
                nodes.append(helper.make_node("Cast", [out + "/fp16"], [out], name=n.name + "/to_fp32",
                                              to=TensorProto.FLOAT))
                gathers += 1
        del graph.node[:]
        graph.node.extend(nodes)
        return PassResult(True, {"gathers_rewritten": gathers, "bytes_saved": int(table.nbytes - half.nbytes),
                                 "max_abs_rounding": float(np.abs(half.astype(np.float32) - table).max())})
