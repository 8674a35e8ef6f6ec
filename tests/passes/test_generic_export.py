"""The generic export route (`export: {method: generic}`, and `auto` for a family without a description): a
torch.onnx trace with the family route's interface, quantized and gated like any other graph."""
from __future__ import annotations

import numpy as np
import pytest

from ..conftest import make_tiny, tiny_recipe, write_recipe


def _hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


def test_forced_generic_matches_the_family_route(tmp_path):
    """A described family (llama) through both routes: same interface, logits within 1e-3 over a prompt and
    cached decode steps; the generic graph names its weights after the modules."""
    from optpipe.passes.export import ExportConfig, build_decoder_graph, build_generic_graph
    from optpipe.runtime.ort_decoder import OnnxDecoder

    model = _hf(make_tiny(tmp_path / "llama", "llama"))
    generic = build_generic_graph(model, ExportConfig(method="generic", max_positions=256))
    family = build_decoder_graph(model, ExportConfig(max_positions=256))
    names = {n.name for n in generic.graph.node if n.op_type == "MatMul"}
    assert {"model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "lm_head"} <= names
    inits = {t.name for t in generic.graph.initializer}
    assert "lm_head.weight_t" in inits  # the tied head materialized, so it can be quantized
    ids = np.random.default_rng(0).integers(0, 256, (1, 40))
    got, want = OnnxDecoder.from_proto(generic), OnnxDecoder.from_proto(family)
    a, sa = got.prefill(ids[:, :37])
    b, sb = want.prefill(ids[:, :37])
    assert np.abs(a - b).max() < 1e-3
    for t in range(37, 40):
        a, sa = got.step(ids[:, t:t + 1], sa)
        b, sb = want.step(ids[:, t:t + 1], sb)
        assert np.abs(a - b).max() < 1e-3


WINDOWED = {"starcoder2": {"sliding_window": 16},
            "exaone4": {"sliding_window": 16, "layer_types": ["sliding_attention", "full_attention"]}}


@pytest.mark.parametrize("model_type", list(WINDOWED))
def test_decoding_past_a_sliding_window_gives_transformers_tokens(model_type, tmp_path):
    """Undescribed families with a sliding window: 48 greedy tokens after a 40-token prompt (past the 16-token
    window) through the traced graph's KV cache equal transformers' `generate`. The trace rebuilt a sliding cache
    layer from the past tensors at every step, which then kept only its window and took it for all it had seen:
    Starcoder2's tokens parted at the 22nd, though the prompt's logits matched."""
    import torch

    from optpipe.passes.export import ExportConfig, build_generic_graph
    from optpipe.runtime.ort_decoder import OnnxDecoder

    model = _hf(make_tiny(tmp_path / "m", model_type, **WINDOWED[model_type]))
    prompt = np.random.default_rng(0).integers(3, 250, 40)
    got = OnnxDecoder.from_proto(build_generic_graph(model, ExportConfig(method="generic", max_positions=256)))
    with torch.no_grad():
        want = model.generate(torch.as_tensor(prompt).reshape(1, -1), max_new_tokens=48, min_new_tokens=48,
                              do_sample=False, eos_token_id=None, pad_token_id=0)[0, 40:].tolist()
    assert got.generate(prompt, 48).tokens == want


GENERIC_INT4 = [{"name": "export", "max_positions": 256},
                {"name": "quantize-int4", "algorithm": "gptq", "block_size": 32, "accuracy_level": 0}]


LLAMA_LIKE = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
              "mlp.up_proj", "mlp.down_proj")
GPT2 = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # Conv1D modules, traced as Gemm
# OPT's MLP runs on 2-D hidden states: its Linears trace as Gemm(x, W, b, transB=1)
OPT = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2")


@pytest.mark.parametrize("model_type, prefix, linears", [("olmo2", "model.layers", LLAMA_LIKE),
                                                         ("granite", "model.layers", LLAMA_LIKE),
                                                         ("gpt2", "transformer.h", GPT2),
                                                         ("opt", "model.decoder.layers", OPT)])
def test_an_undescribed_family_builds_int4_through_the_generic_route(model_type, prefix, linears, tmp_path, capsys):
    """No architecture description: validate names the route, the build takes it, quantizes every linear but the
    head with GPTQ, passes its gates, and the manifest says which route was used. (The tiny GPT-2 config also
    carries a num_key_value_heads GPT-2 does not use: the cache layout is read from the model, not the config.)"""
    import optpipe
    from optpipe import arch
    from optpipe.cli import main

    assert model_type not in arch.supported()
    path = make_tiny(tmp_path / "m", model_type)
    recipe = tiny_recipe(path, GENERIC_INT4)
    assert main(["validate", str(write_recipe(tmp_path, recipe))]) == 0
    out = capsys.readouterr().out
    assert "no architecture description" in out and "export route: generic" in out, out
    res = optpipe.build(recipe, output=tmp_path / "art", log=lambda m: None)
    assert res.manifest["status"] == "passed"
    export, quant = res.manifest["passes"][0], res.manifest["passes"][1]
    assert export["changes"]["route"] == "generic" and export["changes"]["max_abs_logit_diff"] < 1e-3
    assert quant["changes"]["layers_quantized"] == 2 * len(linears)
    assert quant["changes"]["skipped"] == {"lm_head": "excluded by pattern 'lm_head'"}  # not attention's MatMuls
    precisions = optpipe.load(tmp_path / "art", threads=1).runner.precisions()
    assert sorted(k for k, v in precisions.items() if v == "int4") == sorted(
        f"{prefix}.{i}.{m}" for i in range(2) for m in linears)
    assert precisions["lm_head"] == "float32"


@pytest.mark.parametrize("model_type, passes, expect", [
    ("llama", [{"name": "export", "method": "generic"}, {"name": "fuse"}],
     "passes[1] (fuse): fuses the units the family export writes"),
    ("olmo2", [{"name": "export"}, {"name": "fuse"}], "passes[1] (fuse): needs the layer topology of model_type 'olmo2'"),
    ("olmo2", [{"name": "export", "method": "family"}],
     "passes[0] (export): needs the layer topology of model_type 'olmo2'"),
    ("mixtral", [{"name": "export"}], "passes[0] (export): a mixture of experts (8 experts): torch.onnx has no"),
])
def test_validate_refuses_what_the_generic_route_cannot_do(model_type, passes, expect, tmp_path, capsys):
    from optpipe.cli import main

    path = make_tiny(tmp_path / "m", model_type)
    assert main(["validate", str(write_recipe(tmp_path, tiny_recipe(path, passes)))]) == 2
    assert expect in capsys.readouterr().err


def test_gpu_tensorrt_needs_the_family_route(tmp_path, capsys):
    """Before, a generic trace went through every pass and failed at the target's optimization profile (batch fixed
    at 1): validate refuses it, naming the reason, before anything loads."""
    from optpipe.cli import main

    path = make_tiny(tmp_path / "m", "opt")
    recipe = {**tiny_recipe(path, [{"name": "export"}, {"name": "qdq-int8"}, {"name": "fp16"}]),
              "target": "gpu-tensorrt"}
    assert main(["validate", str(write_recipe(tmp_path, recipe))]) == 2
    assert "passes[0] (export): gpu-tensorrt needs the family route" in capsys.readouterr().err


def test_streaming_needs_the_family_route(tmp_path, capsys):
    from optpipe.cli import main

    path = make_tiny(tmp_path / "m", "llama")
    recipe = tiny_recipe(path, [{"name": "export", "method": "generic"}])
    recipe["model"] = {"source": str(path), "streaming": True}
    assert main(["validate", str(write_recipe(tmp_path, recipe))]) == 2
    assert "passes[0] (export): method generic traces the model in memory" in capsys.readouterr().err


def test_the_generic_example_recipe_validates_on_an_undescribed_family(tmp_path, monkeypatch, capsys):
    from optpipe.cli import main

    from ..conftest import ROOT

    monkeypatch.setenv("OPTPIPE_MODEL", str(make_tiny(tmp_path / "m", "olmo2")))
    assert main(["validate", str(ROOT / "recipes" / "examples" / "generic-cpu-int4.yaml")]) == 0
    assert "export route: generic" in capsys.readouterr().out


def test_a_cache_the_runtime_cannot_hold_is_refused_with_its_shapes(tmp_path):
    """DeepSeek-V3's multi-head latent attention keeps keys and values of different widths: one buffer shape per
    layer cannot hold them, and the build says so instead of writing a graph the runtime would misfeed."""
    from optpipe.errors import BuildError
    from optpipe.passes.export import ExportConfig, build_generic_graph

    path = make_tiny(tmp_path / "ds", "deepseek_v3", num_key_value_heads=4, head_dim=8, kv_lora_rank=16,
                     q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, n_routed_experts=4,
                     num_experts_per_tok=2, moe_intermediate_size=32, first_k_dense_replace=1, n_group=1, topk_group=1)
    with pytest.raises(BuildError, match=r"deepseek_v3: its KV cache is not one \[1, heads, length, dim\] shape"):
        build_generic_graph(_hf(path), ExportConfig(method="generic"))


def test_a_failed_trace_names_the_innermost_cause_without_terminal_colours(tmp_path, monkeypatch):
    """torch.onnx wraps the reason (an op it has no ONNX function for: a mixture-of-experts kernel, say) in
    generic errors whose first line is coloured boilerplate; the build error names the reason, and keeps the chain."""
    from optpipe.errors import BuildError
    from optpipe.passes import _generic_export
    from optpipe.passes.export import ExportConfig, build_generic_graph

    def trace(*_a, **_k):
        try:
            raise LookupError("No ONNX function found for <OpOverload(op='transformers.grouped_mm_fallback')>")
        except LookupError as inner:
            raise RuntimeError("Failed to convert. \x1b[96mThis is step 3/3\x1b[0m. Next steps:\n- ...") from inner

    monkeypatch.setattr(_generic_export, "trace", trace)
    with pytest.raises(BuildError) as err:
        build_generic_graph(_hf(make_tiny(tmp_path / "m", "olmo2")), ExportConfig(method="generic"))
    msg = str(err.value)
    assert "torch.onnx could not trace olmo2: LookupError: No ONNX function found for" in msg, msg
    assert "grouped_mm_fallback" in msg and "\x1b" not in msg and "step 3/3" not in msg
    assert isinstance(err.value.__cause__, RuntimeError)


@pytest.mark.parametrize("model_type", ["gpt2", "opt"])
def test_quantize_embedding_finds_a_lookup_by_reshaped_input_ids(model_type, tmp_path):
    """GPT-2's and OPT's traces gather the embedding by input_ids.view(-1, n), not input_ids: quantize-embedding
    found no lookup there and failed the build after every other pass. Tied, it reads the INT4 head's blocks."""
    import optpipe

    passes = [{"name": "export", "max_positions": 256},
              {"name": "quantize-int4", "block_size": 32, "accuracy_level": 0, "exclude": []},
              {"name": "quantize-embedding"}]
    res = optpipe.build(tiny_recipe(make_tiny(tmp_path / "m", model_type), passes), output=tmp_path / "art",
                        log=lambda m: None)
    assert res.manifest["status"] == "passed"
    assert res.manifest["passes"][2]["changes"]["scheme"].startswith("shared with lm_head"), res.manifest["passes"][2]


def test_a_generic_graph_is_limited_to_the_positions_its_model_has(tmp_path):
    """OPT learns 512 positions: the artifact said 8192 (max_positions), and ONNX Runtime failed on a raw Gather
    past 512 instead of the API refusing the prompt."""
    from optpipe.passes._onnx import metadata
    from optpipe.passes.export import ExportConfig, build_generic_graph

    graph = build_generic_graph(_hf(make_tiny(tmp_path / "m", "opt")), ExportConfig(method="generic"))
    assert metadata(graph)["optpipe.max_length"] == "512"


@pytest.mark.parametrize("model_type, export, expect", [
    ("opt", {}, "the model's context (max_position_embeddings): 512 is shorter than evaluation.window (1024)"),
    ("llama", {"max_positions": 600}, "passes[0] (export): max_positions 600 is shorter than evaluation.window (1024)")])
def test_validate_refuses_windows_longer_than_the_graphs_positions(model_type, export, expect, tmp_path, capsys):
    """An evaluation window past OPT's 512 learned positions was an internal error (IndexError) after the build, on
    cpu-onnx and cpu-torch alike; a window past the exported rotary table is refused by export."""
    from optpipe.cli import main

    recipe = tiny_recipe(make_tiny(tmp_path / "m", model_type, max_position_embeddings=2048 if export else 512),
                         [{"name": "export", **export}])
    recipe["evaluation"] = {"source": "builtin:evaluation", "max_tokens": 4096, "window": 1024}
    assert main(["validate", str(write_recipe(tmp_path, recipe))]) == 2
    assert expect in capsys.readouterr().err
