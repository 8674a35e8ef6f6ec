"""Streaming build (model.streaming): weights read tensor by tensor from safetensors, quantized while the
artifact is written, fp32 reference computed layer by layer — same artifact as the in-memory path."""
import json

import numpy as np
import pytest
import torch

import optpipe
from optpipe.checkpoint import LazyCheckpoint
from optpipe.targets.torch_eager import TorchEagerRunner
from optpipe.targets.torch_layerwise import LayerwiseReference

from .conftest import tiny_recipe

CHAIN = [{"name": "export"}, {"name": "fuse"}, {"name": "static-kv-cache", "max_length": 256},
         {"name": "quantize-int4", "block_size": 32, "accuracy_level": 0, "exclude": ["lm_head"]},
         {"name": "quantize-int8", "include": ["lm_head"], "accuracy_level": 0}]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_layerwise_reference_matches_eager(arch, tiny_llama, tiny_qwen2):
    from transformers import AutoModelForCausalLM

    path = tiny_llama if arch == "llama" else tiny_qwen2
    eager = TorchEagerRunner(AutoModelForCausalLM.from_pretrained(path).eval(), 1)
    layerwise = LayerwiseReference(LazyCheckpoint.open(path), 1)
    ids = np.arange(3, 40)
    assert np.abs(layerwise.logits(ids) - eager.logits(ids)).max() < 1e-4
    assert layerwise.generate(ids, 6).tokens == eager.generate(ids, 6).tokens


def test_streaming_build_equals_in_memory_build(tiny_qwen2, tmp_path):
    mem = optpipe.build(tiny_recipe(tiny_qwen2, CHAIN), output=tmp_path / "mem", log=lambda m: None)
    recipe = tiny_recipe(tiny_qwen2, CHAIN)
    recipe["model"] = {"source": str(tiny_qwen2), "streaming": True}
    st = optpipe.build(recipe, output=tmp_path / "st", log=lambda m: None)
    m = st.manifest
    assert m["model"]["streaming"] and m["target"]["streamed"] and "layer by layer" in m["reference"]
    assert m["passes"][0]["changes"]["streaming"] is True
    assert st.metrics["gates.accuracy.ppl_reference"] == pytest.approx(mem.metrics["gates.accuracy.ppl_reference"], rel=1e-5)
    assert st.metrics["gates.accuracy.ppl_candidate"] == pytest.approx(mem.metrics["gates.accuracy.ppl_candidate"], rel=1e-5)
    ids = np.arange(5, 30)
    a = optpipe.load(tmp_path / "mem", threads=1).logits(ids)
    b = optpipe.load(tmp_path / "st", threads=1).logits(ids)
    assert np.abs(a - b).max() < 1e-4
    assert json.loads((tmp_path / "st" / "manifest.json").read_text())["status"] == "passed"


def test_streaming_refuses_whole_model_passes(tiny_llama, tmp_path):
    recipe = tiny_recipe(tiny_llama, [{"name": "smoothquant"}] + CHAIN)
    recipe["model"] = {"source": str(tiny_llama), "streaming": True}
    with pytest.raises(optpipe.RecipeError, match=r"passes\[0\] \(smoothquant\): not available with model.streaming"):
        optpipe.build(recipe, output=tmp_path / "x", log=lambda m: None)
    gptq = tiny_recipe(tiny_llama, CHAIN[:3] + [{"name": "quantize-int4", "algorithm": "gptq"}])
    gptq["model"] = {"source": str(tiny_llama), "streaming": True}
    with pytest.raises(optpipe.BuildError, match="use algorithm: rtn"):
        optpipe.build(gptq, output=tmp_path / "y", log=lambda m: None)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_lazy_checkpoint_reads_bf16_shards(tmp_path):
    from safetensors.torch import save_file

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8, "num_hidden_layers": 1,
                                                      "num_attention_heads": 2, "intermediate_size": 16,
                                                      "vocab_size": 10}))
    t = torch.randn(4, 8).to(torch.bfloat16)
    save_file({"a": t}, str(tmp_path / "model.safetensors"))
    ck = LazyCheckpoint.open(tmp_path)
    assert ck.shapes["a"] == (4, 8) and ck.dtypes["a"] == "BF16"
    assert np.array_equal(ck.get("a"), t.float().numpy())


def test_layerwise_reference_on_bf16_checkpoint_is_the_fp32_model(tiny_llama, tmp_path):
    """Weights stored in bf16 are upcast per matmul: the same function as the fp32 model loaded from them."""
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.bfloat16).save_pretrained(tmp_path / "bf16")
    ck = LazyCheckpoint.open(tmp_path / "bf16")
    assert set(ck.dtypes.values()) == {"BF16"}
    eager = TorchEagerRunner(AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.float32).eval(), 1)
    ids = np.arange(7, 40)
    assert np.abs(LayerwiseReference(ck, 1).logits(ids) - eager.logits(ids)).max() < 1e-4
