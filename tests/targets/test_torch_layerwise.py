"""`targets.torch_layerwise`: the layer-by-layer fp32 reference (streaming builds) computes the model's own
function, from fp32 and bf16 shards."""
import numpy as np
import pytest
import torch

from optpipe.checkpoint import LazyCheckpoint, ModelWeights
from optpipe.targets.torch_eager import TorchEagerRunner
from optpipe.targets.torch_layerwise import LayerwiseReference


@pytest.mark.parametrize("source", ["checkpoint", "memory"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_layerwise_reference_matches_eager(arch, source, tiny_llama, tiny_qwen2):
    """From the safetensors files (streaming builds) or from the model in memory (sequential GPTQ in memory): the
    walk computes the model's function and leaves the model's own config alone."""
    from transformers import AutoModelForCausalLM

    path = tiny_llama if arch == "llama" else tiny_qwen2
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    attn = model.config._attn_implementation
    eager = TorchEagerRunner(model, 1)
    layerwise = LayerwiseReference(LazyCheckpoint.open(path) if source == "checkpoint" else ModelWeights(model), 1)
    assert model.config._attn_implementation == attn
    ids = np.arange(3, 40)
    assert np.abs(layerwise.logits(ids) - eager.logits(ids)).max() < 1e-4
    assert layerwise.generate(ids, 6).tokens == eager.generate(ids, 6).tokens


def test_layerwise_reference_on_bf16_checkpoint_is_the_fp32_model(tiny_llama, tmp_path):
    """Weights stored in bf16 are upcast per matmul: the same function as the fp32 model loaded from them."""
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.bfloat16).save_pretrained(tmp_path / "bf16")
    ck = LazyCheckpoint.open(tmp_path / "bf16")
    assert set(ck.dtypes.values()) == {"BF16"}
    eager = TorchEagerRunner(AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.float32).eval(), 1)
    ids = np.arange(7, 40)
    assert np.abs(LayerwiseReference(ck, 1).logits(ids) - eager.logits(ids)).max() < 1e-4
