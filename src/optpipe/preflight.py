"""What can be checked before any weight is loaded: the model source is a decoder model (config.json or the
GGUF header, read without tensors), data files exist and hold text, and every pass's options fit the recipe
and the model. `optpipe validate` runs exactly this; `build` runs it before loading (seconds, not minutes).
"""
from __future__ import annotations

import codecs
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

from . import arch
from .errors import ModelLoadError, RecipeError
from .pipeline import check_cache_length
from .safeio import check_path_text, is_regular_file, load_json, open_regular, read_head

CONFIG_LIMIT = 16 << 20  # a config.json is kilobytes

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


MAX_GGUF_DEPTH = 4  # arrays of arrays: llama.cpp writes one level; a header nesting deeper is not a model's
MAX_GGUF_STRING = 64 << 20  # a chat template or a merges entry: far below this


class _Header:
    """A bounded cursor over a GGUF header: no length may claim more bytes than the file has left, so a crafted
    header ends in a ValueError in milliseconds, not an allocation of 2^62 bytes or a loop over 2^64 entries."""

    def __init__(self, f):
        self.f, self.size = f, os.fstat(f.fileno()).st_size

    def left(self) -> int:
        return self.size - self.f.tell()

    def read(self, n: int) -> bytes:
        if n > self.left():
            raise ValueError(f"truncated GGUF header: {n} bytes expected at offset {self.f.tell()}, "
                             f"{self.left()} left")
        return self.f.read(n)

    def unpack(self, fmt: str):
        return struct.unpack("<" + fmt, self.read(struct.calcsize("<" + fmt)))

    def count(self, n: int, each: int, what: str) -> int:
        """A count of items of at least `each` bytes, refused when the file cannot hold that many."""
        if n * each > self.left():
            raise ValueError(f"GGUF header claims {n} {what}, more than the file's {self.left()} remaining bytes hold")
        return n

    def string(self) -> str:
        (n,) = self.unpack("Q")
        if n > MAX_GGUF_STRING:
            raise ValueError(f"GGUF header string of {n} bytes at offset {self.f.tell() - 8} (at most {MAX_GGUF_STRING})")
        return self.read(n).decode("utf-8", "replace")


class ArrayLength(int):
    """A header array, skipped: only its length is kept (`tokenizer.ggml.tokens`: the vocabulary's size)."""


def _gguf_value(h: _Header, vtype: int, depth: int = 0):
    if vtype == 8:
        return h.string()
    if vtype == 9:
        if depth >= MAX_GGUF_DEPTH:
            raise ValueError(f"GGUF header arrays nested more than {MAX_GGUF_DEPTH} deep")
        itype, count = h.unpack("IQ")
        if itype in _GGUF_SCALARS:  # skip without decoding (token scores can be large)
            size = struct.calcsize(_GGUF_SCALARS[itype])
            h.f.seek(h.count(count, size, "array values") * size, 1)
            return ArrayLength(count)
        if itype not in (8, 9):
            raise ValueError(f"unknown GGUF value type {itype} in an array")
        for _ in range(h.count(count, 8 if itype == 8 else 12, "array values")):
            _gguf_value(h, itype, depth + 1)
        return ArrayLength(count)
    fmt = _GGUF_SCALARS.get(vtype)
    if fmt is None:
        raise ValueError(f"unknown GGUF value type {vtype}")
    return h.unpack(fmt)[0]


def gguf_header(path: Path) -> dict:
    """The GGUF key/value header (arrays skipped: their lengths) and, under `__tensor_count__`, the number of
    tensors it announces; raises ValueError for a file that is not GGUF (or claims more than it holds)."""
    with open_regular(path, "model.source", ModelLoadError) as f:
        h = _Header(f)
        if h.left() < 4 or h.read(4) != GGUF_MAGIC:
            raise ValueError("not a GGUF file (no GGUF magic bytes)")
        version, tensors, kv_count = h.unpack("IQQ")
        if version < 2:
            raise ValueError(f"GGUF version {version} is too old (2 or later)")
        out: dict = {}
        for _ in range(h.count(kv_count, 13, "key/value pairs")):  # key length, 1 byte of key, type, 1 of value
            key = h.string()
            (vtype,) = h.unpack("I")
            out[key] = _gguf_value(h, vtype)
        h.count(tensors, 8 + 4 + 8 + 4 + 8, "tensors")  # each tensor's name, dims, type and offset follow
        out["__tensor_count__"] = tensors
        return out


def positive_int(config: dict, key: str, where: str, error=ModelLoadError) -> int | None:
    """`config[key]` as a whole number >= 1 (None when unset); anything else, a string "64" or a 0 included,
    is refused naming the key: transformers would fail on it minutes later, after loading."""
    value = config.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or isinstance(value, ArrayLength) or value < 1:
        shown = "an array" if isinstance(value, ArrayLength) else repr(value)
        raise error(f"{where}: {key} must be a whole number >= 1, not {shown}")
    return value


# The shape fields every decoder's config gives (when it gives them): whole numbers >= 1.
SHAPE_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size",
                "max_position_embeddings", "head_dim", "num_experts")


def check_shape(config: dict, where: str) -> None:
    for key in SHAPE_FIELDS:
        positive_int(config, key, where)
    inter = config.get("intermediate_size")
    if isinstance(inter, list):  # per-layer widths (some families): each a whole number
        for i, v in enumerate(inter):
            positive_int({f"intermediate_size[{i}]": v}, f"intermediate_size[{i}]", where)
    else:
        positive_int(config, "intermediate_size", where)
    heads, kv = config.get("num_attention_heads"), config.get("num_key_value_heads")
    if heads and kv and heads % kv:
        raise ModelLoadError(f"{where}: num_attention_heads ({heads}) is not a multiple of num_key_value_heads ({kv})")


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
    if not isinstance(arch, str):
        raise ModelLoadError(f"model.source: {path}: general.architecture must be text, not {arch!r}")
    readable = gguf_architectures()
    if arch not in readable and GGUF_MODEL_TYPES.get(arch) not in readable:
        raise ModelLoadError(f"model.source: {path}: transformers cannot read a GGUF file of architecture {arch!r} "
                             f"(it reads {', '.join(sorted(readable))}): give the model's Hugging Face directory")
    if not header["__tensor_count__"]:
        raise ModelLoadError(f"model.source: {path}: the GGUF file holds no tensors (a header without weights)")
    where = f"model.source: {path}: GGUF header"
    ctx = positive_int(header, f"{arch}.context_length", where)
    for key in ("attention.head_count", "attention.head_count_kv", "attention.sliding_window", "expert_count",
                "embedding_length", "attention.key_length", "feed_forward_length", "block_count", "vocab_size"):
        positive_int(header, f"{arch}.{key}", where)
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
    check_shape(config, where)
    return ModelFacts(model_type, ctx, [], "gguf", config)


def _config_facts(config_path: Path, kind: str) -> ModelFacts:
    cfg = load_json(config_path, "model.source", ModelLoadError, CONFIG_LIMIT, "model config")
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model_type"), str):
        raise ModelLoadError(f"model.source: {config_path} has no model_type (not a transformers config)")
    for key, what in NOT_A_DECODER.items():
        if cfg.get(key):
            raise ModelLoadError(f"model.source: {config_path}: {cfg['model_type']} is {what}; optpipe compiles "
                                 "decoder-only language models")
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else cfg
    check_shape(text, f"model.source: {config_path}")
    architectures = cfg.get("architectures") or []
    if not isinstance(architectures, list) or not all(isinstance(a, str) for a in architectures):
        raise ModelLoadError(f"model.source: {config_path}: architectures must be a list of class names")
    return ModelFacts(cfg["model_type"], text.get("max_position_embeddings"), list(architectures), kind,
                      {**text, "model_type": cfg["model_type"]})


def model_facts(spec) -> ModelFacts:
    """Read the model's shape without its weights; raises ModelLoadError (exit 2) naming model.source."""
    from .models import resolve

    resolved = resolve(spec.source, spec.gguf_file)
    location = Path(resolved.location)
    if resolved.kind == "gguf":
        return _gguf_facts(location / resolved.gguf_file)
    facts = _config_facts(location / "config.json", resolved.kind)
    check_weights(location)
    return facts


def check_weights(location: Path) -> None:
    """The directory holds weights, and each safetensors file starts with a well-formed header (8 bytes of length,
    then that much JSON): an empty or truncated shard is refused here, not after minutes of loading."""
    shards = sorted(p for p in location.glob("*.safetensors") if is_regular_file(p))
    if not shards and not any(is_regular_file(location / w) for w in WEIGHT_FILES):
        raise ModelLoadError(f"model.source: {location} has a config.json but no weights "
                             f"({', '.join(WEIGHT_FILES[:2])} or *.safetensors)")
    for shard in shards:
        size = shard.stat().st_size
        head = read_head(shard, 8, "model.source", ModelLoadError)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or n + 8 > size or n > 100 << 20:
            raise ModelLoadError(f"model.source: {shard} is not a safetensors file ({size} bytes; its header length "
                                 f"{'is missing' if n < 0 else f'says {n}'})")
        raw = read_head(shard, 8 + n, "model.source", ModelLoadError)[8:]
        if not raw.lstrip().startswith(b"{"):
            raise ModelLoadError(f"model.source: {shard}: its safetensors header is not a JSON object")


def check_data(spec, base_dir: Path, field_name: str) -> None:
    """A data source that names a file must be a regular, non-empty file of its type that holds text (builtins are
    checked by name): all of a text file is UTF-8 without NUL bytes (read in chunks, never whole), every JSON line
    an object with the text field, a Parquet file's schema has the text field."""
    from .data import BUILTIN, LOADERS

    source = spec.source
    if source.startswith("builtin:"):
        if source not in BUILTIN:
            raise RecipeError(f"{field_name}.source: unknown builtin {source!r} (known: {', '.join(BUILTIN)})")
        return
    path = check_path_text(source, f"{field_name}.source").expanduser()
    if not path.is_absolute() and os.path.lexists(base_dir / path):
        path = base_dir / path
    looks_like_file = path.suffix in LOADERS or "/" in source or os.path.lexists(path)
    if not looks_like_file:
        return  # a hub dataset name: checked when it is loaded
    where = f"{field_name}.source"
    if not os.path.lexists(path):
        raise RecipeError(f"{where}: file {path} not found")
    if path.suffix not in LOADERS:
        raise RecipeError(f"{where}: {path.name}: unsupported file type (use {', '.join(LOADERS)})")
    with open_regular(path, where, RecipeError) as f:
        if os.fstat(f.fileno()).st_size == 0:
            raise RecipeError(f"{where}: {path} is empty")
        if LOADERS[path.suffix] == "parquet":
            _check_parquet(f, path, field_name, spec.text_field)
            return
        _check_text(f, path, where)
        if LOADERS[path.suffix] == "json":
            f.seek(0)
            _check_json_lines(f, path, field_name, spec.text_field)


def _check_text(f, path: Path, where: str) -> None:
    """UTF-8 all through, no NUL byte, not only white space: what the text loaders would otherwise turn into
    tokens of garbage. Streamed in 1 MiB chunks: memory stays flat for a file of any size."""
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    offset, blank = 0, True
    for chunk in iter(lambda: f.read(1 << 20), b""):
        nul = chunk.find(b"\0")
        if nul >= 0:
            raise RecipeError(f"{where}: {path} holds a NUL byte at offset {offset + nul}: binary data, not text")
        try:
            text = decoder.decode(chunk)
        except UnicodeDecodeError as e:
            raise RecipeError(f"{where}: {path} is not UTF-8 text (byte {offset + e.start})") from None
        blank = blank and not text.strip()
        offset += len(chunk)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise RecipeError(f"{where}: {path} is not UTF-8 text (it ends inside a character)") from None
    if blank:
        raise RecipeError(f"{where}: {path} holds only white space")


JSON_LINES_CHECKED = 16 << 20  # bytes of JSON lines parsed at validate (the rest is checked as UTF-8 text)


def _check_json_lines(f, path: Path, section: str, text_field: str) -> None:
    """Each JSON line (in the first 16 MiB) is an object, and the text field holds text in at least one; a .json
    file that is one document instead (a list of objects) is read whole when it is small enough."""
    head = f.read(JSON_LINES_CHECKED + 1)
    lines = head[:JSON_LINES_CHECKED].split(b"\n")
    if len(head) > JSON_LINES_CHECKED:
        lines = lines[:-1]  # the last line may be cut at the limit
    records, bad = [], None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except (ValueError, RecursionError):
            bad = n
            break
    if bad is not None:
        try:  # a whole-document .json file (datasets' json loader reads those too)
            doc = json.loads(head) if len(head) <= JSON_LINES_CHECKED else None
        except (ValueError, RecursionError):
            doc = None
        if not isinstance(doc, list):
            raise RecipeError(f"{section}.source: {path} line {bad} is not valid JSON (one JSON "
                              "object a line)")
        records = doc
    if not all(isinstance(r, dict) for r in records):
        raise RecipeError(f"{section}.source: {path}: every JSON record must be an object with a "
                          f"{text_field!r} field")
    if not any(isinstance(r.get(text_field), str) and r[text_field].strip() for r in records):
        raise RecipeError(f"{section}.text_field: no record of {path} has text in the field {text_field!r} (set "
                          "text_field to the field that holds the text)")


def _check_parquet(f, path: Path, section: str, text_field: str) -> None:
    where = f"{section}.source"
    size = os.fstat(f.fileno()).st_size
    head = f.read(4)
    f.seek(max(size - 4, 0))
    if size < 12 or head != b"PAR1" or f.read(4) != b"PAR1":
        raise RecipeError(f"{where}: {path} is not a Parquet file (no PAR1 magic at its start and end)")
    try:
        import pyarrow.parquet as pq

        names = pq.read_schema(path).names
    except ImportError:
        return  # datasets brings pyarrow; without it the loader says what is wrong
    except Exception as e:  # noqa: BLE001 - pyarrow's errors for a malformed footer vary
        raise RecipeError(f"{where}: {path} is not a readable Parquet file: {e}") from None
    if text_field not in names:
        raise RecipeError(f"{section}.text_field: column {text_field!r} not in {path} (columns: "
                          f"{', '.join(names)})")


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
