"""What passes hand to the target, typed: the only channel between the two (passes never import targets, targets
never import passes). Every field has one writer kind and is read by the targets that need it."""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Literal


@dataclass
class KVCacheLayout:
    """How the artifact keeps its KV cache: grown per step, or one preallocated buffer of `max_length` per layer."""

    mode: Literal["dynamic", "static"] = "dynamic"
    max_length: int | None = None

    def as_dict(self) -> dict:
        return {"mode": self.mode} if self.mode == "dynamic" else {"mode": self.mode, "max_length": self.max_length}


@dataclass
class Handoff:
    """Written by passes, read by the target's `save`."""

    kv_cache: KVCacheLayout = field(default_factory=KVCacheLayout)  # static-kv-cache (ONNX and torch)
    compile: bool = False  # cpu-torch static-kv-cache: torch.compile the forward at load
    fused_projections: list[tuple[str, str, tuple[str, ...]]] = field(default_factory=list)  # cpu-torch fuse
    quantized: dict[str, str] = field(default_factory=dict)  # weight (node or module) -> scheme, every quantize pass
    unquantized: dict[str, str] = field(default_factory=dict)  # weight -> why a selected weight was left float
    float32_islands: list[str] = field(default_factory=list)  # fp16: ops kept in float32 inside casts
    ipex: dict | None = None  # ipex-optimize: what IPEX applies when the artifact loads

    def quantized_summary(self) -> dict[str, int]:
        """scheme -> number of weights: what the manifest records (the per-weight map can be thousands long)."""
        return dict(sorted(Counter(self.quantized.values()).items()))


__all__ = ["Handoff", "KVCacheLayout", "asdict"]
