"""The fp32 PyTorch eager runner: the reference every gate compares against (same Runner API as targets)."""
from __future__ import annotations

import time

import numpy as np
import torch

from .base import Generation


class TorchEagerRunner:
    def __init__(self, model, threads: int):
        self.model = model
        self.threads = threads

    def logits(self, ids: np.ndarray) -> np.ndarray:
        torch.set_num_threads(self.threads)
        with torch.inference_mode():
            out = self.model(torch.as_tensor(np.asarray(ids, dtype=np.int64)).reshape(1, -1), use_cache=False)
        return out.logits[0].float().numpy()

    def generate(self, ids: np.ndarray, max_new_tokens: int, eos_token_id: int | None = None) -> Generation:
        from transformers import DynamicCache

        torch.set_num_threads(self.threads)
        with torch.inference_mode():
            t0 = time.perf_counter()
            cache = DynamicCache(config=self.model.config)
            out = self.model(torch.as_tensor(np.asarray(ids, dtype=np.int64)).reshape(1, -1), past_key_values=cache,
                             use_cache=True)
            tok = int(out.logits[0, -1].argmax())
            t1 = time.perf_counter()
            tokens = [tok]
            nxt = torch.empty((1, 1), dtype=torch.long)
            while len(tokens) < max_new_tokens and tok != eos_token_id:
                nxt[0, 0] = tok
                out = self.model(nxt, past_key_values=out.past_key_values, use_cache=True)
                tok = int(out.logits[0, -1].argmax())
                tokens.append(tok)
            return Generation(tokens, t1 - t0, time.perf_counter() - t1)
