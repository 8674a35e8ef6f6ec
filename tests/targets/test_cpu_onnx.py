"""cpu-onnx target: one model file, one external-data file, the tokenizer and genai_config.json beside them; loads
back to the same logits (onnxruntime-genai running the same directory: test_genai.py)."""
import json

import numpy as np
import onnx

from optpipe import models
from optpipe.handoff import KVCacheLayout
from optpipe.passes.export import ExportConfig, build_decoder_graph
from optpipe.pipeline import ModelState
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
