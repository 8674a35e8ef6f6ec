"""What a model family's decoder looks like, said once: module paths, which linears read the same input and which
module produces it, what export must emit (q/k norms, extra norms, norm offset, embedding scale; biases, the
activation, attention scale and soft-capping are read from the weights and config). Passes that need a layer's topology
(export, fuse, smoothquant, awq, GPTQ in memory and streaming, the layer-by-layer walk, torch fuse) read it here
instead of spelling out `self_attn.q_proj` each."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Literal


def setting(config, key: str, default=None):
    """A config value from a transformers config object or its JSON dict (the preflight reads JSON)."""
    value = config.get(key, default) if isinstance(config, dict) else getattr(config, key, default)
    return default if value is None else value


@dataclass(frozen=True)
class LinearGroup:
    """Linears of a decoder layer that read the same input.

    `source` is the module whose output that input is, and `source_kind` says how a per-input-channel scale can be
    moved into it: a norm's weight is divided by s, a linear's output rows are (SmoothQuant/AWQ). `fused` names the
    one linear the members become when fused. `per_query_head`: the members' input columns are the source's rows
    repeated per query head (o_proj reads v_proj's output head by head; with grouped-query attention one v row feeds
    every query head of its group), so one scale per source row serves several columns (`source_index`)."""

    name: str
    members: tuple[str, ...]
    source: str
    source_kind: Literal["norm", "linear"]
    fused: str | None = None
    per_query_head: bool = False


@dataclass(frozen=True)
class ArchDescription:
    """One family's decoder. Module paths are relative to a decoder layer unless they say otherwise."""

    family: str
    model_types: tuple[str, ...]
    layers: str = "model.layers"
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    attn_norm: str = "input_layernorm"
    mlp_norm: str = "post_attention_layernorm"
    q: str = "self_attn.q_proj"
    k: str = "self_attn.k_proj"
    v: str = "self_attn.v_proj"
    o: str = "self_attn.o_proj"
    gate: str = "mlp.gate_proj"
    up: str = "mlp.up_proj"
    down: str = "mlp.down_proj"
    qkv_fused: str = "self_attn.qkv_proj"
    gate_up_fused: str = "mlp.gate_up_proj"
    packed: bool = False  # the checkpoint itself holds qkv_fused and gate_up_fused (Phi-3); q..up are not modules
    qk_norm: tuple[str, str] | None = None  # per-head RMSNorm of q and k before rotary (Qwen3)
    attn_out_norm: str | None = None  # a norm of the attention output before the residual add (Gemma)
    mlp_out_norm: str | None = None  # a norm of the MLP output before the residual add (Gemma)
    norm_offset: float = 0.0  # RMSNorm multiplies by (offset + weight): Gemma's `1 + w`
    embed_scale: bool = False  # input embeddings times sqrt(hidden_size) (Gemma)
    modeling_module: str | None = None  # transformers.models.<this> when it is not the model_type (gemma3_text)
    sliding_window: bool = False  # the family honours the config's sliding_window / layer_types
    notes: str = ""

    def groups(self, config) -> tuple[LinearGroup, ...]:
        """The layer's linear groups in execution order."""
        if self.packed:  # v and up are row slices of a packed linear: they cannot take a scale of their own
            return (LinearGroup("attn_qkv", (self.qkv_fused,), self.attn_norm, "norm"),
                    LinearGroup("mlp_gate_up", (self.gate_up_fused,), self.mlp_norm, "norm"))
        groups = (LinearGroup("attn_qkv", (self.q, self.k, self.v), self.attn_norm, "norm", self.qkv_fused),
                  LinearGroup("attn_o", (self.o,), self.v, "linear", per_query_head=True),
                  LinearGroup("mlp_gate_up", (self.gate, self.up), self.mlp_norm, "norm", self.gate_up_fused),
                  LinearGroup("mlp_down", (self.down,), self.up, "linear"))
        return groups

    def head_group(self, config) -> LinearGroup | None:
        """The final norm feeding lm_head (paths from the model's root), or None when the head is tied to the input
        embedding: a scale in its columns would scale the embedding too."""
        if setting(config, "tie_word_embeddings", True):
            return None
        return LinearGroup("lm_head", (self.lm_head,), self.final_norm, "norm")

    def source_index(self, group: LinearGroup, config):
        """For each input column of the group's members, the source channel it reads: None when column i reads
        channel i; for `per_query_head` groups under grouped-query attention, a LongTensor of kv-row indices."""
        heads = int(setting(config, "num_attention_heads"))
        kv_heads = int(setting(config, "num_key_value_heads", heads))
        if not group.per_query_head or kv_heads == heads:
            return None
        import torch

        head_dim = int(setting(config, "head_dim", 0) or setting(config, "hidden_size") // heads)
        kv_of_head = torch.arange(heads) // (heads // kv_heads)
        return (kv_of_head[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)

    def decode_matmuls(self, config) -> tuple[tuple[int, int, int], ...]:
        """(out, in, count) of the weight matrices one decoded token is multiplied by: each layer's linears and the
        head, from the config's widths alone (to time a decode step before any weight is read). TypeError where the
        config does not give a width."""
        hidden, heads = int(setting(config, "hidden_size")), int(setting(config, "num_attention_heads"))
        kv, inter = int(setting(config, "num_key_value_heads", heads)), int(setting(config, "intermediate_size"))
        head_dim = int(setting(config, "head_dim", 0) or hidden // heads)
        if self.packed:
            layer = [((heads + 2 * kv) * head_dim, hidden), (2 * inter, hidden)]
        else:
            layer = [(heads * head_dim, hidden), (kv * head_dim, hidden), (kv * head_dim, hidden), (inter, hidden),
                     (inter, hidden)]
        layer += [(hidden, heads * head_dim), (hidden, inter)]  # o and down
        head = (int(setting(config, "vocab_size")), hidden)
        counts = Counter(layer * int(setting(config, "num_hidden_layers")) + [head])
        return tuple((out, n_in, count) for (out, n_in), count in counts.items())

    @property
    def linears(self) -> tuple[str, ...]:
        """The layer's linear modules as the checkpoint holds them."""
        if self.packed:
            return (self.qkv_fused, self.o, self.gate_up_fused, self.down)
        return (self.q, self.k, self.v, self.o, self.gate, self.up, self.down)

    @property
    def fused(self) -> dict[str, tuple[str, ...]]:
        """Fused linear -> the linears it stands for, in row order (none when the checkpoint is packed)."""
        if self.packed:
            return {}
        return {self.qkv_fused: (self.q, self.k, self.v), self.gate_up_fused: (self.gate, self.up)}

    def input_of(self, linear: str) -> str:
        """The module (a member linear) whose input is the input of `linear`, a member or a fused name."""
        for fused, members in self.fused.items():
            if linear == fused or linear in members:
                return members[0]
        if linear in self.linears:
            return linear
        raise KeyError(linear)

    def layer_prefix(self, i: int) -> str:
        return f"{self.layers}.{i}."

    def windows(self, config) -> list[int | None]:
        """Per decoder layer: the sliding attention window, or None for full causal attention. A config with
        `layer_types` says it per layer (Qwen2/3's max_window_layers end up there); otherwise `sliding_window`
        applies to every layer (Mistral)."""
        layers = int(setting(config, "num_hidden_layers", 0))
        window = setting(config, "sliding_window")
        if not self.sliding_window or not window or setting(config, "use_sliding_window", True) is False:
            return [None] * layers
        types = setting(config, "layer_types")
        if types:
            return [int(window) if t == "sliding_attention" else None for t in types]
        return [int(window)] * layers

    def scale_norm(self, weight, s) -> None:
        """Divide what a norm multiplies by (`offset + weight`) by s, in place: SmoothQuant/AWQ move s into the
        linears that read the norm."""
        if self.norm_offset:
            weight.add_(self.norm_offset).div_(s).sub_(self.norm_offset)
        else:
            weight.div_(s)

    def unsupported(self, config, max_positions: int) -> str | None:
        """Why export cannot write `config`'s decoder for `max_positions` positions, or None."""
        if activation(config) is None:
            act = setting(config, "hidden_activation", setting(config, "hidden_act"))
            return f"MLP activation {act!r}: export writes SiLU- or tanh-GELU-gated MLPs"
        if setting(config, "use_bidirectional_attention", False):
            return "use_bidirectional_attention: export writes causal attention"
        rope = setting(config, "rope_parameters") or setting(config, "rope_scaling") or {}
        partial = setting(config, "partial_rotary_factor", rope.get("partial_rotary_factor", 1.0)
                          if isinstance(rope, dict) else 1.0)
        if float(partial) != 1.0:
            return (f"partial_rotary_factor {partial}: export rotates every channel of a head (partial rotary is "
                    "not described yet)")
        original = rope.get("original_max_position_embeddings") if isinstance(rope, dict) else None
        if isinstance(rope, dict) and rope.get("rope_type", rope.get("type")) == "longrope" and original \
                and max_positions > int(original):
            return (f"longrope switches to its long factors past {original} positions, for the whole sequence; a "
                    f"precomputed rotary table cannot: set export.max_positions to {original} or less")
        return None


def activation(config) -> str | None:
    """The gated MLP's activation as export writes it: "silu", "gelu_tanh", or None when it cannot."""
    act = setting(config, "hidden_activation", setting(config, "hidden_act", "silu"))
    return {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh",
            "gelu_new": "gelu_tanh"}.get(act)


def attention_scale(config, head_dim: int) -> float:
    """Query scaling: 1/sqrt(query_pre_attn_scalar) where the config sets it (Gemma), else 1/sqrt(head_dim)."""
    return float(setting(config, "query_pre_attn_scalar", head_dim)) ** -0.5
