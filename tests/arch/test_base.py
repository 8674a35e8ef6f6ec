"""optpipe.arch.base: a family's description answers topology questions from a config alone (no weights): values
checked against hand-worked configs. The families' graphs and runners are tested in test_families.py."""
import pytest
import torch

from optpipe import arch
from optpipe.arch.base import activation, attention_scale, setting


def test_groups_follow_the_description():
    """o_proj reads v_proj's rows per query head: under grouped-query attention several o columns read one v row
    (`source_index`); the head is a group of its own only when it is not tied to the embedding."""
    from transformers import AutoConfig

    desc = arch.describe("qwen3")
    gqa = AutoConfig.for_model("qwen3", num_attention_heads=4, num_key_value_heads=2, head_dim=3,
                               tie_word_embeddings=False)
    mha = AutoConfig.for_model("qwen3", num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True)
    for config in (gqa, mha):
        assert [g.name for g in desc.groups(config)] == ["attn_qkv", "attn_o", "mlp_gate_up", "mlp_down"]
    attn_o = desc.groups(gqa)[1]
    assert desc.source_index(attn_o, gqa).tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 5, 3, 4, 5]
    assert desc.source_index(attn_o, mha) is None and desc.source_index(desc.groups(gqa)[0], gqa) is None
    assert desc.head_group(gqa).members == ("lm_head",) and desc.head_group(gqa).source == "model.norm"
    assert desc.head_group(mha) is None
    assert desc.input_of("self_attn.qkv_proj") == desc.input_of("self_attn.v_proj") == "self_attn.q_proj"
    with pytest.raises(KeyError):
        desc.input_of("self_attn.q_norm")


def test_unknown_family_is_named_with_the_described_ones():
    with pytest.raises(arch.UnsupportedArchitecture, match="'gpt2' has no architecture description.*llama"):
        arch.describe({"model_type": "gpt2"})


def test_settings_read_config_objects_and_json_dicts_alike():
    """The preflight reads config.json (a dict) and passes read transformers configs: one answer for both, and a
    key set to null counts as absent."""
    from types import SimpleNamespace

    for config in ({"hidden_size": 8, "head_dim": None}, SimpleNamespace(hidden_size=8, head_dim=None)):
        assert setting(config, "hidden_size") == 8
        assert setting(config, "head_dim", 2) == 2 and setting(config, "missing", "d") == "d"


@pytest.mark.parametrize("config, expect", [
    ({"num_hidden_layers": 3, "sliding_window": 4}, [4, 4, 4]),  # Mistral: every layer
    ({"num_hidden_layers": 3, "sliding_window": 4, "use_sliding_window": False}, [None] * 3),  # Qwen2's switch
    ({"num_hidden_layers": 3, "sliding_window": None}, [None] * 3),
    ({"num_hidden_layers": 3, "sliding_window": 4,
      "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]}, [4, None, 4]),  # per layer
])
def test_windows_per_layer(config, expect):
    assert arch.describe("mistral").windows(config) == expect
    assert arch.describe("llama").windows(config) == [None] * 3  # a family that does not honour windows


def test_scale_norm_divides_what_the_norm_multiplies_by():
    """Gemma multiplies by (1 + w): dividing that product by s gives w' = (1 + w) / s - 1, not w / s."""
    s = torch.tensor([2.0, 4.0])
    llama_w, gemma_w = torch.tensor([1.0, 2.0]), torch.tensor([1.0, 3.0])
    arch.describe("llama").scale_norm(llama_w, s)
    arch.describe("gemma2").scale_norm(gemma_w, s)
    assert llama_w.tolist() == [0.5, 0.5]
    assert gemma_w.tolist() == [0.0, 0.0]  # (1 + 1) / 2 - 1, (1 + 3) / 4 - 1


def test_packed_checkpoints_have_no_member_linears():
    """Phi-3 stores qkv and gate_up packed: two groups, each scaled only through its norm, nothing to fuse."""
    phi3 = arch.describe("phi3")
    assert [g.members for g in phi3.groups({})] == [("self_attn.qkv_proj",), ("mlp.gate_up_proj",)]
    assert phi3.fused == {} and "self_attn.q_proj" not in phi3.linears
    llama = arch.describe("llama")
    assert llama.fused["mlp.gate_up_proj"] == ("mlp.gate_proj", "mlp.up_proj")
    assert llama.layer_prefix(3) == "model.layers.3."


@pytest.mark.parametrize("model_type", arch.supported())
def test_decode_matmuls_are_the_models_linears(model_type):
    """What a decode step multiplies by, from the config alone, is every nn.Linear of the model transformers builds
    from that config (shape and count), the head included; head_dim unlike hidden/heads (Qwen3, Gemma) counts."""
    from collections import Counter

    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, vocab_size=96, pad_token_id=0, hidden_size=32, intermediate_size=48,
                                  num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    linears = Counter(tuple(m.weight.shape) for m in model.modules() if isinstance(m, torch.nn.Linear))
    got = arch.describe(model_type).decode_matmuls(config)
    assert {(out, n_in): count for out, n_in, count in got} == linears
    assert arch.describe(model_type).decode_matmuls(config.to_dict()) == got  # the preflight's JSON dict alike
    with pytest.raises(TypeError):
        arch.describe(model_type).decode_matmuls({"hidden_size": 32, "num_attention_heads": 4})


@pytest.mark.parametrize("config, expect", [
    ({"hidden_act": "silu"}, None),
    ({"hidden_act": "gelu"}, "MLP activation 'gelu'"),
    ({"hidden_activation": "gelu_pytorch_tanh", "hidden_act": "gelu"}, None),  # Gemma's key wins
    ({"use_bidirectional_attention": True}, "use_bidirectional_attention"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor 0.5"),
    ({"rope_scaling": {"rope_type": "longrope", "original_max_position_embeddings": 64}}, "past 64 positions"),
    ({"rope_scaling": {"type": "longrope", "original_max_position_embeddings": 4096}}, None),
])
def test_what_export_cannot_write_is_named(config, expect):
    why = arch.describe("llama").unsupported(config, max_positions=128)
    assert why is None if expect is None else expect in why


def test_activation_and_attention_scale():
    assert activation({}) == "silu" and activation({"hidden_act": "gelu_new"}) == "gelu_tanh"
    assert activation({"hidden_act": "relu"}) is None
    assert attention_scale({}, 64) == 0.125
    assert attention_scale({"query_pre_attn_scalar": 256}, 64) == 1 / 16  # Gemma scales by its own scalar
