"""Shared by the benchmark scripts: put a generated table between `<!-- BEGIN name -->` / `<!-- END name -->`
markers of a Markdown file (appending the markers when the file has none), leaving the rest untouched."""
from __future__ import annotations

from pathlib import Path


def write_section(doc: Path, name: str, table: str) -> None:
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    text = doc.read_text() if doc.exists() else f"# Benchmarks\n\n{begin}\n{end}\n"
    if begin not in text:
        text += f"\n{begin}\n{end}\n"
    pre, rest = text.split(begin, 1)
    post = rest.split(end, 1)[1]
    doc.write_text(f"{pre}{begin}\n{table}\n{end}{post}")
