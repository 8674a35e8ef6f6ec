"""Reading a cpu-torch artifact (layout: docs/recipes.md and targets/cpu_torch.py): build the architecture from
config.json on the meta device, put the quantized modules and packed projections back, assign the tensors."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import ArtifactError
from .torch_modules import QUANTIZED_MODULES, TorchRunner, build_quantized, fuse_projections, set_module

WEIGHTS_FILE = "weights.safetensors"
LAYOUT_FILE = "quantization.json"
RUNTIME_FILE = "runtime.json"
TOKENIZER_DIR = "tokenizer"


def load_torch_artifact(directory: Path, threads: int) -> TorchRunner:
    model, runtime = load_model(directory)
    return TorchRunner(model, threads, runtime["kv_cache"], compile=runtime.get("compile", False))


def load_model(directory: Path):
    """(model, runtime.json) from a cpu-torch artifact directory."""
    from accelerate import init_empty_weights
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    for f in (WEIGHTS_FILE, LAYOUT_FILE, RUNTIME_FILE, "config.json"):
        if not (directory / f).is_file():
            raise ArtifactError(f"{directory}: {f} is missing (not a cpu-torch artifact?)")
    runtime = json.loads((directory / RUNTIME_FILE).read_text(encoding="utf-8"))
    layout = json.loads((directory / LAYOUT_FILE).read_text(encoding="utf-8"))
    config = AutoConfig.from_pretrained(str(directory), local_files_only=True)
    # parameters on meta (the artifact fills them); buffers computed as usual, since the non-persistent ones
    # (rotary frequencies, Gemma's embedding scale) are in no state dict
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
    if runtime.get("fused"):
        fuse_projections(model, [(p, f, tuple(parts)) for p, f, parts in runtime["fused"]], device="meta")
    for name, entry in layout.items():
        set_module(model, name, build_quantized(entry, device="meta"))
    tensors = load_file(str(directory / WEIGHTS_FILE))
    result = model.load_state_dict(tensors, strict=False, assign=True)
    if result.unexpected_keys:
        raise ArtifactError(f"{directory / WEIGHTS_FILE}: tensors the model does not have: {result.unexpected_keys[:5]}")
    if runtime.get("tied_embeddings"):
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    missing = [k for k in result.missing_keys if not (runtime.get("tied_embeddings") and k.startswith("lm_head."))]
    if missing:
        raise ArtifactError(f"{directory / WEIGHTS_FILE}: tensors missing: {missing[:5]}")
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise ArtifactError(f"{directory}: not restored from the artifact: {left[:5]}")
    for mod in model.modules():
        if isinstance(mod, QUANTIZED_MODULES):
            mod.prepare()
    model.eval()
    return model, runtime


