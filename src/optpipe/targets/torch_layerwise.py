"""The fp32 reference for models larger than memory: the same eager PyTorch modules, one decoder layer at a time.

Each forward reads a layer's weights from the checkpoint, runs it, and drops it before the next; the embedding
rows and the head are read the same way (the head in row chunks), so memory holds about one layer
(`optpipe.layerwise`). This computes what the eager fp32 model computes (same transformers modules, same order),
only slower, because every forward reads the weights again. The manifest states that the reference was computed
this way.
"""
from __future__ import annotations

import time

import numpy as np
import torch
from tqdm import tqdm

from ..layerwise import CheckpointLayers
from ..models import dynamic_cache
from .base import Generation


class LayerwiseReference:
    kind = "fp32 eager, layer by layer from the checkpoint (the model does not fit in memory)"

    def __init__(self, checkpoint, threads: int):
        self.layers = CheckpointLayers(checkpoint)
        self.threads = threads
        self.config = self.layers.config

    def _forward(self, ids: torch.Tensor, cache, past: int) -> torch.Tensor:
        m = self.layers
        h = m.embed(ids)
        pos = torch.arange(past, past + ids.numel()).unsqueeze(0)
        for i in tqdm(range(m.num_layers), desc="fp32 reference (layer by layer)", unit="layer", leave=False,
                      disable=m.num_layers < 8):
            layer = m.layer(i)
            h = m.run_layer(layer, h, pos, cache)
            del layer
        return m.head(m.final_norm(h)[0])

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
