"""GPTQ in a streaming build: which decoder-layer input feeds each MatMul (refusing names it cannot place)."""
import pytest


def test_streaming_gptq_rejects_unknown_matmul_names():
    from transformers import LlamaConfig

    from optpipe.errors import BuildError
    from optpipe.passes._layerwise_gptq import input_site

    config = LlamaConfig(num_hidden_layers=8)
    assert input_site("model.layers.3.self_attn.qkv_proj", config) == (3, "self_attn.q_proj")
    assert input_site("model.layers.3.self_attn.v_proj", config) == (3, "self_attn.q_proj")
    assert input_site("model.layers.0.mlp.gate_up_proj", config) == (0, "mlp.gate_proj")
    assert input_site("model.layers.7.mlp.down_proj", config) == (7, "mlp.down_proj")
    assert input_site("lm_head", config) == (8, "lm_head")
    for bad in ("model.layers.0.custom_proj", "model.layers.8.mlp.down_proj", "decoder.layers.0.mlp.down_proj"):
        with pytest.raises(BuildError, match="cannot tell which"):
            input_site(bad, config)
