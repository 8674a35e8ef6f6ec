"""cpu-torch target on a tiny model: build with every torch pass, reload from safetensors alone, same tokens."""
import json

import numpy as np
from safetensors import safe_open

import optpipe
from optpipe.cli import main

from ..conftest import DATA, TORCH_INT4, torch_recipe, write_recipe


def test_int4_artifact_reloads_with_same_greedy_tokens(tiny_llama, tmp_path):
    out = tmp_path / "art"
    recipe = torch_recipe(tiny_llama, [{"name": "bf16-autocast", "force": True}] + TORCH_INT4)
    res = optpipe.build(recipe, output=out, log=lambda m: None)
    m = res.manifest
    assert m["target"]["quantized_modules"] == {"int4-weight-only": 14, "int8-weight-only": 1}
    assert m["target"]["kv_cache"] == {"mode": "static", "max_length": 128}
    assert m["passes"][1]["changes"]["skipped"] == {"lm_head": "excluded by pattern 'lm_head'"}
    assert {"weights.safetensors", "quantization.json", "runtime.json", "config.json"} <= set(m["files"])
    assert not any(f.endswith((".pt", ".bin", ".pkl")) for f in m["files"])
    with safe_open(str(out / "weights.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert str(f.get_tensor("model.layers.0.mlp.down_proj.qweight").dtype) == "torch.uint8"
    assert {"model.layers.0.self_attn.q_proj.scales", "model.layers.0.self_attn.q_proj.zeros", "lm_head.qweight"} <= keys
    assert "model.layers.0.self_attn.q_proj.weight" not in keys
    ids = np.arange(20, 40)
    first = optpipe.load(out, threads=1).generate(ids, 10, eos_token_id=None).tokens
    again = optpipe.load(out, threads=1).generate(ids, 10, eos_token_id=None).tokens
    assert first == again and len(first) == 10
    layout = json.loads((out / "quantization.json").read_text())
    assert layout["model.layers.1.mlp.up_proj"]["group_size"] == 32
    assert main(["verify", str(out)]) == 0


def test_accuracy_gate_rejects_corrupted_torch_weights(tiny_llama, tmp_path, capsys):
    passes = TORCH_INT4 + [{"name": "corrupt-torch-scales", "path": str(DATA / "corrupt_torch_scales.py")}]
    recipe = write_recipe(tmp_path, torch_recipe(tiny_llama, passes, accuracy={"max_ppl_delta_pct": 5.0}))
    assert main(["build", str(recipe), "-o", str(tmp_path / "art"), "--allow-plugins"]) == 3
    assert "accuracy: perplexity delta" in capsys.readouterr().err
    assert not (tmp_path / "art").exists()
