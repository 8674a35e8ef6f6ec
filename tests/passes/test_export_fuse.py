import copy

import numpy as np
import pytest

from optpipe import models
from optpipe.errors import BuildError
from optpipe.passes.export import ExportConfig, build_decoder_graph, check_against_torch
from optpipe.passes.fuse import Fuse, FuseConfig
from optpipe.passes.quantize_int4 import Int4Config, QuantizeInt4
from optpipe.passes.static_kv_cache import StaticKVCache, StaticKVConfig
from optpipe.pipeline import ModelState, PassContext
from optpipe.recipe import ModelSpec
from optpipe.runtime.ort_decoder import OnnxDecoder


def load(path):
    model, tok, _ = models.load(ModelSpec(source=str(path)))
    return model


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen2"])
def test_export_matches_torch_and_fuse_preserves_logits(fixture, request):
    model = load(request.getfixturevalue(fixture))
    onnx_model = build_decoder_graph(model, ExportConfig(max_positions=256))
    check = check_against_torch(model, onnx_model, atol=1e-3)
    assert check["max_abs_logit_diff"] < 1e-3
    ids = np.random.default_rng(0).integers(0, 256, 40)
    ref = OnnxDecoder.from_proto(onnx_model).logits(ids)
    state = ModelState("onnx", onnx_model=copy.deepcopy(onnx_model))
    res = Fuse(FuseConfig()).call(state, PassContext())
    assert res.changes["attention_gqa"] == 2 and res.changes["qkv_packed"] == 2 and res.changes["gate_up"] == 2
    assert res.changes["skip_rmsnorm"] == 4 and res.changes["rmsnorm"] == 1
    ops = {n.op_type for n in state.onnx_model.graph.node}
    assert "GroupQueryAttention" in ops and not state.onnx_model.functions
    fused = OnnxDecoder.from_proto(state.onnx_model).logits(ids)
    assert np.abs(fused - ref).max() < 1e-3


def test_export_check_fails_the_build_on_a_wrong_graph(tiny_llama):
    model = load(tiny_llama)
    onnx_model = build_decoder_graph(model, ExportConfig(max_positions=256))
    for t in onnx_model.graph.initializer:
        if t.name == "model.layers.0.mlp.down_proj.weight_t":
            from onnx import numpy_helper
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * 3, t.name))
    with pytest.raises(BuildError, match="disagrees with PyTorch"):
        check_against_torch(model, onnx_model, atol=1e-3)


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


def test_int4_float_zero_point_is_exact_on_grid_weights(tiny_llama):
    """Weights put on a block-32 4-bit grid with float scale and minimum (GGUF Q4_1's) survive `quantize-int4`
    exactly (accuracy_level 0: fp32 compute), so the artifact's logits equal the float graph's."""
    import torch

    from optpipe.passes import _quant

    model = load(tiny_llama)
    with torch.no_grad():
        for name, lin in model.named_modules():
            if isinstance(lin, torch.nn.Linear) and name.startswith("model.layers."):
                w = lin.weight.numpy()
                lin.weight.copy_(torch.from_numpy(_quant.rtn(w, 4, 32, "float").dequantize()))
    state = ModelState("onnx", onnx_model=build_decoder_graph(model, ExportConfig(max_positions=256)))
    Fuse(FuseConfig()).call(state, PassContext())
    prompt = np.arange(10, 30)
    want = OnnxDecoder.from_proto(state.onnx_model).logits(prompt)
    res = QuantizeInt4(Int4Config(accuracy_level=0, exclude=["lm_head"])).call(state, PassContext())
    assert res.changes["layers_quantized"] == 8 and "lm_head" in res.changes["skipped"]
    assert res.changes["weight_rel_error_max"] < 1e-5
    assert any(n.op_type == "MatMulNBits" for n in state.onnx_model.graph.node)
    got = OnnxDecoder.from_proto(state.onnx_model).logits(prompt)
    assert np.abs(got - want).max() < 1e-4


def test_gptq_needs_and_uses_calibration(tiny_llama):
    model = load(tiny_llama)
    state = ModelState("onnx", onnx_model=build_decoder_graph(model, ExportConfig(max_positions=256)))
    Fuse(FuseConfig()).call(state, PassContext())
    with pytest.raises(BuildError, match="calibration"):
        QuantizeInt4(Int4Config(algorithm="gptq")).call(copy.deepcopy(state), PassContext())
    windows = [np.random.default_rng(i).integers(0, 256, 64) for i in range(3)]
    res = QuantizeInt4(Int4Config(algorithm="gptq", zero_point="int")).call(state, PassContext(calibration=lambda: windows))
    assert res.changes["layers_quantized"] == 8
