"""cpu-torch quantize-int4/int8: GPTQ, and a tied float head stored once."""
import numpy as np
from safetensors import safe_open

import optpipe

from ..conftest import torch_recipe


def test_gptq_and_tied_float_head(tiny_qwen2, tmp_path):
    recipe = torch_recipe(tiny_qwen2, [{"name": "quantize-int4", "algorithm": "gptq", "block_size": 64},
                                      {"name": "static-kv-cache", "max_length": 128}])
    res = optpipe.build(recipe, output=tmp_path / "art", log=lambda m: None)
    assert res.manifest["target"]["tied_embeddings"] is True  # lm_head stayed float and tied: stored once
    with safe_open(str(tmp_path / "art" / "weights.safetensors"), "pt") as f:
        assert "lm_head.weight" not in set(f.keys())
    assert res.manifest["passes"][0]["changes"]["layers_quantized"] == 14
    assert len(optpipe.load(tmp_path / "art", threads=1).generate(np.arange(5, 25), 6, eos_token_id=None).tokens) == 6
