"""targets/genai: genai_config.json states what onnxruntime-genai needs to run a cpu-onnx artifact as it is; the
saved directory then runs in its C++ decode loop, giving optpipe's greedy tokens."""
import importlib.util
import json

import numpy as np
import pytest

from optpipe import models
from optpipe.passes.export import ExportConfig, build_decoder_graph
from optpipe.passes.fuse import Fuse, FuseConfig
from optpipe.passes.static_kv_cache import StaticKVCache, StaticKVConfig
from optpipe.pipeline import ModelState, PassContext
from optpipe.recipe import ModelSpec
from optpipe.targets.cpu_onnx import CpuOnnxTarget
from optpipe.targets.genai import genai_config

META = {"optpipe.num_heads": "8", "optpipe.kv_num_heads": "2", "optpipe.max_length": "256", "optpipe.head_dim": "32",
        "optpipe.vocab_size": "1000", "optpipe.num_layers": "3", "optpipe.model_type": "qwen2"}


def test_the_config_states_shapes_names_and_the_cache_layout():
    from types import SimpleNamespace

    static = genai_config({**META, "optpipe.kv_cache": "static"}, "model.onnx",
                          SimpleNamespace(eos_token_id=7, bos_token_id=5, pad_token_id=None))
    d = static["model"]["decoder"]
    assert (d["num_attention_heads"], d["num_key_value_heads"], d["head_size"], d["hidden_size"],
            d["num_hidden_layers"]) == (8, 2, 32, 256, 3)
    assert d["inputs"]["past_key_names"] == "past_key_values.%d.key" and d["outputs"]["logits"] == "logits"
    assert static["model"]["type"] == "qwen2" and static["model"]["context_length"] == 256
    assert (static["model"]["eos_token_id"], static["model"]["bos_token_id"], static["model"]["pad_token_id"]) == \
        (7, 5, 7)  # no pad token: genai pads with eos
    assert static["search"]["past_present_share_buffer"] is True and static["search"]["max_length"] == 256
    dynamic = genai_config(META, "model.onnx")  # no tokenizer: genai's usual ids
    assert dynamic["search"]["past_present_share_buffer"] is False
    assert (dynamic["model"]["bos_token_id"], dynamic["model"]["eos_token_id"], dynamic["model"]["pad_token_id"]) == \
        (1, 2, 2)


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime_genai") is None, reason="onnxruntime-genai not installed")
@pytest.mark.parametrize("static,quantized", [(True, False), (False, False), (True, True)])
def test_the_artifact_runs_in_onnxruntime_genai_unchanged(tiny_llama, tmp_path, static, quantized):
    """onnxruntime-genai's C++ loop on the saved directory: the same greedy tokens as optpipe's runner (also with
    INT4 MatMulNBits and the embedding in GatherBlockQuantized reading the head's blocks)."""
    import onnxruntime_genai as og

    from optpipe.passes.quantize_embedding import EmbeddingConfig, QuantizeEmbedding
    from optpipe.passes.quantize_int4 import Int4Config, QuantizeInt4

    model, tokenizer, _ = models.load(ModelSpec(source=str(tiny_llama)))
    state = ModelState("onnx", onnx_model=build_decoder_graph(model, ExportConfig(max_positions=128)), tokenizer=tokenizer)
    Fuse(FuseConfig()).call(state, PassContext())
    if static:
        StaticKVCache(StaticKVConfig(max_length=96)).call(state, PassContext())
    if quantized:
        QuantizeInt4(Int4Config(exclude=[])).call(state, PassContext())
        QuantizeEmbedding(EmbeddingConfig()).call(state, PassContext())
        assert "GatherBlockQuantized" in {n.op_type for n in state.onnx_model.graph.node}
    CpuOnnxTarget().save(state, tmp_path / "art")
    prompt = np.arange(20, 44)
    want = CpuOnnxTarget().load(tmp_path / "art", threads=1).generate(prompt, 24).tokens
    genai = og.Model(str(tmp_path / "art"))
    params = og.GeneratorParams(genai)
    params.set_search_options(max_length=prompt.size + 24, do_sample=False)
    generator = og.Generator(genai, params)
    generator.append_tokens(prompt.reshape(1, -1).astype(np.int32))
    got = []
    while not generator.is_done() and len(got) < 24:
        generator.generate_next_token()
        got.append(int(generator.get_next_tokens()[0]))
    assert got == list(want)[:len(got)] and len(got) >= 16
    assert json.loads((tmp_path / "art" / "genai_config.json").read_text())["search"]["past_present_share_buffer"] \
        is static
