"""cpu-onnx target: one model file, one external-data file, the tokenizer and genai_config.json beside them; loads
back to the same logits, in optpipe's runner and in onnxruntime-genai's."""
import importlib.util
import json

import numpy as np
import onnx
import pytest

from optpipe import models
from optpipe.handoff import KVCacheLayout
from optpipe.passes.export import ExportConfig, build_decoder_graph
from optpipe.passes.fuse import Fuse, FuseConfig
from optpipe.passes.static_kv_cache import StaticKVCache, StaticKVConfig
from optpipe.pipeline import ModelState, PassContext
from optpipe.recipe import ModelSpec
from optpipe.runtime.ort_decoder import OnnxDecoder
from optpipe.targets.cpu_onnx import DATA_FILE, MODEL_FILE, TOKENIZER_DIR, CpuOnnxTarget


def test_save_writes_one_data_file_and_says_what_it_holds(tiny_llama, tmp_path):
    model, tokenizer, _ = models.load(ModelSpec(source=str(tiny_llama)))
    graph = build_decoder_graph(model, ExportConfig(max_positions=128))
    prompt = np.arange(3, 30)
    want = OnnxDecoder.from_proto(graph).logits(prompt)
    state = ModelState("onnx", onnx_model=graph, tokenizer=tokenizer)
    state.handoff.quantized = {"a": "int4 rtn block32 float", "b": "int4 rtn block32 float", "lm_head": "int8"}
    state.handoff.kv_cache = KVCacheLayout("static", 128)
    saved = CpuOnnxTarget().save(state, tmp_path / "art")
    assert saved == {"format": "onnx", "model_file": MODEL_FILE, "external_data": DATA_FILE,
                     "genai_config": "genai_config.json", "tokenizer_dir": TOKENIZER_DIR, "runtime": "onnxruntime CPUExecutionProvider",
                     "kv_cache": {"mode": "static", "max_length": 128},
                     "quantized": {"int4 rtn block32 float": 2, "int8": 1}, "streamed": False}
    files = {p.name for p in (tmp_path / "art").iterdir()}
    assert {MODEL_FILE, DATA_FILE, "genai_config.json", "tokenizer.json", "tokenizer_config.json"} <= files
    assert not any(p.suffix in (".onnx", ".data") for p in (tmp_path / "art").iterdir()
                   if p.name not in (MODEL_FILE, DATA_FILE))
    decoder = json.loads((tmp_path / "art" / "genai_config.json").read_text())["model"]["decoder"]
    assert (decoder["num_hidden_layers"], decoder["num_attention_heads"], decoder["num_key_value_heads"],
            decoder["head_size"]) == (2, 4, 2, 16)
    on_disk = onnx.load(str(tmp_path / "art" / MODEL_FILE), load_external_data=False)
    external = {e.value for t in on_disk.graph.initializer for e in t.external_data if e.key == "location"}
    assert external == {DATA_FILE}
    got = CpuOnnxTarget().load(tmp_path / "art", threads=1).logits(prompt)
    np.testing.assert_allclose(got, want, atol=1e-5)


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
