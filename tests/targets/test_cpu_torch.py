"""cpu-torch target on a tiny model: build with every torch pass, reload from safetensors alone, same tokens."""
import json

import numpy as np
import pytest
from safetensors import safe_open

import optpipe
from optpipe.cli import main
from optpipe.pipeline import registered_passes, validate_pass_chain
from optpipe.recipe import recipe_from_dict

from ..conftest import DATA, tiny_recipe, write_recipe

SPEED = {"min_decode_speedup": 0.05, "prompt_tokens": 16, "new_tokens": 8, "repeats": 1, "threads": 1}
INT4_CHAIN = [{"name": "quantize-int4", "block_size": 32, "exclude": ["lm_head"]},
              {"name": "quantize-int8", "include": ["^lm_head$"]},
              {"name": "static-kv-cache", "max_length": 128}]


def torch_recipe(model_dir, passes, **gates):
    r = tiny_recipe(model_dir, passes, speed=gates.pop("speed", SPEED), **gates)
    r["target"] = "cpu-torch"
    return r


def test_same_pass_name_resolves_per_target(tiny_llama):
    impls = {c.__module__.rsplit(".", 1)[1] for c in registered_passes()["quantize-int4"]}
    assert impls == {"quantize_int4", "torch_quantize"}
    onnx_chain = validate_pass_chain(recipe_from_dict(tiny_recipe(tiny_llama, [{"name": "export"}, {"name": "quantize-int4"}])), "r")
    torch_chain = validate_pass_chain(recipe_from_dict(torch_recipe(tiny_llama, INT4_CHAIN)), "r")
    assert onnx_chain[1].input_stage == "onnx" and torch_chain[0].input_stage == "torch"


def test_int4_artifact_reloads_with_same_greedy_tokens(tiny_llama, tmp_path):
    out = tmp_path / "art"
    recipe = torch_recipe(tiny_llama, [{"name": "bf16-autocast", "force": True}] + INT4_CHAIN)
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


def test_gptq_and_tied_float_head(tiny_qwen2, tmp_path):
    recipe = torch_recipe(tiny_qwen2, [{"name": "quantize-int4", "algorithm": "gptq", "block_size": 64},
                                      {"name": "static-kv-cache", "max_length": 128}])
    res = optpipe.build(recipe, output=tmp_path / "art", log=lambda m: None)
    assert res.manifest["target"]["tied_embeddings"] is True  # lm_head stayed float and tied: stored once
    with safe_open(str(tmp_path / "art" / "weights.safetensors"), "pt") as f:
        assert "lm_head.weight" not in set(f.keys())
    assert res.manifest["passes"][0]["changes"]["layers_quantized"] == 14
    assert len(optpipe.load(tmp_path / "art", threads=1).generate(np.arange(5, 25), 6, eos_token_id=None).tokens) == 6


AVX2_ONLY = frozenset({"avx2", "fma", "f16c"})
AVX512_BF16 = AVX2_ONLY | {"avx512f", "avx512_vnni", "avx512_bf16"}


def fake_cpu(monkeypatch, flags: frozenset) -> None:
    from optpipe import hw

    monkeypatch.setattr(hw, "cpu_flags", lambda: flags)


def test_bf16_is_refused_before_loading_without_native_support(tiny_llama, tmp_path, monkeypatch, capsys):
    from optpipe import models

    fake_cpu(monkeypatch, AVX2_ONLY)
    monkeypatch.setattr(models, "load", lambda *a, **k: pytest.fail("the model was loaded before the refusal"))
    recipe = write_recipe(tmp_path, torch_recipe(tiny_llama, [{"name": "bf16-autocast"}]))
    assert main(["build", str(recipe), "-o", str(tmp_path / "art")]) == 2
    err = capsys.readouterr().err
    assert "passes[0] (bf16-autocast)" in err and "no avx512_bf16 or AMX" in err and "fallback: fp32" in err
    assert not (tmp_path / "art").exists()


def test_bf16_fallback_keeps_fp32_and_records_it(tiny_llama, tmp_path, monkeypatch):
    fake_cpu(monkeypatch, AVX2_ONLY)
    recipe = torch_recipe(tiny_llama, [{"name": "bf16-autocast", "fallback": "fp32"}] + INT4_CHAIN)
    res = optpipe.build(recipe, output=tmp_path / "art", log=lambda m: None)
    assert res.manifest["passes"][0]["changes"] == {"dtype": "float32", "native_bf16": False}
    assert res.manifest["target"]["dtypes"] == ["float32"]
    assert res.manifest["environment"]["isa"]["avx512_bf16"] is False


@pytest.mark.parametrize("flags,refused", [(AVX2_ONLY, {"smollm2-135m-cpu-torch-bf16", "smollm2-135m-cpu-ipex-bf16",
                                                        "smollm2-135m-cpu-ipex-int4"}),
                                           (AVX512_BF16, set())])
def test_shipped_recipes_this_cpu_can_build(flags, refused, monkeypatch):
    """Only recipes that truly need bf16 are refused on an AVX2-only CPU; the INT4/INT8 ones fall back to fp32."""
    from optpipe.pipeline import cpu_refusal
    from optpipe.recipe import load_recipe

    from ..conftest import ROOT

    fake_cpu(monkeypatch, flags)
    got = {p.stem for p in (ROOT / "recipes").glob("*.yaml") if cpu_refusal(load_recipe(p))}
    assert got == refused


def test_accuracy_gate_rejects_corrupted_torch_weights(tiny_llama, tmp_path, capsys):
    passes = INT4_CHAIN + [{"name": "corrupt-torch-scales", "path": str(DATA / "corrupt_torch_scales.py")}]
    recipe = write_recipe(tmp_path, torch_recipe(tiny_llama, passes, accuracy={"max_ppl_delta_pct": 5.0}))
    assert main(["build", str(recipe), "-o", str(tmp_path / "art"), "--allow-plugins"]) == 3
    assert "accuracy: perplexity delta" in capsys.readouterr().err
    assert not (tmp_path / "art").exists()


def test_torch_pass_is_refused_for_onnx_target(tiny_llama):
    with pytest.raises(optpipe.RecipeError, match=r"passes\[0\] \(bf16-autocast\): not available for target cpu-onnx"):
        recipe_from_dict(tiny_recipe(tiny_llama, [{"name": "bf16-autocast"}, {"name": "export"}]))


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

    recipe = torch_recipe(tiny_qwen2, [{"name": "fuse"}] + INT4_CHAIN)
    res = optpipe.build(recipe, output=tmp_path / "art", log=lambda m: None)
    assert res.manifest["passes"][0]["changes"] == {"qkv_fused": 2, "gate_up_fused": 2}
    assert res.manifest["target"]["quantized_modules"] == {"int4-weight-only": 8, "int8-weight-only": 1}
    first = optpipe.load(tmp_path / "art", threads=1).generate(ids, 8, eos_token_id=None).tokens
    assert optpipe.load(tmp_path / "art", threads=1).generate(ids, 8, eos_token_id=None).tokens == first
