"""`cpu-torch`: a PyTorch-native CPU artifact — plain tensors in safetensors, no pickled modules.

Layout (docs/recipes.md, "cpu-torch artifact"):
- `weights.safetensors`: the model's state dict. A quantized Linear `<name>` is stored as `<name>.qweight`
  (int4: uint8 [out, in/2], even input column in the low nibble; int8: int8 [out, in]), `<name>.scales`
  and, for int4, `<name>.zeros` (bf16 [out, in/group]: w = (q - 8) * scale + zero).
- `quantization.json`: which modules are quantized and how (kind, shapes, group size).
- `config.json`: the transformers config; `runtime.json`: KV cache mode/length, compile flag, dtype.
- `tokenizer/`.
Loading builds the architecture from config.json on the meta device, swaps in the quantized modules and
assigns the tensors, so it needs neither the original checkpoint nor the memory for a float copy of it.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..runtime.torch_artifact import LAYOUT_FILE, RUNTIME_FILE, TOKENIZER_DIR, WEIGHTS_FILE, load_torch_artifact
from ..runtime.torch_modules import TorchRunner, quantized_layout
from .base import TargetBase


def _state_dict_without_ties(model) -> dict[str, torch.Tensor]:
    sd = model.state_dict()
    seen: set[tuple] = set()
    out = {}
    for name, t in sd.items():
        key = (t.data_ptr(), t.dtype, tuple(t.shape))
        if t.numel() and key in seen:
            continue  # tied weight (lm_head = embed_tokens): stored once, re-tied on load
        seen.add(key)
        out[name] = t.detach().contiguous()
    return out


class CpuTorchTarget(TargetBase):
    name = "cpu-torch"
    final_stage = "torch"

    def save(self, state, directory: Path) -> dict:
        from safetensors.torch import save_file

        directory.mkdir(parents=True, exist_ok=True)
        model = state.torch_model
        layout = quantized_layout(model)
        tensors = _state_dict_without_ties(model)
        save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": "optpipe-cpu-torch/1"})
        model.config.to_json_file(str(directory / "config.json"))
        (directory / LAYOUT_FILE).write_text(json.dumps(layout, indent=1, sort_keys=True), encoding="utf-8")
        dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()})
        runtime = {"kv_cache": state.handoff.kv_cache.as_dict(), "compile": state.handoff.compile, "dtypes": dtypes,
                   "fused": [[parent, fused, list(parts)] for parent, fused, parts in state.handoff.fused_projections],
                   "tied_embeddings": bool(getattr(model.config, "tie_word_embeddings", False))}
        (directory / RUNTIME_FILE).write_text(json.dumps(runtime, indent=1), encoding="utf-8")
        if state.tokenizer is not None:
            state.tokenizer.save_pretrained(str(directory / TOKENIZER_DIR))
        kinds: dict[str, int] = {}
        for entry in layout.values():
            kinds[entry["kind"]] = kinds.get(entry["kind"], 0) + 1
        return {"format": "safetensors", "weights_file": WEIGHTS_FILE, "layout_file": LAYOUT_FILE,
                "runtime_file": RUNTIME_FILE, "tokenizer_dir": TOKENIZER_DIR if state.tokenizer is not None else None,
                "runtime": f"torch {torch.__version__} CPU (aten int4/int8 kernels)", "quantized_modules": kinds,
                **runtime}

    def load(self, directory: Path, threads: int) -> TorchRunner:
        return load_torch_artifact(Path(directory), threads)
