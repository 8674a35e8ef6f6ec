"""The family-route export: a graph that disagrees with PyTorch fails the build."""
import pytest

from optpipe import models
from optpipe.errors import BuildError
from optpipe.passes.export import ExportConfig, build_decoder_graph, check_against_torch
from optpipe.recipe import ModelSpec


def load(path):
    model, tok, _ = models.load(ModelSpec(source=str(path)))
    return model


def test_export_check_fails_the_build_on_a_wrong_graph(tiny_llama):
    model = load(tiny_llama)
    onnx_model = build_decoder_graph(model, ExportConfig(max_positions=256))
    for t in onnx_model.graph.initializer:
        if t.name == "model.layers.0.mlp.down_proj.weight_t":
            from onnx import numpy_helper
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * 3, t.name))
    with pytest.raises(BuildError, match="disagrees with PyTorch"):
        check_against_torch(model, onnx_model, atol=1e-3)


def test_a_model_over_the_protobuf_limit_is_told_to_stream(tiny_llama, monkeypatch):
    """A 1B fp32 model (4.4 GB) held in memory cannot be one ONNX message: the build says to set model.streaming
    before exporting (it used to end in protobuf's 'EncodeError: Failed to serialize proto')."""
    from optpipe.passes import export
    from optpipe.pipeline import ModelState, PassContext

    model, _, _ = models.load(ModelSpec(source=str(tiny_llama)))
    monkeypatch.setattr(export, "PROTO_LIMIT", 1000)
    with pytest.raises(BuildError, match=r"export: the model's weights are .* GB in fp32, over the 2 GiB .*streaming: true"):
        export.Export(ExportConfig()).call(ModelState("torch", torch_model=model), PassContext())
