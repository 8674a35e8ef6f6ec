"""The fp32 PyTorch eager runner: the reference every gate compares against (same Runner API as targets)."""
from __future__ import annotations

from ..runtime.torch_modules import TorchRunner


class TorchEagerRunner(TorchRunner):
    """The unoptimized model as users run it today: eager, fp32, a growing (dynamic) KV cache."""

    def __init__(self, model, threads: int):
        super().__init__(model, threads, {"mode": "dynamic"}, compile=False)
