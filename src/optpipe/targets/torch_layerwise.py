"""The fp32 reference for models larger than memory: the same eager PyTorch modules, one decoder layer at a time.

Each forward reads a layer's weights from the checkpoint, runs it, and drops it before the next; the embedding
rows and the head are read the same way (the head in row chunks), so memory holds about one layer
(`optpipe.layerwise`). This computes what the eager fp32 model computes (same transformers modules, same order),
only slower, because every forward reads the weights again. The manifest states that the reference was computed
this way.
"""
from __future__ import annotations

import numpy as np
import torch

from ..layerwise import CheckpointLayers
from ..progress import track
from ..runtime.generation import Generation, OnToken, Pick, decode


class LayerwiseReference:
    kind = "fp32 eager, layer by layer from the checkpoint (the model does not fit in memory)"

    def __init__(self, checkpoint, threads: int):
        self.layers = CheckpointLayers(checkpoint)
        self.threads = threads
        self.config = self.layers.config

    def with_threads(self, threads: int):
        """This runner at another thread count (torch reads the count at each call)."""
        self.threads = threads
        return self

    def _forward(self, ids: torch.Tensor, cache, past: int) -> torch.Tensor:
        m = self.layers
        h = m.embed(ids)
        pos = torch.arange(past, past + ids.numel()).unsqueeze(0)
        for i in track(range(m.num_layers), desc="fp32 reference (layer by layer)", unit="layer", leave=False,
                       log=False):
            layer = m.layer(i)
            h = m.run_layer(i, layer, h, pos, cache)
            del layer
        return m.head(m.final_norm(h)[0])

    def logits(self, ids: np.ndarray) -> np.ndarray:
        torch.set_num_threads(self.threads)
        with torch.inference_mode():
            return self._forward(torch.as_tensor(np.asarray(ids, dtype=np.int64)), None, 0).numpy()

    @property
    def max_length(self) -> int:
        return int(getattr(self.config, "max_position_embeddings", 0) or 1 << 31)

    def generate(self, ids: np.ndarray, max_new_tokens: int, eos_token_id: int | None = None,
                 pick: Pick | None = None, on_token: OnToken | None = None) -> Generation:
        torch.set_num_threads(self.threads)
        ids_t = torch.as_tensor(np.asarray(ids, dtype=np.int64))
        cache = self.layers.new_cache()
        with torch.inference_mode():
            return decode(lambda: self._forward(ids_t, cache, 0)[-1].numpy(),
                          lambda tok, position: self._forward(torch.tensor([tok]), cache, position)[-1].numpy(),
                          ids_t.numel(), max_new_tokens, eos_token_id, pick, on_token)
