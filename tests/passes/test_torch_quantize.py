"""cpu-torch quantize-int4/int8: GPTQ, a tied float head stored once, and GPT-2's Conv1D linears."""
import numpy as np
import pytest
from safetensors import safe_open

import optpipe

from ..conftest import make_tiny, torch_recipe


def test_gptq_and_tied_float_head(tiny_qwen2, tmp_path):
    recipe = torch_recipe(tiny_qwen2, [{"name": "quantize-int4", "algorithm": "gptq", "block_size": 64},
                                      {"name": "static-kv-cache", "max_length": 128}])
    res = optpipe.build(recipe, output=tmp_path / "art", log=lambda m: None)
    assert res.manifest["target"]["tied_embeddings"] is True  # lm_head stayed float and tied: stored once
    with safe_open(str(tmp_path / "art" / "weights.safetensors"), "pt") as f:
        assert "lm_head.weight" not in set(f.keys())
    assert res.manifest["passes"][0]["changes"]["layers_quantized"] == 14
    assert len(optpipe.load(tmp_path / "art", threads=1).generate(np.arange(5, 25), 6, eos_token_id=None).tokens) == 6


GPT2_LINEARS = {f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                                                     "mlp.c_proj")}


@pytest.mark.parametrize("quantize, precision", [({"name": "quantize-int8"}, "int8"),
                                                 ({"name": "quantize-int4", "block_size": 32}, "int4")])
def test_gpt2_conv1d_linears_are_quantized_and_counted(quantize, precision, tmp_path):
    """GPT-2 keeps its linears in transformers' Conv1D (weight stored [in, out]), not nn.Linear. They were neither
    quantized nor counted by the coverage gate, which then reported 1 linear of 1 (the head) quantized."""
    recipe = torch_recipe(make_tiny(tmp_path / "m", "gpt2"), [quantize], accuracy={"max_ppl_delta_pct": 10.0})
    res = optpipe.build(recipe, output=tmp_path / "art", log=lambda m: None)
    assert res.manifest["status"] == "passed"
    coverage = res.manifest["gates"]["coverage"]
    assert coverage["linears"] == 9, coverage  # 8 Conv1D + lm_head
    precisions = optpipe.load(tmp_path / "art", threads=1).runner.precisions()
    assert {k for k, v in precisions.items() if v == precision} >= GPT2_LINEARS


def test_mixture_of_experts_weights_are_named_as_skipped_and_counted_as_float(tmp_path):
    """Mixtral's router and stacked experts (2-D and 3-D parameters of modules that are not linears) have no
    quantized module: the pass names them as skipped and the coverage gate counts them in float, instead of
    reporting every linear quantized while most of the weights are not."""
    recipe = torch_recipe(make_tiny(tmp_path / "m", "mixtral", num_local_experts=4),
                          [{"name": "quantize-int8"}], accuracy={"max_ppl_delta_pct": 10.0})
    res = optpipe.build(recipe, output=tmp_path / "art", log=lambda m: None)
    skipped = res.manifest["passes"][0]["changes"]["skipped"]
    assert "gate_up_proj [4, 256, 64]" in skipped["model.layers.0.mlp.experts"], skipped
    assert skipped["model.layers.1.mlp.gate"].endswith("is not a linear layer: it stays in float")
    coverage = res.manifest["gates"]["coverage"]
    assert (coverage["linears"], coverage["quantized"]) == (13, 9), coverage  # 4 experts/routers + 8 attention + head


def test_int4_names_each_linear_its_kernel_cannot_take(tmp_path):
    """cpu-torch INT4 needs in_features divisible by the block and out_features by 16 (the kernel's packing): each
    linear that fails one stays float, named with its reason in module order, and the note says which blocks fit."""
    model = make_tiny(tmp_path / "m", "llama", intermediate_size=96, vocab_size=250)
    recipe = torch_recipe(model, [{"name": "quantize-int4", "block_size": 64, "include": [".*"], "exclude": []}],
                          accuracy={"max_ppl_delta_pct": 100.0})
    record = optpipe.build(recipe, output=tmp_path / "art", log=lambda m: None).manifest["passes"][0]
    assert list(record["changes"]["skipped"].items()) == [
        ("model.layers.0.mlp.down_proj", "in_features=96 is not a multiple of block_size 64"),
        ("model.layers.1.mlp.down_proj", "in_features=96 is not a multiple of block_size 64"),
        ("lm_head", "out_features=250 is not a multiple of 16 (the CPU int4 kernel's packing)")]
    assert record["changes"]["layers_quantized"] == 12
    assert record["notes"][0] == ("2 of 15 selected linears stay float: input width 96 is not a multiple of block_size "
                                  "64 (block sizes that fit every one: 16, 32)")
