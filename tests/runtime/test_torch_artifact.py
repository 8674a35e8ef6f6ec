"""Reading a cpu-torch artifact: quantized modules restored with no meta tensor left; a damaged one is named."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from optpipe import models
from optpipe.errors import ArtifactError
from optpipe.passes.torch_fuse import TorchFuse
from optpipe.passes.torch_quantize import TorchInt4Config, TorchQuantizeInt4
from optpipe.passes.torch_static_kv_cache import TorchStaticKVCache, TorchStaticKVConfig
from optpipe.pipeline import ModelState, PassConfig, PassContext
from optpipe.recipe import ModelSpec
from optpipe.runtime.torch_artifact import LAYOUT_FILE, RUNTIME_FILE, WEIGHTS_FILE, load_model, load_torch_artifact
from optpipe.runtime.torch_modules import QUANTIZED_MODULES
from optpipe.targets.cpu_torch import CpuTorchTarget


@pytest.fixture
def artifact(tiny_llama, tmp_path):
    model, tokenizer, _ = models.load(ModelSpec(source=str(tiny_llama)))
    state = ModelState("torch", torch_model=model, tokenizer=tokenizer)
    for p in (TorchFuse(PassConfig()), TorchQuantizeInt4(TorchInt4Config(block_size=32, exclude=["lm_head"])),
              TorchStaticKVCache(TorchStaticKVConfig(max_length=64))):
        p.call(state, PassContext())
    prompt = np.arange(4, 24)
    with torch.no_grad():
        want = model(torch.as_tensor(prompt).reshape(1, -1)).logits[0].numpy()
    CpuTorchTarget().save(state, tmp_path / "art")
    return tmp_path / "art", prompt, want


def test_load_restores_fused_quantized_modules_and_the_cache_layout(artifact):
    directory, prompt, want = artifact
    model, runtime = load_model(directory)
    assert runtime["kv_cache"] == {"mode": "static", "max_length": 64} and runtime["tied_embeddings"] is True
    assert sum(isinstance(m, QUANTIZED_MODULES) for m in model.modules()) == 2 * 4  # qkv, o, gate_up, down
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    runner = load_torch_artifact(directory, threads=1)
    np.testing.assert_allclose(runner.logits(prompt), want, atol=1e-4)


@pytest.mark.parametrize("damage,message", [
    ("no-runtime", "runtime.json is missing"),
    ("extra-tensor", "tensors the model does not have: \\['stray'\\]"),
    ("missing-tensor", "tensors missing: \\['model.norm.weight'\\]"),
])
def test_a_damaged_artifact_is_named(artifact, damage, message):
    directory = artifact[0]
    if damage == "no-runtime":
        (directory / RUNTIME_FILE).unlink()
    else:
        tensors = load_file(str(directory / WEIGHTS_FILE))
        if damage == "extra-tensor":
            tensors["stray"] = torch.zeros(1)
        else:
            del tensors["model.norm.weight"]
        save_file(tensors, str(directory / WEIGHTS_FILE))
    with pytest.raises(ArtifactError, match=message):
        load_model(directory)
    assert json.loads((directory / LAYOUT_FILE).read_text())  # the layout itself was left alone
