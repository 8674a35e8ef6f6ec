"""Every described family, on a tiny random-init model that exercises its features: the exported graph matches
PyTorch, and greedy decoding from a prompt longer than the sliding window gives transformers' own `generate`
tokens, on ONNX Runtime (fused, static KV cache) and on the cpu-torch runner (fused projections, both caches)."""
import copy

import numpy as np
import pytest
import torch

from optpipe import arch, models
from optpipe.passes.export import ExportConfig, build_decoder_graph, check_against_torch
from optpipe.passes.fuse import Fuse, FuseConfig
from optpipe.passes.static_kv_cache import StaticKVCache, StaticKVConfig
from optpipe.passes.torch_fuse import fusable
from optpipe.pipeline import ModelState, PassContext
from optpipe.recipe import ModelSpec
from optpipe.runtime.ort_decoder import OnnxDecoder
from optpipe.runtime.torch_modules import TorchRunner, fuse_projections

from ..conftest import make_tiny

PROMPT, NEW = 40, 48  # the prompt alone is longer than every window below
# name -> (model_type, config settings that exercise the family)
FAMILIES = {
    "llama": ("llama", {}),
    "llama3-rope": ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}}),
    "mistral-window16": ("mistral", {"sliding_window": 16}),
    "qwen2": ("qwen2", {}),
    "qwen2-window16-layer1": ("qwen2", {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 1}),
    "qwen3": ("qwen3", {}),
    "qwen3-mha": ("qwen3", {"num_key_value_heads": 4}),
    "gemma2-window16": ("gemma2", {"sliding_window": 16, "layer_types": ["sliding_attention", "full_attention"],
                                   "query_pre_attn_scalar": 24, "attn_logit_softcapping": 5.0,
                                   "final_logit_softcapping": 3.0}),
    "gemma3-window16": ("gemma3_text", {"sliding_window": 16, "layer_types": ["sliding_attention", "full_attention"],
                                        "query_pre_attn_scalar": 24}),
    # transformers takes longrope's switch-over length from the top-level original_max_position_embeddings
    "phi3-longrope-window16": ("phi3", {"sliding_window": 16, "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 1,
                                        "original_max_position_embeddings": 256, "rope_scaling": {
                                            "rope_type": "longrope", "short_factor": [1.0 + i / 8 for i in range(8)],
                                            "long_factor": [2.0 + i / 4 for i in range(8)]}}),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_model(request, tmp_path_factory):
    model_type, settings = FAMILIES[request.param]
    path = make_tiny(tmp_path_factory.mktemp(request.param), model_type, **settings)
    model, _, _ = models.load(ModelSpec(source=str(path)))
    return request.param, model, path


def hf_greedy(model, prompt: np.ndarray) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.as_tensor(prompt).reshape(1, -1), max_new_tokens=NEW, do_sample=False,
                             eos_token_id=None, pad_token_id=0, min_new_tokens=NEW)
    return out[0, prompt.size:].tolist()


def prompt_ids() -> np.ndarray:
    return np.random.default_rng(1).integers(1, 256, PROMPT)


def test_windows_come_from_the_config(family_model):
    name, model, _ = family_model
    windows = arch.describe(model.config).windows(model.config)
    expected = {"mistral-window16": [16, 16], "qwen2-window16-layer1": [None, 16], "gemma2-window16": [16, None],
                "gemma3-window16": [16, None], "phi3-longrope-window16": [16, 16]}.get(name, [None, None])
    assert windows == expected


def test_onnx_static_cache_decodes_like_transformers(family_model):
    name, model, _ = family_model
    proto = build_decoder_graph(model, ExportConfig(max_positions=256))
    assert check_against_torch(model, proto, atol=1e-3)["max_abs_logit_diff"] < 1e-3
    state = ModelState("onnx", onnx_model=proto)
    fused = Fuse(FuseConfig()).call(state, PassContext()).changes
    packed_in_checkpoint = arch.describe(model.config).packed
    assert fused["attention_gqa"] == 2 and fused["gate_up"] == (0 if packed_in_checkpoint else 2)
    # q/k norms sit between the projections and attention, so Qwen3's and Gemma 3's q/k/v stay three MatMuls
    assert fused["qkv_packed"] == (0 if arch.describe(model.config).qk_norm else 2)
    StaticKVCache(StaticKVConfig(max_length=128)).call(state, PassContext())
    prompt = prompt_ids()
    got = OnnxDecoder.from_proto(state.onnx_model).generate(prompt, NEW).tokens
    assert got == hf_greedy(model, prompt)


@pytest.mark.parametrize("kv_cache", [None, {"mode": "static", "max_length": 128}], ids=["dynamic", "static"])
def test_torch_runner_with_fused_projections_decodes_like_transformers(family_model, kv_cache):
    _, model, _ = family_model
    prompt = prompt_ids()
    want = hf_greedy(model, prompt)
    fused = copy.deepcopy(model)
    groups = fusable(fused)
    packed_in_checkpoint = arch.describe(model.config).packed
    assert len(groups) == (0 if packed_in_checkpoint else 2 * fused.config.num_hidden_layers)
    fuse_projections(fused, groups)
    assert TorchRunner(fused, 1, kv_cache).generate(prompt, NEW).tokens == want


def test_layer_by_layer_reference_decodes_like_transformers(family_model):
    """The streaming build's fp32 reference (one layer at a time, sliding windows as explicit masks)."""
    from optpipe.checkpoint import LazyCheckpoint
    from optpipe.targets.torch_layerwise import LayerwiseReference

    _, model, path = family_model
    prompt = prompt_ids()
    layerwise = LayerwiseReference(LazyCheckpoint.open(path), 1)
    with torch.no_grad():
        eager = model(torch.as_tensor(prompt).reshape(1, -1)).logits[0].numpy()
    assert np.abs(layerwise.logits(prompt) - eager).max() < 1e-4
    assert layerwise.generate(prompt, 12).tokens == hf_greedy(model, prompt)[:12]


# float32 scales: the in-memory and streaming builds measure GPTQ's Hessians two ways (ONNX Runtime; torch layer by
# layer) that agree to ~1e-6, which float32 scales carry through to ~1e-3 logits; float16 rounding is a step
# function, so the same tiny difference can flip a block's scale to the next float16 and GPTQ then picks other
# (equally good) codes: both builds still pass their gates, but the logits differ by ~0.07 on these tiny models.
ONNX_INT4 = [{"name": "smoothquant", "alpha": 0.5}, {"name": "export", "max_positions": 256}, {"name": "fuse"},
             {"name": "static-kv-cache", "max_length": 256},
             {"name": "quantize-int4", "algorithm": "gptq", "block_size": 32, "accuracy_level": 0, "exclude": [],
              "scale_dtype": "float32"}]
TORCH_INT8 = [{"name": "smoothquant", "alpha": 0.5}, {"name": "fuse"}, {"name": "quantize-int8"}]


@pytest.mark.parametrize("name", ["mistral-window16", "qwen3", "phi3-longrope-window16", "gemma2-window16",
                                  "gemma3-window16"])
def test_quantized_builds_pass_their_gates_in_memory_and_streaming(name, tmp_path):
    """The features each family adds (a sliding window shorter than the evaluation window; q/k norms) through the
    calibrated INT4 chain on cpu-onnx, in memory and streamed (same logits), and INT8 on cpu-torch."""
    import optpipe

    from ..conftest import tiny_recipe

    model_type, settings = FAMILIES[name]
    path = make_tiny(tmp_path / "model", model_type, **settings)
    mem = optpipe.build(tiny_recipe(path, ONNX_INT4), output=tmp_path / "mem", log=lambda m: None)
    recipe = tiny_recipe(path, ONNX_INT4)
    recipe["model"] = {"source": str(path), "streaming": True}
    st = optpipe.build(recipe, output=tmp_path / "st", log=lambda m: None)
    assert mem.manifest["status"] == st.manifest["status"] == "passed"
    ids = prompt_ids()
    a = optpipe.load(tmp_path / "mem", threads=1).logits(ids)
    b = optpipe.load(tmp_path / "st", threads=1).logits(ids)
    assert np.abs(a - b).max() < 1e-3
    torch_recipe = tiny_recipe(path, TORCH_INT8)
    torch_recipe["target"] = "cpu-torch"
    res = optpipe.build(torch_recipe, output=tmp_path / "torch", log=lambda m: None)
    assert res.manifest["status"] == "passed"
    assert res.manifest["passes"][1]["changes"]["qkv_fused"] == (0 if name.startswith("phi3") else 2)


EXAMPLES = {"llama3": ("OPTPIPE_LLAMA3", "llama3-rope"), "mistral": ("OPTPIPE_MISTRAL", "mistral-window16"),
            "qwen2": ("OPTPIPE_QWEN2", "qwen2"), "qwen3": ("OPTPIPE_QWEN3", "qwen3"),
            "phi3": ("OPTPIPE_PHI3", "phi3-longrope-window16"), "gemma3": ("OPTPIPE_GEMMA3", "gemma3-window16")}
# the example serves 4,096 positions: its model keeps longrope's short factors that far (Phi-3-mini-4k's length)
EXAMPLE_SETTINGS = {"phi3": {"original_max_position_embeddings": 4096}}


@pytest.mark.parametrize("example", list(EXAMPLES))
def test_example_recipes_validate_on_a_model_of_their_family(example, tmp_path, monkeypatch, capsys):
    """recipes/examples/<family>-cpu-int4.yaml, pointed (by its environment variable) at a tiny model of the family:
    `validate` accepts it and names the family, without loading weights."""
    from optpipe.cli import main

    from ..conftest import ROOT

    variable, family = EXAMPLES[example]
    model_type, settings = FAMILIES[family]
    settings = {**settings, **EXAMPLE_SETTINGS.get(example, {})}
    monkeypatch.setenv(variable, str(make_tiny(tmp_path / "m", model_type, **settings)))
    assert main(["validate", str(ROOT / "recipes" / "examples" / f"{example}-cpu-int4.yaml")]) == 0
    assert f"family {arch.describe(model_type).family}" in capsys.readouterr().out


@pytest.mark.parametrize("change, expect", [
    ({"max_positions": 512}, "longrope switches to its long factors past 256 positions"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor 0.5"),
    ({"hidden_act": "gelu"}, "MLP activation 'gelu'"),
])
def test_validate_refuses_what_export_cannot_write(change, expect, tmp_path, capsys):
    """Refused in seconds, before any weight is read, naming the export pass and the reason."""
    import yaml

    from optpipe.cli import main

    from ..conftest import tiny_recipe, write_recipe

    model_type, settings = FAMILIES["phi3-longrope-window16"]
    settings = dict(settings)
    if "max_positions" not in change:
        settings.update(change)
    path = make_tiny(tmp_path / "m", model_type, **settings)
    export = {"name": "export", "max_positions": change.get("max_positions", 256)}
    recipe = write_recipe(tmp_path, tiny_recipe(path, [export, {"name": "fuse"}]))
    assert yaml.safe_load(recipe.read_text())["passes"][0] == export
    assert main(["validate", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "passes[0] (export)" in err and expect in err, err


TRT_INT8 = [{"name": "smoothquant"}, {"name": "export", "max_positions": 256},
            {"name": "qdq-int8", "exclude": ["lm_head"]}, {"name": "fp16"}]


@pytest.mark.parametrize("name", ["mistral-window16", "qwen2-window16-layer1", "qwen3", "phi3-longrope-window16",
                                  "gemma2-window16", "gemma3-window16"])
def test_tensorrt_ready_onnx_for_each_family(name, tmp_path):
    """gpu-tensorrt beyond llama: the family's unfused graph (windows, soft-caps, q/k norms, packed projections)
    through SmoothQuant + INT8 QDQ + fp16 is lint-clean for TensorRT and passes the accuracy gate, run on CPU."""
    import onnx

    import optpipe
    from optpipe.targets.trt_lint import lint

    from ..conftest import tiny_recipe

    model_type, settings = FAMILIES[name]
    path = make_tiny(tmp_path / "model", model_type, **settings)
    recipe = tiny_recipe(path, TRT_INT8)
    recipe["target"] = "gpu-tensorrt"
    recipe["gates"]["speed"] = {"unmeasured": "allow"}
    res = optpipe.build(recipe, output=tmp_path / "trt", log=lambda m: None)
    assert res.manifest["status"] == "passed" and res.manifest["gates"]["accuracy"]["status"] == "passed"
    model = onnx.load(str(tmp_path / "trt" / "model.onnx"))
    assert lint(model) == [] and not model.functions
