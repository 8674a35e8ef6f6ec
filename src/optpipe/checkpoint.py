"""A safetensors checkpoint read tensor by tensor, for models larger than memory (the streaming build).

Nothing is loaded up front: `get(name)` opens the shard that holds the tensor (memory-mapped), copies that one
tensor out as float32 and closes the file, so the mapped pages never accumulate in the process's RSS.
"""
from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import ModelLoadError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


@dataclass
class LazyCheckpoint:
    directory: Path
    config: object  # transformers PretrainedConfig
    weight_map: dict[str, str]  # tensor name -> shard file name
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    dtypes: dict[str, str] = field(default_factory=dict)
    transforms: dict[str, Callable] = field(default_factory=dict)  # name -> fn(fp32 tensor) -> fp32 tensor

    @classmethod
    def open(cls, directory: str | Path, trust_remote_code: bool = False) -> LazyCheckpoint:
        from safetensors import safe_open
        from transformers import AutoConfig

        d = Path(directory)
        if (d / INDEX).is_file():
            weight_map = json.loads((d / INDEX).read_text(encoding="utf-8"))["weight_map"]
        elif (d / SINGLE).is_file():
            with safe_open(str(d / SINGLE), "pt") as f:
                weight_map = {k: SINGLE for k in f.keys()}
        else:
            raise ModelLoadError(f"model.source: {d} has neither {INDEX} nor {SINGLE} "
                                 "(streaming reads safetensors checkpoints)")
        try:
            config = AutoConfig.from_pretrained(str(d), local_files_only=True, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"model.source: {d}: cannot read config.json: {e}") from None
        ck = cls(d, config, weight_map)
        for shard in sorted(set(weight_map.values())):
            with safe_open(str(d / shard), "pt") as f:
                for k in f.keys():
                    sl = f.get_slice(k)
                    ck.shapes[k] = tuple(sl.get_shape())
                    ck.dtypes[k] = sl.get_dtype()
        missing = [k for k in weight_map if k not in ck.shapes]
        if missing:
            raise ModelLoadError(f"model.source: {d}: index names tensors missing from their shards: {missing[:3]}")
        return ck

    def transformed(self, fns: dict[str, Callable]) -> LazyCheckpoint:
        """A view in which the tensors `fns` names are rewritten as they are read (e.g. SmoothQuant's scales,
        computed by a streaming pass); the files on disk and this checkpoint are unchanged."""
        merged = dict(self.transforms)
        for name, fn in fns.items():
            if name not in self.weight_map:
                raise ModelLoadError(f"{self.directory}: tensor {name} not in the checkpoint")
            prev = merged.get(name)
            merged[name] = fn if prev is None else (lambda t, f=fn, g=prev: f(g(t)))
        return dataclasses.replace(self, transforms=merged)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def get_torch(self, name: str, rows: tuple[int, int] | None = None):
        """One tensor (or rows [start, end) of it) as a torch tensor in its stored dtype (fp32 when a transform
        rewrote it), owning its memory."""
        from safetensors import safe_open

        if name not in self.weight_map:
            raise ModelLoadError(f"{self.directory}: tensor {name} not in the checkpoint")
        fn = self.transforms.get(name)
        if fn is not None:
            import torch

            with safe_open(str(self.directory / self.weight_map[name]), "pt") as f:
                t = fn(f.get_tensor(name).to(torch.float32))
            return t if rows is None else t[rows[0]:rows[1]].clone()
        with safe_open(str(self.directory / self.weight_map[name]), "pt") as f:
            t = f.get_tensor(name) if rows is None else f.get_slice(name)[rows[0]:rows[1]]
            return t.clone()

    def get(self, name: str) -> np.ndarray:
        """One tensor as float32 numpy (bf16/fp16 shards are converted; the conversion is exact)."""
        import torch

        return self.get_torch(name).to(torch.float32).numpy()


class ModelWeights:
    """A model in memory seen through LazyCheckpoint's reading interface, so the layer-by-layer walk
    (`optpipe.layerwise`) serves the in-memory build as it serves the streaming one. Tensors are the model's own
    (not copied); the config is a copy, since the walk picks an attention implementation on it."""

    def __init__(self, model):
        self.config = copy.deepcopy(model.config)
        self.directory = Path("<in memory>")
        self._tensors = {k: v.detach() for k, v in model.state_dict().items()}
        self.weight_map = {k: "<in memory>" for k in self._tensors}
        self.shapes = {k: tuple(v.shape) for k, v in self._tensors.items()}

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def get_torch(self, name: str, rows: tuple[int, int] | None = None):
        if name not in self._tensors:
            raise ModelLoadError(f"the model in memory has no tensor {name}")
        t = self._tensors[name]
        return t if rows is None else t[rows[0]:rows[1]]
