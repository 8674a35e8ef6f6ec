"""Artifacts: built in a staging directory, emitted by an atomic rename only when every gate passed.

`manifest.json` records what was built (resolved recipe, pass records), what was measured (gate metrics
and thresholds), where (CPU ISA, library versions) and the sha256 of every file. The artifact's digest is
the sha256 of manifest.json's bytes: since the manifest lists every file's hash, the digest pins every byte
of the artifact, including the gate figures and the status. `build` prints it; `verify --digest` and
`optpipe.load(..., digest=...)` check it. Without a digest, `verify` can only check the files against a
manifest that anybody can rewrite.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath

from .errors import ArtifactError, RecipeError
from .hw import environment
from .runtime.storage import STORAGE_COLUMNS, storage_rows
from .safeio import is_regular_file, kind_of, load_json, open_regular, parse_digest

MANIFEST = "manifest.json"
REPORT = "report.md"
HTML_REPORT = "report.html"
SCHEMA_VERSION = 1
MANIFEST_LIMIT = 64 << 20  # a manifest lists files and figures: megabytes at most


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open_regular(path, "artifact", ArtifactError, follow_symlinks=False) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_table(directory: Path) -> dict:
    out = {}
    files, links, odd = _walk(directory)
    if links or odd:
        raise ArtifactError(f"{directory}: a target wrote symlinks or special files into the artifact: "
                            f"{', '.join(links + odd)}")
    for rel in sorted(files - {MANIFEST}):
        p = directory / rel
        out[rel] = {"bytes": p.stat().st_size, "sha256": sha256(p)}
    return out


class Staging:
    """A sibling directory of the output (same filesystem, so the final rename is atomic)."""

    def __init__(self, output: Path):
        self.output = output.resolve()
        self.path = self.output.parent / f".optpipe-staging-{self.output.name}-{uuid.uuid4().hex[:8]}"
        try:
            self.path.mkdir(parents=True)
        except OSError as e:
            raise RecipeError(f"{output}: cannot write an artifact there ({e.strerror}: {e.filename})") from None

    def emit(self, overwrite: bool) -> Path:
        if os.path.lexists(self.output):
            if not overwrite:
                raise ArtifactError(f"{self.output} already exists (use --overwrite to replace it)")
            why = overwrite_refusal(self.output)  # checked before the build too; the directory may have changed
            if why:
                raise ArtifactError(f"{self.output}: --overwrite refused: {why}; nothing was deleted")
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


def overwrite_refusal(output: Path, protected: dict[str, Path] | None = None) -> str | None:
    """Why `--overwrite` may not replace `output` (None: it may). Only an optpipe artifact (a directory holding an
    optpipe manifest) is ever replaced, and never one that is, or holds, a `protected` path (the model source,
    the recipe's folder, the working directory, home)."""
    kind = kind_of(output)
    if kind == "symlink":
        return "it is a symlink (an artifact is a directory)"
    out = Path(output).resolve()
    for label, path in (protected or {}).items():
        path = Path(path).resolve()
        if out == path or out in path.parents:
            return f"it is {label} ({path})" if out == path else f"it holds {label} ({path})"
    if kind != "dir":
        return f"it is a {kind or 'path that cannot be read'}, not an artifact directory"
    try:
        read_manifest(out)
    except ArtifactError:
        return f"it is not an optpipe artifact (no valid {MANIFEST}): only an artifact is replaced"
    return None


# The flat figures a manifest's `summary` (and `build`/`gate --json`) carries, per gate.
SUMMARY_KEYS = {
    "accuracy": ("ppl_delta_pct", "ppl_delta_pct_ci95", "decided_on", "mean_kl", "kl_p99", "top1_agreement",
                 "ppl_reference", "ppl_candidate"),
    "speed": ("decode_speedup", "decode_speedup_ci95", "prefill_speedup", "candidate_decode_tok_s",
              "reference_decode_tok_s", "rounds", "rounds_busy"),
    "coverage": ("linears", "quantized", "quantized_fraction", "bits_per_weight", "bits_per_weight_layers"),
    "generation": ("mean_first_divergence", "teacher_forced_agreement", "repetition_candidate", "repetition_reference"),
    "tasks": ("tasks",),
}


def gate_record(gates: dict, evaluation: dict | None = None) -> dict:
    """What a run of the gates records, the same for `build`'s manifest and `optpipe gate`: the verdict, every
    gate's figures and thresholds, the flat summary, the failures (and the evaluation data, when given)."""
    out = {"status": "passed" if all(g.passed is not False for g in gates.values()) else "rejected",
           "gates": {k: g.to_json() for k, g in gates.items()}}
    summary = {f"gates.{g}.status": out["gates"][g]["status"] for g in SUMMARY_KEYS if g in gates}
    summary.update({f"gates.{g}.{k}": gates[g].metrics.get(k) for g in SUMMARY_KEYS if g in gates
                    for k in SUMMARY_KEYS[g]})
    out["summary"] = summary
    out["failures"] = failures(out["gates"])
    if evaluation is not None:
        out["evaluation"] = evaluation
    return out


def model_config_record(config) -> dict:
    """What the manifest records of the loaded model's config (a GGUF header names neither): `build` takes it from
    the model it loaded, `tune` from the record of the build it emits."""
    return {"vocab_size": int(getattr(config, "vocab_size", 0) or 0) or None,
            "architectures": list(config.architectures or [])}


def compose_manifest(verdict: dict, recipe, source: str, facts, resolved, model_config: dict, labels: dict,
                     saved: dict, pass_records: list[dict], data_record: dict, *, build_seconds: float, stages: dict,
                     peak_rss_mib: dict, extra: dict | None = None) -> dict:
    """manifest.json's content (before the file table): what was built, from what (`model_config`:
    `model_config_record`), and what the gates measured. `build` and `tune` both write it; `extra` adds sections
    (tune: the search trace)."""
    return {
        "status": verdict["status"],
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "build_seconds": round(build_seconds, 1),
        "stage_seconds": stages,
        "peak_rss_mib": peak_rss_mib,
        "recipe_file": None if source == "<recipe>" else str(Path(source)),
        "recipe": recipe.resolved(),
        "model": {**resolved.describe(), "model_type": facts.model_type, **model_config,
                  "streaming": recipe.model.streaming},
        "reference": labels["accuracy"],
        "speed_baseline": labels["speed"],
        "target": {"name": recipe.target, **saved},
        "passes": pass_records,
        "data": data_record,
        "gates": verdict["gates"],
        "summary": verdict["summary"],
        "environment": environment(),
        **(extra or {}),
    }


def failures(gates_json: dict) -> list[str]:
    """Every gate's failure messages from a manifest's `gates` section, named by gate (as gate_record lists them)."""
    return [f"{name}: {f}" for name, g in gates_json.items() for f in g.get("failures", [])]


def write_manifest(directory: Path, manifest: dict) -> dict:
    manifest = {"schema_version": SCHEMA_VERSION, **manifest, "files": file_table(directory)}
    manifest["artifact_bytes"] = sum(f["bytes"] for f in manifest["files"].values())
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return manifest


def digest(directory: Path) -> str:
    """`sha256:<hex>` of manifest.json's bytes: the artifact's identity."""
    return "sha256:" + sha256(Path(directory) / MANIFEST)


def read_manifest(directory: Path) -> dict:
    """The manifest as a dict with a well-formed file table; any malformation is an ArtifactError (exit 4)."""
    path = Path(directory) / MANIFEST
    if not is_regular_file(path, follow_symlinks=False):
        raise ArtifactError(f"{directory}: no {MANIFEST} (not an optpipe artifact, or an incomplete one)")
    manifest = load_json(path, str(directory), ArtifactError, MANIFEST_LIMIT, "manifest", follow_symlinks=False)
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{path}: a manifest is a JSON object, not {type(manifest).__name__}")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise ArtifactError(f"{path}: no `files` table (every artifact file with its bytes and sha256)")
    for rel, info in files.items():
        problem = _bad_entry(rel, info)
        if problem:
            raise ArtifactError(f"{path}: files[{rel!r}]: {problem}")
    return manifest


_HEX64 = re.compile(r"[0-9a-f]{64}")


def _bad_entry(rel: str, info) -> str | None:
    p = PurePosixPath(rel)
    if not rel or "\\" in rel or "\0" in rel or p.is_absolute() or any(part in ("", ".", "..") for part in rel.split("/")):
        return "not a relative path inside the artifact"
    if rel == MANIFEST:
        return "the manifest cannot list itself"
    if not isinstance(info, dict) or not isinstance(info.get("bytes"), int) or isinstance(info.get("bytes"), bool) \
            or info["bytes"] < 0 or not isinstance(info.get("sha256"), str) or not _HEX64.fullmatch(info["sha256"]):
        return "needs `bytes` (a non-negative integer) and `sha256` (64 lowercase hex digits)"
    return None


def _walk(directory: Path) -> tuple[set[str], list[str], list[str]]:
    """Regular files under `directory` (relative posix paths), the symlinks found, and the special files (FIFOs,
    sockets, devices: reading one would block or never end); links are never followed."""
    files, links, odd = set(), [], []
    for root, dirs, names in os.walk(directory, followlinks=False):
        base = Path(root)
        for d in list(dirs):
            if (base / d).is_symlink():
                links.append((base / d).relative_to(directory).as_posix())
                dirs.remove(d)
        for n in names:
            rel = (base / n).relative_to(directory).as_posix()
            kind = kind_of(base / n)
            if kind == "symlink":
                links.append(rel)
            elif kind == "file":
                files.add(rel)
            else:
                odd.append(f"{rel} ({kind or 'unreadable'})")
    return files, links, odd


def verify(directory: Path, expected_digest: str | None = None, *, hashes: bool = True) -> list[str]:
    """Problems found (empty: the manifest matches `expected_digest` when given, every file matches its recorded
    size and sha256 (`hashes=False`: its size only), nothing else is in the directory, no symlinks or special files,
    and the artifact passed its gates)."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    problems = []
    if expected_digest is not None:
        want = parse_digest(expected_digest, "--digest")
        got = digest(directory)
        if got != want:
            problems.append(f"digest: manifest.json is {got}, expected {want} (the manifest was changed or replaced)")
    present, links, odd = _walk(directory)
    problems += [f"symlink (not allowed in an artifact): {rel}" for rel in sorted(links)]
    problems += [f"not a regular file (not allowed in an artifact): {rel}" for rel in sorted(odd)]
    recorded = manifest["files"]
    for rel, info in recorded.items():
        p = directory / rel
        if rel not in present:
            problems.append(f"missing: {rel}")
        elif p.stat().st_size != info["bytes"] or (hashes and sha256(p) != info["sha256"]):
            problems.append(f"modified: {rel}")
    problems += [f"unexpected file: {rel}" for rel in sorted(present - set(recorded) - {MANIFEST})]
    if manifest.get("status") != "passed":
        problems.append(f"status: {manifest.get('status')!r} (only a `passed` artifact is deployable)")
    return problems


def render_report(m: dict) -> str:
    lines = [f"# optpipe artifact: {m['recipe']['name']}", "",
             f"- status: **{m['status']}**", f"- target: `{m['recipe']['target']}`",
             f"- model: `{m['recipe']['model']['source']}`", f"- built: {m['created_utc']} in {m['build_seconds']} s",
             f"- CPU: {m['environment']['cpu']} ({', '.join(k for k, v in m['environment']['isa'].items() if v)})",
             f"- compared with: {m.get('reference', 'fp32 eager PyTorch')}; speed baseline: "
             f"{m.get('speed_baseline', m.get('reference', 'fp32 eager PyTorch'))}", "",
             "## Passes", "", "| # | pass | seconds | changes |", "|---|---|---|---|"]
    for i, p in enumerate(m["passes"], 1):
        ch = ", ".join(f"{k}={v}" for k, v in p["changes"].items() if not isinstance(v, (dict, list)))
        lines.append(f"| {i} | {p['name']} | {p['seconds']} | {ch} |")
    for gname in ("accuracy", "speed", "coverage", "generation", "tasks"):
        g = m["gates"].get(gname)
        if not g:
            continue
        lines += ["", f"## Gate: {gname} — {g['status']}", ""]
        for k, v in g.items():
            if k in ("status", "passed", "thresholds", "failures", "runs", "runs_columns", "layers", "storage") or \
                    (isinstance(v, list) and not k.endswith("_ci95")):
                continue
            lines.append(f"- {k}: {v}")
        lines.append(f"- thresholds: {json.dumps(g['thresholds'])}")
        for f in g["failures"]:
            lines.append(f"- **FAILED**: {f}")
    storage = (m["gates"].get("coverage") or {}).get("storage")
    if storage:
        lines += ["", f"## Storage: {storage['bits_per_weight']} bits per weight", "",
                  "| " + " | ".join(STORAGE_COLUMNS) + " |", "|" + "---|" * len(STORAGE_COLUMNS)]
        lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in storage_rows(storage)]
    return "\n".join(lines) + "\n"
