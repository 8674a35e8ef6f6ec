"""Gemma 2 and Gemma 3 text decoders: `1 + w` RMSNorms before and after both attention and MLP, embeddings scaled by
sqrt(hidden), GELU-tanh MLP, query scaling from `query_pre_attn_scalar`, sliding-window and global layers
(`layer_types`), each layer type with its own rotary base (Gemma 3). Gemma 2 soft-caps attention logits and final
logits (read from the config); Gemma 3 adds per-head q/k norms."""
from .base import ArchDescription

_GEMMA = dict(mlp_norm="pre_feedforward_layernorm", attn_out_norm="post_attention_layernorm",
              mlp_out_norm="post_feedforward_layernorm", norm_offset=1.0, embed_scale=True, sliding_window=True)

GEMMA2 = ArchDescription("gemma2", ("gemma2",), notes="soft-capped attention and final logits", **_GEMMA)
GEMMA3 = ArchDescription("gemma3", ("gemma3_text",), qk_norm=("self_attn.q_norm", "self_attn.k_norm"),
                         modeling_module="gemma3", notes="text model; a rotary base per layer type", **_GEMMA)

FAMILIES = (GEMMA2, GEMMA3)
