"""The lazy safetensors checkpoint: tensors read (and rewritten by later passes) one at a time, bf16 shards upcast."""
import json

import numpy as np
import pytest
import torch

import optpipe
from optpipe.checkpoint import LazyCheckpoint


def test_checkpoint_view_rewrites_tensors_as_read(tiny_llama):
    ck = LazyCheckpoint.open(tiny_llama)
    name = "model.layers.0.mlp.up_proj.weight"
    view = ck.transformed({name: lambda t: t * 2}).transformed({name: lambda t: t + 1})
    raw = ck.get_torch(name)
    assert torch.equal(view.get_torch(name), raw * 2 + 1)
    assert torch.equal(view.get_torch(name, (3, 7)), (raw * 2 + 1)[3:7])
    assert torch.equal(ck.get_torch(name), raw)  # the original is untouched
    with pytest.raises(optpipe.errors.ModelLoadError, match="not in the checkpoint"):
        ck.transformed({"nope": lambda t: t})


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
