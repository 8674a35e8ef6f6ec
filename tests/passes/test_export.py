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
