"""cpu-torch fuse: packed q/k/v and gate/up compute the same function and survive save and reload."""
import numpy as np

import optpipe

from ..conftest import TORCH_INT4, torch_recipe


def test_fuse_packs_projections_same_function_and_reloads(tiny_qwen2, tmp_path):
    from transformers import AutoModelForCausalLM

    from optpipe.passes.torch_fuse import fusable, fuse_projections
    from optpipe.runtime.torch_modules import TorchRunner

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2).eval()
    ids = np.arange(3, 30)
    before = TorchRunner(model, 1).logits(ids)
    groups = fusable(model)
    assert len(groups) == 4  # 2 layers x (qkv, gate_up); qwen2's q/k/v biases are fused too
    fuse_projections(model, groups)
    assert np.abs(TorchRunner(model, 1).logits(ids) - before).max() < 1e-4
    assert not any(k.endswith("q_proj.weight") for k in model.state_dict())

    recipe = torch_recipe(tiny_qwen2, [{"name": "fuse"}] + TORCH_INT4)
    res = optpipe.build(recipe, output=tmp_path / "art", log=lambda m: None)
    assert res.manifest["passes"][0]["changes"] == {"qkv_fused": 2, "gate_up_fused": 2}
    assert res.manifest["target"]["quantized_modules"] == {"int4-weight-only": 8, "int8-weight-only": 1}
    first = optpipe.load(tmp_path / "art", threads=1).generate(ids, 8, eos_token_id=None).tokens
    assert optpipe.load(tmp_path / "art", threads=1).generate(ids, 8, eos_token_id=None).tokens == first
