"""The fp32 reference for models larger than memory: the same eager PyTorch modules, one decoder layer at a time.

Each forward reads a layer's weights from the checkpoint (converted to fp32), runs it, and drops it before the
next, so memory holds one layer plus the embedding and head. It computes exactly what the eager fp32 model
computes (same transformers modules, same order); only slower, because every forward reads the weights again.
The manifest states that the reference was computed this way.
"""
from __future__ import annotations

import importlib
import time

import numpy as np
import torch
from tqdm import tqdm

from .base import Generation


def _modeling(config):
    mt = config.model_type
    return importlib.import_module(f"transformers.models.{mt}.modeling_{mt}")


def _class(mod, suffix: str):
    return next(getattr(mod, n) for n in sorted(dir(mod)) if n.endswith(suffix) and not n.startswith("_"))


class LayerwiseReference:
    kind = "fp32 eager, layer by layer from the checkpoint (the model does not fit in memory)"

    def __init__(self, checkpoint, threads: int):
        from ..passes.export import rotary_module

        self.ck = checkpoint
        self.threads = threads
        self.config = checkpoint.config
        self.config._attn_implementation = "sdpa"
        mod = _modeling(self.config)
        self.layer_cls = _class(mod, "DecoderLayer")
        self.norm_cls = _class(mod, "RMSNorm")
        self.rotary = rotary_module(self.config)
        self._embed = None
        self._head = None

    def _tensor(self, name: str) -> torch.Tensor:
        return torch.from_numpy(self.ck.get(name))

    def _layer(self, i: int):
        prefix = f"model.layers.{i}."
        with torch.device("meta"):
            layer = self.layer_cls(self.config, i)
        state = {k[len(prefix):]: self._tensor(k) for k in self.ck.weight_map if k.startswith(prefix)}
        layer.load_state_dict(state, assign=True, strict=True)
        return layer.eval()

    def _ends(self):
        if self._embed is None:
            self._embed = self._tensor("model.embed_tokens.weight")
            head = "lm_head.weight" if "lm_head.weight" in self.ck else "model.embed_tokens.weight"
            self._head = self._embed if head == "model.embed_tokens.weight" else self._tensor(head)
            with torch.device("meta"):
                norm = self.norm_cls(self.config.hidden_size, eps=self.config.rms_norm_eps)
            norm.load_state_dict({"weight": self._tensor("model.norm.weight")}, assign=True)
            self._norm = norm
        return self._embed, self._norm, self._head

    def _forward(self, ids: torch.Tensor, cache, past: int) -> torch.Tensor:
        embed, norm, head = self._ends()
        h = embed[ids].unsqueeze(0)
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
        return norm(h)[0] @ head.T

    def logits(self, ids: np.ndarray) -> np.ndarray:
        torch.set_num_threads(self.threads)
        with torch.inference_mode():
            return self._forward(torch.as_tensor(np.asarray(ids, dtype=np.int64)), None, 0).numpy()

    def generate(self, ids: np.ndarray, max_new_tokens: int, eos_token_id: int | None = None) -> Generation:
        from transformers import DynamicCache

        torch.set_num_threads(self.threads)
        ids_t = torch.as_tensor(np.asarray(ids, dtype=np.int64))
        with torch.inference_mode():
            t0 = time.perf_counter()
            try:
                cache = DynamicCache(config=self.config)
            except TypeError:  # transformers < 4.56
                cache = DynamicCache()
            tok = int(self._forward(ids_t, cache, 0)[-1].argmax())
            t1 = time.perf_counter()
            tokens = [tok]
            while len(tokens) < max_new_tokens and tok != eos_token_id:
                past = ids_t.numel() + len(tokens) - 1
                tok = int(self._forward(torch.tensor([tok]), cache, past)[-1].argmax())
                tokens.append(tok)
        return Generation(tokens, t1 - t0, time.perf_counter() - t1)
