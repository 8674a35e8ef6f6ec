"""A static KV cache decodes exactly what the dynamic one does."""
import numpy as np
import pytest

from optpipe import models
from optpipe.passes.export import ExportConfig, build_decoder_graph
from optpipe.passes.fuse import Fuse, FuseConfig
from optpipe.passes.static_kv_cache import StaticKVCache, StaticKVConfig
from optpipe.pipeline import ModelState, PassContext
from optpipe.recipe import ModelSpec
from optpipe.runtime.ort_decoder import OnnxDecoder


def load(path):
    model, tok, _ = models.load(ModelSpec(source=str(path)))
    return model


def test_static_cache_decodes_like_dynamic(tiny_llama):
    model = load(tiny_llama)
    state = ModelState("onnx", onnx_model=build_decoder_graph(model, ExportConfig(max_positions=256)))
    Fuse(FuseConfig()).call(state, PassContext())
    dynamic = OnnxDecoder.from_proto(state.onnx_model)
    prompt = np.arange(10, 30)
    want = dynamic.generate(prompt, 12).tokens
    StaticKVCache(StaticKVConfig(max_length=64)).call(state, PassContext())
    static = OnnxDecoder.from_proto(state.onnx_model)
    assert static.layout.static and static.layout.max_length == 64
    assert static.generate(prompt, 12).tokens == want
    with pytest.raises(ValueError, match="exceeds the static cache"):
        static.generate(np.arange(60), 10)
