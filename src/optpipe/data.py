"""Calibration and evaluation text: through `datasets` (local txt/jsonl/parquet, or a hub name when online),
with a built-in English corpus written for this project as the offline default (two parts that do not overlap)."""
from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from .errors import RecipeError

BUILTIN = {"builtin:calibration": "calibration.txt", "builtin:evaluation": "evaluation.txt"}
# plain text (Markdown and reStructuredText too: read as text, paragraph by paragraph), JSON lines, Parquet
LOADERS = {".txt": "text", ".text": "text", ".md": "text", ".rst": "text", ".jsonl": "json", ".json": "json",
           ".parquet": "parquet"}


def builtin_path(name: str) -> Path:
    return Path(str(resources.files("optpipe") / "corpus" / BUILTIN[name]))


def load_text(spec, base_dir: Path | None = None, field_name: str = "data") -> str:
    """All text of a DataSpec joined with blank lines. `field_name` names the recipe field in errors."""
    import datasets

    datasets.disable_progress_bars()
    source = spec.source
    if source in BUILTIN:
        path = builtin_path(source)
    elif source.startswith("builtin:"):
        raise RecipeError(f"{field_name}.source: unknown builtin {source!r} (known: {', '.join(BUILTIN)})")
    else:
        path = Path(source).expanduser()
        if not path.is_absolute() and base_dir is not None and (base_dir / path).exists():
            path = base_dir / path
    if source in BUILTIN or path.suffix in LOADERS or path.exists():
        if not path.is_file():
            raise RecipeError(f"{field_name}.source: file {path} not found")
        loader = LOADERS.get(path.suffix)
        if loader is None:
            raise RecipeError(f"{field_name}.source: {path.name}: unsupported file type (use {', '.join(LOADERS)})")
        kwargs = {"sample_by": "paragraph"} if loader == "text" else {}
        try:
            ds = datasets.load_dataset(loader, data_files=str(path), split="train", **kwargs)
        except Exception as e:  # noqa: BLE001 - malformed user file
            raise RecipeError(f"{field_name}.source: cannot read {path}: {type(e).__name__}: {e}") from None
        column = "text" if loader == "text" else spec.text_field
    else:
        try:
            ds = datasets.load_dataset(source, spec.config_name, split=spec.split)
        except Exception as e:  # noqa: BLE001 - offline, missing, or gated dataset
            raise RecipeError(f"{field_name}.source: cannot load dataset {source!r} (no network, or no such "
                              f"dataset/split): {str(e).splitlines()[0]}") from None
        column = spec.text_field
    if column not in ds.column_names:
        raise RecipeError(f"{field_name}.text_field: column {column!r} not in {source} "
                          f"(columns: {', '.join(ds.column_names)})")
    texts = [t for t in ds[column] if isinstance(t, str) and t.strip()]
    if not texts:
        raise RecipeError(f"{field_name}.source: no text found in {source}")
    return "\n\n".join(t.strip() for t in texts)


@dataclass
class TokenWindows:
    windows: list[np.ndarray]
    source: str
    tokens: int
    eos_token_id: int | None = None  # the tokenizer's end of text: where the generation gate lets a model stop

    def describe(self) -> dict:
        return {"source": self.source, "tokens": self.tokens, "windows": len(self.windows),
                "window": int(max(w.size for w in self.windows))}


def token_windows(spec, tokenizer, base_dir: Path | None = None, field_name: str = "data") -> TokenWindows:
    text = load_text(spec, base_dir, field_name)
    ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)[: spec.max_tokens]
    windows = [ids[i:i + spec.window] for i in range(0, ids.size, spec.window)]
    windows = [w for w in windows if w.size >= 16]
    if not windows:
        raise RecipeError(f"{field_name}.source: fewer than 16 tokens of text in {spec.source}")
    eos = getattr(tokenizer, "eos_token_id", None)
    return TokenWindows(windows, spec.source, int(sum(w.size for w in windows)), eos if isinstance(eos, int) else None)
