"""The fp32 reference for models larger than memory: the same eager PyTorch modules, one decoder layer at a time.

Each forward reads a layer's weights from the checkpoint, runs it, and drops it before the next; the embedding
rows and the head are read the same way (the head in row chunks), so memory holds about one layer. Weights stay
in their stored dtype and each matmul upcasts its weight to fp32 as it runs: activations and arithmetic are
fp32 throughout, and bf16/fp16 -> fp32 is exact, so this computes what the eager fp32 model computes (same
transformers modules, same order), only slower, because every forward reads the weights again. The manifest
states that the reference was computed this way.
"""
from __future__ import annotations

import time

import numpy as np
import torch
from tqdm import tqdm

from ..models import architecture_class, dynamic_cache
from .base import Generation


class _Fp32Linear(torch.nn.Linear):
    """A Linear whose weight stays in its stored dtype and is upcast to fp32 for each matmul."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight.float(), None if self.bias is None else self.bias.float())


class LayerwiseReference:
    kind = "fp32 eager, layer by layer from the checkpoint (the model does not fit in memory)"

    def __init__(self, checkpoint, threads: int):
        from ..passes.export import rotary_module

        self.ck = checkpoint
        self.threads = threads
        self.config = checkpoint.config
        self.config._attn_implementation = "sdpa"
        self.layer_cls = architecture_class(self.config, "DecoderLayer")
        self.norm_cls = architecture_class(self.config, "RMSNorm")
        self.rotary = rotary_module(self.config)

    def _layer(self, i: int):
        prefix = f"model.layers.{i}."
        with torch.device("meta"):
            layer = self.layer_cls(self.config, i)
        state = {k[len(prefix):]: self.ck.get_torch(k) for k in self.ck.weight_map if k.startswith(prefix)}
        layer.load_state_dict(state, assign=True, strict=True)
        for mod in layer.modules():
            if type(mod) is torch.nn.Linear:
                mod.__class__ = _Fp32Linear  # not a bound-method attribute: that cycle would keep layers alive
            else:
                for name, p in list(mod.named_parameters(recurse=False)):
                    setattr(mod, name, torch.nn.Parameter(p.detach().float(), requires_grad=False))
        return layer.eval()

    def _logits(self, h: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
        with torch.device("meta"):
            norm = self.norm_cls(self.config.hidden_size, eps=self.config.rms_norm_eps)
        norm.load_state_dict({"weight": self.ck.get_torch("model.norm.weight").float()}, assign=True)
        x = norm(h)[0]
        head = "lm_head.weight" if "lm_head.weight" in self.ck else "model.embed_tokens.weight"
        vocab = self.ck.shapes[head][0]
        return torch.cat([x @ self.ck.get_torch(head, (r, min(r + chunk, vocab))).float().T
                          for r in range(0, vocab, chunk)], dim=-1)

    def _forward(self, ids: torch.Tensor, cache, past: int) -> torch.Tensor:
        h = self.ck.get_torch("model.embed_tokens.weight")[ids].float().unsqueeze(0)
        pos = torch.arange(past, past + ids.numel()).unsqueeze(0)
        pe = self.rotary(h, pos)
        layers = range(self.config.num_hidden_layers)
        for i in tqdm(layers, desc="fp32 reference (layer by layer)", unit="layer", leave=False,
                      disable=len(layers) < 8):
            layer = self._layer(i)
            h = layer(h, attention_mask=None, position_ids=pos, past_key_values=cache, use_cache=cache is not None,
                      position_embeddings=pe)
            h = h[0] if isinstance(h, tuple) else h
            del layer
        return self._logits(h)

    def logits(self, ids: np.ndarray) -> np.ndarray:
        torch.set_num_threads(self.threads)
        with torch.inference_mode():
            return self._forward(torch.as_tensor(np.asarray(ids, dtype=np.int64)), None, 0).numpy()

    def generate(self, ids: np.ndarray, max_new_tokens: int, eos_token_id: int | None = None) -> Generation:
        torch.set_num_threads(self.threads)
        ids_t = torch.as_tensor(np.asarray(ids, dtype=np.int64))
        with torch.inference_mode():
            t0 = time.perf_counter()
            cache = dynamic_cache(self.config)
            tok = int(self._forward(ids_t, cache, 0)[-1].argmax())
            t1 = time.perf_counter()
            tokens = [tok]
            while len(tokens) < max_new_tokens and tok != eos_token_id:
                past = ids_t.numel() + len(tokens) - 1
                tok = int(self._forward(torch.tensor([tok]), cache, past)[-1].argmax())
                tokens.append(tok)
        return Generation(tokens, t1 - t0, time.perf_counter() - t1)
