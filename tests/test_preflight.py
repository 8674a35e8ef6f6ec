"""Reading a model's shape without its weights: the GGUF header parser against bytes written by hand, and the
real SmolLM2 header."""
import struct

import pytest

from optpipe import preflight
from optpipe.errors import ModelLoadError
from optpipe.recipe import ModelSpec


def _string(s: str) -> bytes:
    return struct.pack("<Q", len(s)) + s.encode()


def _kv(key: str, vtype: int, payload: bytes) -> bytes:
    return _string(key) + struct.pack("<I", vtype) + payload


def _gguf(*kvs: bytes, version: int = 3, tensors: int = 1) -> bytes:
    """A GGUF header announcing `tensors` tensors (their 32-byte infos stand in as zeros after the key/values)."""
    return b"GGUF" + struct.pack("<IQQ", version, tensors, len(kvs)) + b"".join(kvs) + bytes(32 * tensors)


def test_header_values_are_decoded_and_arrays_skipped(tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(_gguf(
        _kv("general.architecture", 8, _string("qwen2")),
        _kv("tokenizer.ggml.scores", 9, struct.pack("<IQ", 6, 3) + struct.pack("<3f", 0.1, 0.2, 0.3)),  # f32 x3
        _kv("tokenizer.ggml.tokens", 9, struct.pack("<IQ", 8, 2) + _string("a") + _string("bc")),
        _kv("qwen2.context_length", 4, struct.pack("<I", 32768)),
        _kv("qwen2.attention.head_count", 4, struct.pack("<I", 14)),
        _kv("qwen2.attention.head_count_kv", 4, struct.pack("<I", 2)),
        _kv("qwen2.rope.freq_base", 6, struct.pack("<f", 1e6)),
        _kv("general.quantized", 7, struct.pack("<?", True)),
    ))
    header = preflight.gguf_header(path)
    assert header["general.architecture"] == "qwen2" and header["qwen2.context_length"] == 32768
    assert header["tokenizer.ggml.scores"] == 3 and header["tokenizer.ggml.tokens"] == 2  # arrays: their lengths
    assert header["qwen2.rope.freq_base"] == 1e6 and header["general.quantized"] is True
    facts = preflight._gguf_facts(path)
    assert (facts.model_type, facts.max_positions, facts.source_kind) == ("qwen2", 32768, "gguf")
    assert facts.config["num_attention_heads"] == 14 and facts.config["num_key_value_heads"] == 2
    assert facts.config["vocab_size"] == 2  # no qwen2.vocab_size key: the token list's length


@pytest.mark.parametrize("data, said", [
    (b"GGML" + bytes(20), "not a GGUF file"),
    (_gguf(version=1), "GGUF version 1 is too old"),
    (_gguf(_kv("general.architecture", 8, _string("llama")), tensors=0)[:-3], "truncated GGUF header: 5 bytes expected"),
    (_gguf(_kv("general.architecture", 8, _string("llama")), _kv("llama.context_length", 4, b""), tensors=0),
     "4 bytes"),
    (_gguf(_kv("general.name", 8, _string("x"))), "names no general.architecture"),
    (_gguf(_kv("general.architecture", 99, b"")), "unknown GGUF value type 99"),
    # llama.cpp writes OLMo 2 GGUF files; transformers cannot load them: said at validate, not after "loading model"
    (_gguf(_kv("general.architecture", 8, _string("olmo2"))),
     "transformers cannot read a GGUF file of architecture 'olmo2' \\(it reads .*llama.*\\): give the model's "
     "Hugging Face directory"),
])
def test_a_broken_header_is_named_under_model_source(tmp_path, data, said):
    path = tmp_path / "broken.gguf"
    path.write_bytes(data)
    with pytest.raises(ModelLoadError, match=rf"model.source: .*broken.gguf: .*{said}"):
        preflight._gguf_facts(path)


@pytest.mark.parametrize("arch, model_type, family", [("gemma3", "gemma3_text", "gemma3"),
                                                      ("qwen2moe", "qwen2_moe", None), ("llama", "llama", "llama")])
def test_a_gguf_architecture_is_read_as_the_model_type_transformers_loads_it_as(tmp_path, arch, model_type, family):
    """llama.cpp names Gemma 3 `gemma3` and Qwen2-MoE `qwen2moe`; transformers loads them as gemma3_text and
    qwen2_moe. validate must see what the build will load (Gemma 3 is a described family)."""
    path = tmp_path / "m.gguf"
    path.write_bytes(_gguf(_kv("general.architecture", 8, _string(arch))))
    facts = preflight._gguf_facts(path)
    assert (facts.model_type, facts.family) == (model_type, family)


def test_a_gguf_mixture_of_experts_is_refused_by_the_generic_export_before_loading(tmp_path, capsys):
    """The expert count comes from the header (llama.cpp's `<arch>.expert_count`), so `validate` refuses a
    Qwen2-MoE GGUF on the generic route as it does the model's config.json."""
    from optpipe.cli import main

    from .conftest import tiny_recipe, write_recipe

    path = tmp_path / "moe.gguf"
    path.write_bytes(_gguf(_kv("general.architecture", 8, _string("qwen2moe")), _kv("qwen2moe.expert_count", 4,
                                                                                      struct.pack("<I", 8))))
    assert preflight._gguf_facts(path).config["num_experts"] == 8
    recipe = write_recipe(tmp_path, tiny_recipe(path, [{"name": "export"}, {"name": "quantize-int8"}]))
    assert main(["validate", str(recipe)]) == 2
    assert "a mixture of experts (8 experts)" in capsys.readouterr().err


def test_smollm2_gguf_header():
    facts = preflight.model_facts(ModelSpec(source="builtin:smollm2-135m"))
    assert (facts.model_type, facts.source_kind, facts.family) == ("llama", "gguf", "llama")
    assert facts.max_positions == 8192
    assert facts.config["num_attention_heads"] == 9 and facts.config["num_key_value_heads"] == 3
    assert facts.config["vocab_size"] == 49152
