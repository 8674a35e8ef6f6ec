"""What can be checked before any weight is loaded: the model source is a decoder model (config.json or the
GGUF header, read without tensors), data files exist and hold text, and every pass's options fit the recipe
and the model. `optpipe validate` runs exactly this; `build` runs it before loading (seconds, not minutes).
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

from . import arch
from .errors import ModelLoadError, RecipeError
from .pipeline import check_cache_length

GGUF_MAGIC = b"GGUF"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
# Config keys that mark a model optpipe's decoder pipeline cannot compile.
NOT_A_DECODER = {"is_encoder_decoder": "an encoder-decoder model", "vision_config": "a model with a vision tower",
                 "audio_config": "a model with an audio tower"}


@dataclass
class ModelFacts:
    """A model's shape as read from its config or GGUF header (no tensors)."""

    model_type: str
    max_positions: int | None
    architectures: list[str]
    source_kind: str  # "gguf" | "hf-dir" | "hub-cache"
    config: dict = field(default_factory=dict)  # the (text) config's settings; from a GGUF header, those it names

    @property
    def family(self) -> str | None:
        """The architecture description that covers this model, or None (only passes that need no layer topology
        can then run)."""
        return arch.describe(self.model_type).family if self.model_type in arch.supported() else None

    def describe(self) -> str:
        family = f"family {self.family}" if self.family else "no architecture description"
        return (f"{self.model_type} ({', '.join(self.architectures) or 'no architectures listed'}), "
                f"{self.source_kind}, {family}")


# GGUF value types -> struct format (strings and arrays handled apart)
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def _read(f, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise ValueError(f"truncated GGUF header: {n} bytes expected at offset {f.tell() - len(data)}, "
                         f"{len(data)} left")
    return data


class ArrayLength(int):
    """A header array, skipped: only its length is kept (`tokenizer.ggml.tokens`: the vocabulary's size)."""


def _gguf_value(f, vtype: int):
    if vtype == 8:
        (n,) = struct.unpack("<Q", _read(f, 8))
        return _read(f, n).decode("utf-8", "replace")
    if vtype == 9:
        itype, count = struct.unpack("<IQ", _read(f, 12))
        if itype in _GGUF_SCALARS:  # skip without decoding (token scores can be large)
            f.seek(count * struct.calcsize(_GGUF_SCALARS[itype]), 1)
            return ArrayLength(count)
        for _ in range(count):
            _gguf_value(f, itype)
        return ArrayLength(count)
    fmt = _GGUF_SCALARS.get(vtype)
    if fmt is None:
        raise ValueError(f"unknown GGUF value type {vtype}")
    return struct.unpack("<" + fmt, _read(f, struct.calcsize(fmt)))[0]


def gguf_header(path: Path) -> dict:
    """The GGUF key/value header (arrays skipped: their lengths); raises ValueError for a file that is not GGUF."""
    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise ValueError("not a GGUF file (no GGUF magic bytes)")
        version, _tensors, kv_count = struct.unpack("<IQQ", _read(f, 20))
        if version < 2:
            raise ValueError(f"GGUF version {version} is too old (2 or later)")
        out = {}
        for _ in range(kv_count):
            (n,) = struct.unpack("<Q", _read(f, 8))
            key = _read(f, n).decode("utf-8", "replace")
            (vtype,) = struct.unpack("<I", _read(f, 4))
            out[key] = _gguf_value(f, vtype)
        return out


# GGUF architecture -> the transformers model_type its loader builds, where the names differ
GGUF_MODEL_TYPES = {"gemma3": "gemma3_text", "qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss",
                    "minimax-m2": "minimax_m2"}


def gguf_architectures() -> set[str]:
    """The GGUF architectures transformers can load (it dequantizes them into its own model classes)."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"}


def _gguf_facts(path: Path) -> ModelFacts:
    try:
        header = gguf_header(path)
    except (ValueError, struct.error, OSError) as e:
        raise ModelLoadError(f"model.source: {path}: {e}") from None
    arch = header.get("general.architecture")
    if not arch:
        raise ModelLoadError(f"model.source: {path}: GGUF header names no general.architecture")
    readable = gguf_architectures()
    if arch not in readable and GGUF_MODEL_TYPES.get(arch) not in readable:
        raise ModelLoadError(f"model.source: {path}: transformers cannot read a GGUF file of architecture {arch!r} "
                             f"(it reads {', '.join(sorted(readable))}): give the model's Hugging Face directory")
    ctx = header.get(f"{arch}.context_length")
    model_type = GGUF_MODEL_TYPES.get(arch, str(arch))
    config = {"model_type": model_type, "num_attention_heads": header.get(f"{arch}.attention.head_count"),
              "num_key_value_heads": header.get(f"{arch}.attention.head_count_kv"),
              "sliding_window": header.get(f"{arch}.attention.sliding_window"),
              "num_experts": header.get(f"{arch}.expert_count"),  # a mixture of experts (llama.cpp's key)
              "hidden_size": header.get(f"{arch}.embedding_length"),
              "head_dim": header.get(f"{arch}.attention.key_length"),
              "intermediate_size": header.get(f"{arch}.feed_forward_length"),
              "num_hidden_layers": header.get(f"{arch}.block_count"),
              "vocab_size": int(header.get(f"{arch}.vocab_size") or header.get("tokenizer.ggml.tokens") or 0) or None}
    return ModelFacts(model_type, int(ctx) if ctx else None, [], "gguf", config)


def _config_facts(config_path: Path, kind: str) -> ModelFacts:
    try:
        cfg = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"model.source: {config_path} is not a readable JSON config: {e}") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model_type"), str):
        raise ModelLoadError(f"model.source: {config_path} has no model_type (not a transformers config)")
    for key, what in NOT_A_DECODER.items():
        if cfg.get(key):
            raise ModelLoadError(f"model.source: {config_path}: {cfg['model_type']} is {what}; optpipe compiles "
                                 "decoder-only language models")
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else cfg
    ctx = text.get("max_position_embeddings")
    return ModelFacts(cfg["model_type"], int(ctx) if isinstance(ctx, int) else None,
                      list(cfg.get("architectures") or []), kind, {**text, "model_type": cfg["model_type"]})


def model_facts(spec) -> ModelFacts:
    """Read the model's shape without its weights; raises ModelLoadError (exit 2) naming model.source."""
    from .models import resolve

    resolved = resolve(spec.source, spec.gguf_file)
    location = Path(resolved.location)
    if resolved.kind == "gguf":
        return _gguf_facts(location / resolved.gguf_file)
    facts = _config_facts(location / "config.json", resolved.kind)
    if not any((location / w).is_file() for w in WEIGHT_FILES) and not any(location.glob("*.safetensors")):
        raise ModelLoadError(f"model.source: {location} has a config.json but no weights "
                             f"({', '.join(WEIGHT_FILES[:2])} or *.safetensors)")
    return facts


def check_data(spec, base_dir: Path, field_name: str) -> None:
    """A data source that names a file must be a non-empty text file (builtins are checked by name)."""
    from .data import BUILTIN, LOADERS

    source = spec.source
    if source.startswith("builtin:"):
        if source not in BUILTIN:
            raise RecipeError(f"{field_name}.source: unknown builtin {source!r} (known: {', '.join(BUILTIN)})")
        return
    path = Path(source).expanduser()
    if not path.is_absolute() and (base_dir / path).exists():
        path = base_dir / path
    looks_like_file = path.suffix in LOADERS or "/" in source or path.exists()
    if not looks_like_file:
        return  # a hub dataset name: checked when it is loaded
    if not path.is_file():
        raise RecipeError(f"{field_name}.source: file {path} not found")
    if path.suffix not in LOADERS:
        raise RecipeError(f"{field_name}.source: {path.name}: unsupported file type (use {', '.join(LOADERS)})")
    if path.stat().st_size == 0:
        raise RecipeError(f"{field_name}.source: {path} is empty")
    if LOADERS[path.suffix] in ("text", "json"):
        head = path.read_bytes()[: 1 << 16]
        try:
            head.decode("utf-8")
        except UnicodeDecodeError as e:
            if e.start < len(head) - 4:  # not just a multi-byte character cut at the 64 KiB boundary
                raise RecipeError(f"{field_name}.source: {path} is not UTF-8 text (byte {e.start})") from None
        if not head.strip():
            raise RecipeError(f"{field_name}.source: {path} holds only white space")


def check(recipe, source: str, passes: list) -> ModelFacts | None:
    """Everything `validate` checks beyond the recipe's schema and pass order. Returns the model's facts."""
    try:
        facts = model_facts(recipe.model)
    except ModelLoadError as e:
        raise ModelLoadError(f"{source}: {e}") from None
    if recipe.model.streaming and facts.source_kind != "hf-dir":
        raise RecipeError(f"{source}: model.streaming: needs a local checkpoint directory with safetensors shards; "
                          f"{recipe.model.source!r} is a {facts.source_kind}")
    check_data(recipe.evaluation, recipe.base_dir, f"{source}: evaluation")
    if facts.max_positions:  # past its context a model measures nothing it was made for (OPT's learned positions end)
        try:
            check_cache_length(facts.max_positions, recipe, None, "", "the model's context (max_position_embeddings):")
        except ValueError as e:
            raise RecipeError(f"{source}: {e}") from None
    if any("calibration" in p.needs for p in passes):
        check_data(recipe.calibration, recipe.base_dir, f"{source}: calibration")
    for i, p in enumerate(passes):
        if p.topology and facts.model_type not in arch.supported():
            raise RecipeError(f"{source}: passes[{i}] ({p.name}): needs the layer topology of model_type "
                              f"{facts.model_type!r}, which has no architecture description (described: "
                              f"{', '.join(arch.supported())})")
        try:
            p.check_recipe(recipe, facts, passes[:i])
        except ValueError as e:
            raise RecipeError(f"{source}: passes[{i}] ({p.name}): {e}") from None
    return facts
