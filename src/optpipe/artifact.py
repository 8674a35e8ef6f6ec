"""Artifacts: built in a staging directory, emitted by an atomic rename only when every gate passed.

`manifest.json` records what was built (resolved recipe, pass records), what was measured (gate metrics
and thresholds), where (CPU ISA, library versions) and the sha256 of every file, so `verify` can detect
any changed byte.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

from .errors import ArtifactError

MANIFEST = "manifest.json"
REPORT = "report.md"
SCHEMA_VERSION = 1


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_table(directory: Path) -> dict:
    out = {}
    for p in sorted(directory.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            out[p.relative_to(directory).as_posix()] = {"bytes": p.stat().st_size, "sha256": sha256(p)}
    return out


class Staging:
    """A sibling directory of the output (same filesystem, so the final rename is atomic)."""

    def __init__(self, output: Path):
        self.output = output.resolve()
        self.output.parent.mkdir(parents=True, exist_ok=True)
        self.path = self.output.parent / f".optpipe-staging-{self.output.name}-{uuid.uuid4().hex[:8]}"
        self.path.mkdir()

    def emit(self, overwrite: bool) -> Path:
        if self.output.exists():
            if not overwrite:
                raise ArtifactError(f"{self.output} already exists (use --overwrite to replace it)")
            old = self.output.parent / f".optpipe-old-{self.output.name}-{uuid.uuid4().hex[:8]}"
            os.replace(self.output, old)
            os.replace(self.path, self.output)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.path, self.output)
        return self.output

    def reject(self, keep: bool) -> Path | None:
        if not keep:
            self.discard()
            return None
        dest = self.output.parent / f"{self.output.name}.rejected"
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(self.path, dest)
        return dest

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def write_manifest(directory: Path, manifest: dict) -> dict:
    manifest = {"schema_version": SCHEMA_VERSION, **manifest, "files": file_table(directory)}
    manifest["artifact_bytes"] = sum(f["bytes"] for f in manifest["files"].values())
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return manifest


def read_manifest(directory: Path) -> dict:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{directory}: no {MANIFEST} (not an optpipe artifact, or an incomplete one)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path}: not valid JSON: {e}") from None


def verify(directory: Path) -> list[str]:
    """Problems found (empty: every file matches its recorded sha256 and nothing was added)."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    problems = []
    recorded = manifest.get("files", {})
    for rel, info in recorded.items():
        p = directory / rel
        if not p.is_file():
            problems.append(f"missing: {rel}")
        elif p.stat().st_size != info["bytes"] or sha256(p) != info["sha256"]:
            problems.append(f"modified: {rel}")
    for p in directory.rglob("*"):
        rel = p.relative_to(directory).as_posix()
        if p.is_file() and p.name != MANIFEST and rel not in recorded:
            problems.append(f"unexpected file: {rel}")
    return problems


def render_report(m: dict) -> str:
    lines = [f"# optpipe artifact: {m['recipe']['name']}", "",
             f"- status: **{m['status']}**", f"- target: `{m['recipe']['target']}`",
             f"- model: `{m['recipe']['model']['source']}`", f"- built: {m['created_utc']} in {m['build_seconds']} s",
             f"- CPU: {m['environment']['cpu']} ({', '.join(k for k, v in m['environment']['isa'].items() if v)})", "",
             "## Passes", "", "| # | pass | seconds | changes |", "|---|---|---|---|"]
    for i, p in enumerate(m["passes"], 1):
        ch = ", ".join(f"{k}={v}" for k, v in p["changes"].items() if not isinstance(v, (dict, list)))
        lines.append(f"| {i} | {p['name']} | {p['seconds']} | {ch} |")
    for gname in ("accuracy", "speed"):
        g = m["gates"].get(gname)
        if not g:
            continue
        lines += ["", f"## Gate: {gname} — {g['status']}", ""]
        for k, v in g.items():
            if k in ("status", "passed", "thresholds", "failures", "runs", "runs_columns") or isinstance(v, list):
                continue
            lines.append(f"- {k}: {v}")
        lines.append(f"- thresholds: {json.dumps(g['thresholds'])}")
        for f in g["failures"]:
            lines.append(f"- **FAILED**: {f}")
    return "\n".join(lines) + "\n"
