"""Content-addressed store of candidate builds and their measurements, shared by reruns and by Ray workers.

A build is keyed by everything that decides its bytes: optpipe's own source, the model file(s) (path, size,
mtime), the target, the pass chain with its options, the calibration data settings and the seed. The screen and
the output-comparing gates are keyed by the build, those gates, the evaluation data and the screen's size; the
speed gate also by the machine (CPU model, ISA) and thread count: a speed figure from another machine is never
reused. Entries are written to a
temporary name and renamed, so a reader (or a worker on another node) never sees half an entry.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from functools import lru_cache
from pathlib import Path

from .prefix import chain

DEFAULT_DIR = "~/.cache/optpipe/tune"


def default_dir() -> Path:
    return Path(os.environ.get("OPTPIPE_TUNE_CACHE", DEFAULT_DIR)).expanduser()


def content_key(obj) -> str:
    """sha256 of a JSON-able description of what decides a result."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


@lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """sha256 over optpipe's Python sources: a change to any pass or target invalidates every cached build."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.py")):
        h.update(str(p.relative_to(root)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def model_fingerprint(location: str | None) -> list:
    """Path, size and mtime of the model's file, or of every file directly in its directory."""
    if not location:
        return []
    p = Path(location)
    files = sorted(q for q in p.iterdir() if q.is_file()) if p.is_dir() else [p] if p.exists() else []
    return [[str(q), q.stat().st_size, q.stat().st_mtime_ns] for q in files]


def build_key(recipe, model_location: str | None) -> str:
    return content_key({"code": code_fingerprint(), "model": recipe.model.model_dump(mode="json"),
                 "model_files": model_fingerprint(model_location), "target": recipe.target,
                 "passes": chain(recipe),
                 "calibration": recipe.calibration.model_dump(mode="json"), "seed": recipe.seed})


def quality_key(build: str, recipe, screen_windows: int) -> str:
    """The screen and the output-comparing gates: the same on any node (where they ran is kept in the record)."""
    gates = recipe.gates.model_dump(mode="json")
    gates.pop("speed")
    return content_key({"build": build, "gates": gates, "evaluation": recipe.evaluation.model_dump(mode="json"),
                 "screen_windows": screen_windows})


def machine_kind(machine: dict) -> dict:
    """What makes a speed figure comparable: the CPU model, architecture, ISA and core count (not the host name)."""
    return {k: machine.get(k) for k in ("cpu", "machine", "isa", "physical_cores")}


def speed_key(build: str, recipe, machine: dict, threads: int, full: bool) -> str:
    """The speed gate (full: the paired gate; else the quick unpaired figure): only on this kind of machine."""
    return content_key({"build": build, "speed": recipe.gates.speed.model_dump(mode="json"),
                 "evaluation": recipe.evaluation.model_dump(mode="json"), "full": full,
                 "machine": machine_kind(machine),
                 "threads": threads})


class Store:
    """`builds/<key>/` holds an artifact's files plus `build.json`; `evals/<key>.json` one measurement of a build."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        (self.root / "builds").mkdir(parents=True, exist_ok=True)
        (self.root / "evals").mkdir(parents=True, exist_ok=True)

    def build_dir(self, key: str) -> Path | None:
        d = self.root / "builds" / key
        return d if (d / "build.json").is_file() else None

    def build_info(self, key: str) -> dict:
        return json.loads((self.root / "builds" / key / "build.json").read_text())

    def new_build_dir(self, key: str) -> Path:
        tmp = self.root / "builds" / f".tmp-{key[:16]}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        return tmp

    def commit_build(self, key: str, tmp: Path, info: dict) -> Path:
        (tmp / "build.json").write_text(json.dumps(info, indent=1, default=str))
        final = self.root / "builds" / key
        try:
            os.replace(tmp, final)
        except OSError:  # another worker committed the same build first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
        return final

    def discard(self, tmp: Path) -> None:
        shutil.rmtree(tmp, ignore_errors=True)

    def evaluation(self, key: str) -> dict | None:
        p = self.root / "evals" / f"{key}.json"
        return json.loads(p.read_text()) if p.is_file() else None

    def save_evaluation(self, key: str, record: dict) -> None:
        p = self.root / "evals" / f"{key}.json"
        tmp = p.with_name(f".tmp-{uuid.uuid4().hex[:8]}.json")
        tmp.write_text(json.dumps(record, indent=1, default=str))
        os.replace(tmp, p)

    def report_path(self, name: str) -> Path:
        (self.root / "reports").mkdir(exist_ok=True)
        return self.root / "reports" / name
