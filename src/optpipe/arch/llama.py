"""Llama-shaped decoders: RMSNorm before attention and MLP, rotary GQA, SwiGLU MLP, optional tied head.
Mistral and Qwen2 share the layout (Qwen2 with q/k/v biases, read from the weights); Qwen3 adds a per-head
RMSNorm of q and k; Phi-3 stores q/k/v and gate/up packed, one linear each."""
from .base import ArchDescription

LLAMA = ArchDescription("llama", ("llama",), notes="SmolLM2, Llama 2 and 3.x (rope scaling from the config)")
MISTRAL = ArchDescription("mistral", ("mistral",), sliding_window=True, notes="sliding window on every layer")
QWEN2 = ArchDescription("qwen2", ("qwen2",), sliding_window=True, notes="q/k/v biases; sliding window per layer type")
QWEN3 = ArchDescription("qwen3", ("qwen3",), qk_norm=("self_attn.q_norm", "self_attn.k_norm"), sliding_window=True,
                        notes="q/k RMSNorm per head before rotary; sliding window per layer type")

PHI3 = ArchDescription("phi3", ("phi3",), packed=True, sliding_window=True,
                       notes="q/k/v and gate/up packed in the checkpoint; longrope up to its original length")

FAMILIES = (LLAMA, MISTRAL, QWEN2, QWEN3, PHI3)
