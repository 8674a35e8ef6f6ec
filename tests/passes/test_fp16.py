"""fp16: every float weight, constant, cast and I/O in float16; RMSNorm and attention kept float32 inside casts."""
import numpy as np
import onnx
from onnx import TensorProto

from optpipe import models
from optpipe.passes.export import ExportConfig, build_decoder_graph
from optpipe.passes.fp16 import NON_FLOAT_INPUTS, Fp16
from optpipe.pipeline import ModelState, PassConfig, PassContext
from optpipe.recipe import ModelSpec
from optpipe.runtime.ort_decoder import OnnxDecoder


def test_fp16_halves_the_graph_and_keeps_norms_and_attention_in_float32(tiny_llama):
    model = models.load(ModelSpec(source=str(tiny_llama)))[0]
    graph = build_decoder_graph(model, ExportConfig(max_positions=128))
    prompt = np.arange(5, 37)
    want = OnnxDecoder.from_proto(graph, optimize=False).logits(prompt)
    floats = sum(t.data_type == TensorProto.FLOAT for t in graph.graph.initializer)
    state = ModelState("onnx", onnx_model=graph)
    res = Fp16(PassConfig()).call(state, PassContext())
    g = state.onnx_model.graph
    assert res.modified and res.changes["initializers_fp16"] == floats > 0
    assert not any(t.data_type == TensorProto.FLOAT for t in g.initializer)
    assert {v.type.tensor_type.elem_type for v in g.output} == {TensorProto.FLOAT16}
    assert next(v for v in g.input if v.name == "input_ids").type.tensor_type.elem_type == TensorProto.INT64
    # each export function (RMSNorm, attention) casts its float inputs up and its outputs down
    functions = state.onnx_model.functions
    assert functions and res.changes["functions_kept_fp32"] == len(functions)
    assert sorted(state.handoff.float32_islands) == sorted(f.name for f in functions)
    for fn in functions:
        floats_in = [x for x in fn.input if x not in NON_FLOAT_INPUTS]
        head, tail = fn.node[:len(floats_in)], fn.node[-len(fn.output):]
        assert all(n.op_type == "Cast" and n.attribute[0].i == TensorProto.FLOAT for n in head), fn.name
        assert all(n.op_type == "Cast" and n.attribute[0].i == TensorProto.FLOAT16 for n in tail), fn.name
    assert {p.key: p.value for p in state.onnx_model.metadata_props}["optpipe.float_type"] == "float16"
    onnx.checker.check_model(state.onnx_model)
    got = OnnxDecoder.from_proto(state.onnx_model, optimize=False).logits(prompt).astype(np.float32)
    # float16 weights and residual stream: within a few float16 ulps of logits of this size, same argmax nearly always
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()
    assert (got.argmax(-1) == want.argmax(-1)).mean() > 0.9
