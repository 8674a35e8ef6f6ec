"""One way to run an adversarial case through the command line, in process: the exit code, no traceback, the
message naming what is at fault, and under --json exactly one JSON object on stdout, whatever happened."""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import yaml

from optpipe.cli import main

from ..conftest import FUSED_INT4, tiny_recipe

FORBIDDEN = ("Traceback", "internal error")


def run_cli(capsys, argv: list[str], code: int, says: str | None = None, *, json_too: bool = True) -> str:
    """Run `argv` (and again with --json): assert the exit code, no traceback, `says` (a regex) in the message.
    Returns stderr of the plain run."""
    got = main(list(argv))
    out, err = capsys.readouterr()
    assert not any(f in out + err for f in FORBIDDEN), err
    assert got == code, f"exit {got}, expected {code}: {err}"
    if says is not None:
        assert re.search(says, err + out), f"{says!r} not in: {err}{out}"
    if json_too:
        got_json = main(list(argv) + ["--json"])
        out_j, err_j = capsys.readouterr()
        assert got_json == code, f"with --json: exit {got_json}, expected {code}: {err_j}"
        assert not any(f in out_j + err_j for f in FORBIDDEN), err_j
        obj = json.loads(out_j)  # exactly one JSON document, or this raises
        assert isinstance(obj, dict)
        if code not in (0, 4):  # verify's own failure report carries "status": "failed" and its problems
            assert obj.get("exit_code") == code, obj
    return err


def base_recipe(model: Path) -> dict:
    return copy.deepcopy(tiny_recipe(model, FUSED_INT4))


def write(path: Path, recipe) -> Path:
    path.write_text(yaml.safe_dump(recipe) if not isinstance(recipe, str) else recipe, encoding="utf-8")
    return path


def set_path(doc, path: tuple, value):
    """doc[path] = value, creating mappings on the way."""
    for k in path[:-1]:
        doc = doc.setdefault(k, {}) if isinstance(k, str) else doc[k]
    doc[path[-1]] = value
    return doc
