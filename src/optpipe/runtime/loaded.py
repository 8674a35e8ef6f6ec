"""`optpipe.load(...)`: an artifact's runner with its tokenizer, and the checks a user expects before any
compute starts (ids in range, batch 1, room in the static cache), text in and text out, streaming, sampling."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import ArtifactError, InputError
from .generation import Generation


@dataclass
class Completion:
    """What `generate` returns: the new tokens (and their text when a tokenizer is attached)."""

    tokens: list[int]
    text: str | None
    prompt_ids: list[int]
    generation: Generation | None = None
    finish_reason: str = "length"  # "length" | "eos"
    extra: dict = field(default_factory=dict)


def _is_real(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def sampler(temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None) -> Callable[[np.ndarray], int] | None:
    """None (greedy) for temperature 0; otherwise softmax(logits / T) restricted to the smallest set of tokens
    whose probability reaches `top_p`, drawn from a generator seeded by `seed` (same seed, same text)."""
    if not _is_real(temperature) or not (np.isfinite(temperature) and temperature >= 0):
        raise InputError(f"temperature must be a number >= 0, got {temperature!r}")
    if not _is_real(top_p) or not (0 < top_p <= 1):
        raise InputError(f"top_p must be a number in (0, 1], got {top_p!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0):
        raise InputError(f"seed must be None or a whole number >= 0, got {seed!r}")
    if temperature == 0:
        return None
    rng = np.random.default_rng(seed)

    def pick(logits: np.ndarray) -> int:
        z = logits.astype(np.float64) / temperature
        p = np.exp(z - z.max())
        p /= p.sum()
        if top_p < 1:
            order = np.argsort(-p)
            keep = order[: int(np.searchsorted(np.cumsum(p[order]), top_p) + 1)]
            q = np.zeros_like(p)
            q[keep] = p[keep]
            p = q / q.sum()
        return int(rng.choice(p.size, p=p))

    return pick


class ArtifactModel:
    """A loaded artifact. `logits(ids)` and `generate(prompt, ...)` validate their input first; `runner` is the
    target's own runner (the code the gates measured), `tokenizer` the artifact's tokenizer (None if it has none)."""

    def __init__(self, runner, tokenizer, manifest: dict, path: Path):
        self.runner = runner
        self.tokenizer = tokenizer
        self.manifest = manifest
        self.path = path
        self.vocab_size = _vocab_size(manifest, tokenizer)

    @property
    def max_length(self) -> int:
        return int(self.runner.max_length)

    def encode(self, text: str) -> np.ndarray:
        if self.tokenizer is None:
            raise InputError(f"{self.path}: this artifact has no tokenizer: pass token ids")
        return np.asarray(self.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)

    def ids(self, prompt) -> np.ndarray:
        """A prompt (text, or token ids as a 1-D sequence or a [1, N] batch) as validated 1-D int64 ids."""
        if isinstance(prompt, str):
            arr = self.encode(prompt)
        else:
            arr = np.asarray(prompt)
            if arr.ndim == 2 and arr.shape[0] == 1:
                arr = arr[0]
            if arr.ndim != 1:
                raise InputError(f"token ids must be 1-D or a batch of one [1, N]; got shape {list(arr.shape)} "
                                 "(batch > 1 is not supported: run one prompt at a time)")
            if arr.size and arr.dtype == object and all(isinstance(t, int) and not isinstance(t, bool) for t in arr):
                bad = next(t for t in arr if not 0 <= t < (self.vocab_size or 2 ** 63))  # ints past int64
                raise InputError(f"token id {bad} is outside the vocabulary [0, {self.vocab_size})")
            if arr.size and not np.issubdtype(arr.dtype, np.integer):
                raise InputError(f"token ids must be integers, got {arr.dtype}")
            if arr.size and np.issubdtype(arr.dtype, np.unsignedinteger) and arr.max() > np.iinfo(np.int64).max:
                raise InputError(f"token id {int(arr.max())} is outside the vocabulary [0, {self.vocab_size})")
            arr = arr.astype(np.int64)
        if arr.size == 0:
            raise InputError("the prompt is empty: at least one token is needed")
        if self.vocab_size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            bad = int(arr[(arr < 0) | (arr >= self.vocab_size)][0])
            raise InputError(f"token id {bad} is outside the vocabulary [0, {self.vocab_size})")
        return arr

    def logits(self, prompt) -> np.ndarray:
        ids = self.ids(prompt)
        if ids.size > self.max_length:
            raise InputError(f"{ids.size} tokens exceed the artifact's {self.max_length}-token limit")
        return self.runner.logits(ids)

    def generate(self, prompt, max_new_tokens: int = 64, *, eos_token_id: int | None | str = "default",
                 temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                 stream: Callable[[str, int], None] | None = None) -> Completion:
        """Continue `prompt` (text or ids) by up to `max_new_tokens` tokens; stops at the tokenizer's eos unless
        `eos_token_id=None`. `stream(text_piece, token_id)` is called for each token as it is produced."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
            raise InputError(f"max_new_tokens must be a whole number >= 0, got {max_new_tokens!r}")
        ids = self.ids(prompt)
        if ids.size + max_new_tokens > self.max_length:
            raise InputError(f"prompt ({ids.size} tokens) + max_new_tokens ({max_new_tokens}) exceed the artifact's "
                             f"{self.max_length}-token limit (its static KV cache or its positions); nothing was generated")
        pick = sampler(temperature, top_p, seed)
        if eos_token_id == "default":
            eos_token_id = getattr(self.tokenizer, "eos_token_id", None)
        if max_new_tokens == 0:
            return Completion([], "" if self.tokenizer is not None else None, ids.tolist(), None)
        on_token, shown = self._streamer(stream) if stream is not None else (None, [0])
        gen = self.runner.generate(ids, int(max_new_tokens), eos_token_id, pick=pick, on_token=on_token)
        reason = "eos" if eos_token_id is not None and gen.tokens and gen.tokens[-1] == eos_token_id else "length"
        text = self.tokenizer.decode(gen.tokens, skip_special_tokens=True) if self.tokenizer is not None else None
        if stream is not None and text and len(text) > shown[0]:  # what an unfinished character held back
            stream(text[shown[0]:], -1)
        return Completion(list(gen.tokens), text, ids.tolist(), gen, reason)

    def _streamer(self, stream: Callable[[str, int], None]) -> tuple[Callable[[int], None], list[int]]:
        """Token -> newly completed text: decode everything so far and emit the difference (multi-byte
        characters split over tokens appear once they are whole; what is still held back at the end is sent
        with token id -1). Returns the callback and the count of characters sent so far."""
        tokens: list[int] = []
        shown = [0]

        def on_token(tok: int) -> None:
            tokens.append(tok)
            if self.tokenizer is None:
                stream("", tok)
                return
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            if text.endswith("\ufffd"):  # an unfinished UTF-8 sequence
                stream("", tok)
                return
            stream(text[shown[0]:], tok)
            shown[0] = len(text)

        return on_token, shown


def _vocab_size(manifest: dict, tokenizer) -> int | None:
    arch = (manifest.get("model") or {}).get("vocab_size")
    if isinstance(arch, int):
        return arch
    return len(tokenizer) if tokenizer is not None else None


def load_tokenizer(path: Path, manifest: dict):
    """The artifact's own tokenizer directory (named in the manifest), loaded from local files only."""
    sub = (manifest.get("target") or {}).get("tokenizer_dir")
    if not sub:
        return None
    tdir = path / str(sub)
    root = path.resolve()
    if not tdir.is_dir() or tdir.is_symlink() or not (tdir.resolve() == root or root in tdir.resolve().parents):
        return None
    links = [p.name for p in tdir.iterdir() if p.is_symlink() or not (p.is_file() or p.is_dir())]
    if links:  # a tokenizer.json pointing at /etc/passwd would be read as the tokenizer
        raise ArtifactError(f"{tdir}: {', '.join(sorted(links))}: symlinks or special files, not the artifact's own")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(tdir), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - whatever the tokenizer library says of a broken file
        raise ArtifactError(f"{tdir}: the artifact's tokenizer cannot be loaded: {type(e).__name__}: {e}") from None


def runner_for(target: str, directory: Path, saved: dict, threads: int):
    """The runner for an artifact of `target`, from what its manifest says was saved (runtime modules only)."""
    if target in ("cpu-onnx", "gpu-tensorrt"):
        from .ort_decoder import OnnxDecoder

        # TensorRT-ready graphs run unoptimized on the CPU: ORT's fusions would change what is checked
        return OnnxDecoder.from_path(directory / saved.get("model_file", "model.onnx"), threads=threads,
                                     optimize=target == "cpu-onnx")
    if target == "cpu-torch":
        from .torch_artifact import load_torch_artifact

        return load_torch_artifact(directory, threads)
    if target == "cpu-ipex":
        from .ipex import load_ipex_artifact

        return load_ipex_artifact(directory, threads)
    raise ArtifactError(f"{directory}: unknown target {target!r} in the manifest")


def load_artifact(artifact_dir, threads: int | None = None, *, digest: str | None = None,
                  allow_rejected: bool = False) -> ArtifactModel:
    """`optpipe.load`: see its docstring. Uses nothing from the compiler (passes, targets, builder)."""
    from .. import hw
    from ..artifact import read_manifest, verify

    if not isinstance(artifact_dir, (str, os.PathLike)):
        raise InputError(f"artifact_dir must be a path, not {type(artifact_dir).__name__}")
    path = Path(artifact_dir)
    manifest = read_manifest(path)
    # With a digest every byte is checked; without one, what costs no hashing: no symlink, no special or
    # unexpected file, every listed file present at its recorded size.
    problems = [p for p in verify(path, digest, hashes=digest is not None)
                if not p.startswith("status:")]  # the status is refused below, unless allow_rejected
    if problems:
        raise ArtifactError(f"{path}: refused: " + "; ".join(problems))
    if manifest.get("status") != "passed" and not allow_rejected:
        raise ArtifactError(f"{path}: status is {manifest.get('status')!r}, not 'passed': this artifact failed its "
                            "gates (load it with allow_rejected=True to inspect it)")
    try:
        n = hw.threads(threads)
    except ValueError as e:
        raise InputError(str(e)) from None
    target = (manifest.get("recipe") or {}).get("target")
    saved = manifest.get("target")
    if not isinstance(target, str) or not isinstance(saved, dict):
        raise ArtifactError(f"{path}: the manifest names no target")
    from ..errors import OptpipeError

    try:
        runner = runner_for(target, path, saved, n)
    except OptpipeError:
        raise
    except Exception as e:  # noqa: BLE001 - onnxruntime's or torch's own words for a broken model file
        first = (str(e).strip().splitlines() or [""])[0]
        raise ArtifactError(f"{path}: its {target} model cannot be loaded: {type(e).__name__}: {first}") from None
    return ArtifactModel(runner, load_tokenizer(path, manifest), manifest, path)
