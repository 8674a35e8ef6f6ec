"""Adversarial artifacts and digests: `verify`, `gate`, `inspect` and `optpipe.load` on an artifact whose bytes are
not the ones its manifest lists (appended, added, replaced, linked, a FIFO), on manifests that lie or lack fields,
and with digests of every malformed shape; `--overwrite` pointed at what is not an artifact."""
import json
import os
import shutil
from pathlib import Path

import pytest

import optpipe
from optpipe import builder
from optpipe.cli import main

from .harness import base_recipe, run_cli, write

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def built(built_artifact):
    return built_artifact


@pytest.fixture
def art(artifact_copy):
    return artifact_copy


def _manifest(p: Path) -> dict:
    return json.loads((p / "manifest.json").read_text())


def _rewrite(p: Path, change) -> None:
    m = _manifest(p)
    change(m)
    (p / "manifest.json").write_text(json.dumps(m))


def _replace_with_fifo(p: Path) -> None:
    (p / "model.onnx.data").unlink()
    os.mkfifo(p / "model.onnx.data")


TAMPER = {
    "appended-1mb": (lambda p: open(p / "model.onnx.data", "ab").write(os.urandom(1 << 20)), r"modified: model.onnx.data"),
    "added-file": (lambda p: (p / "injected.sh").write_text("#!/bin/sh\necho hi\n"), r"unexpected file: injected.sh"),
    "added-hidden-file": (lambda p: (p / ".hidden").write_text("x"), r"unexpected file: .hidden"),
    "added-nested-file": (lambda p: ((p / "sub").mkdir(), (p / "sub" / "x.py").write_text("x")),
                          r"unexpected file: sub/x.py"),
    "replaced-same-size": (lambda p: (p / "model.onnx.data").write_bytes(
        os.urandom((p / "model.onnx.data").stat().st_size)), r"modified: model.onnx.data"),
    "truncated": (lambda p: os.truncate(p / "model.onnx.data", 100), r"modified: model.onnx.data"),
    "deleted": (lambda p: (p / "model.onnx.data").unlink(), r"missing: model.onnx.data"),
    "tokenizer-symlink": (lambda p: ((p / "tokenizer.json").unlink(), (p / "tokenizer.json").symlink_to("/etc/passwd")),
                          r"symlink \(not allowed in an artifact\): tokenizer.json"),
    "symlinked-dir": (lambda p: (p / "link").symlink_to("/etc"), r"symlink \(not allowed in an artifact\): link"),
    "fifo-added": (lambda p: os.mkfifo(p / "pipe"), r"not a regular file .*pipe \(fifo\)"),
    "fifo-for-listed-file": (_replace_with_fifo, r"not a regular file .*model.onnx.data \(fifo\)"),
    "status-rejected": (lambda p: _rewrite(p, lambda m: m.update(status="rejected")), r"status:? (is )?'rejected'"),
}


@pytest.mark.parametrize("command", ["verify", "gate", "load"])
@pytest.mark.parametrize("name", sorted(TAMPER))
def test_a_tampered_artifact_is_refused_with_exit_4_before_anything_is_measured(name, command, art, built, capsys,
                                                                                 monkeypatch):
    make, said = TAMPER[name]
    make(art)
    monkeypatch.setattr(builder, "run_gates", lambda *a, **k: pytest.fail("the gates measured a tampered artifact"))
    monkeypatch.setattr(builder.models, "open_model", lambda *a, **k: pytest.fail("loaded a model for a tampered one"))
    if command == "load":
        with pytest.raises(optpipe.ArtifactError, match=said.replace(r"\(not allowed in an artifact\)", ".*")):
            optpipe.load(art, threads=1, digest=built[1] if name != "status-rejected" else None)
        return
    run_cli(capsys, [command, str(art)], 4, said)


def test_an_intact_artifact_still_passes_the_gate(art, capsys):
    """The control for the refusals above: the same copy, untouched, is measured and passes."""
    run_cli(capsys, ["gate", str(art), "--threads", "1"], 0, json_too=False)


MANIFESTS = {
    "no-recipe": (lambda m: m.pop("recipe"), "gate", 4, r"records no `recipe`"),
    "recipe-a-list": (lambda m: m.update(recipe=[1]), "gate", 4, r"records no `recipe`"),
    "recipe-bad-target": (lambda m: m["recipe"].update(target=5), "gate", 4, r"recipe.*target"),
    "recipe-bad-gate": (lambda m: m["recipe"]["gates"]["speed"].update(repeats="many"), "gate", 4,
                        r"gates\.speed\.repeats"),
    "pass-seconds-word": (lambda m: m["passes"][0].update(seconds="fast"), "inspect", 4, r"lacks a field inspect needs"),
    "passes-missing": (lambda m: m.pop("passes"), "inspect", 4, r"lacks a field inspect needs"),
    "files-empty": (lambda m: m.update(files={}), "verify", 4, r"no `files` table"),
    "files-a-list": (lambda m: m.update(files=["a"]), "verify", 4, r"no `files` table"),
    "file-entry-escapes": (lambda m: m["files"].update({"../x": {"bytes": 1, "sha256": "0" * 64}}), "verify", 4,
                           r"not a relative path inside the artifact"),
    "file-entry-absolute": (lambda m: m["files"].update({"/etc/passwd": {"bytes": 1, "sha256": "0" * 64}}), "verify",
                            4, r"not a relative path"),
    "file-entry-bool-bytes": (lambda m: m["files"]["model.onnx"].update(bytes=True), "verify", 4, r"needs `bytes`"),
    "file-entry-short-hash": (lambda m: m["files"]["model.onnx"].update(sha256="ab"), "verify", 4, r"needs `bytes`"),
}


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_a_manifest_that_lacks_or_garbles_a_field_is_exit_4(name, art, capsys, monkeypatch):
    change, command, code, said = MANIFESTS[name]
    _rewrite(art, change)
    monkeypatch.setattr(builder, "run_gates", lambda *a, **k: pytest.fail("measured"))
    run_cli(capsys, [command, str(art)], code, said, json_too=command != "inspect")
    if command == "inspect":  # inspect --json prints the manifest as it is: what a script asked for
        assert main([command, str(art), "--json"]) == 0 and json.loads(capsys.readouterr().out)["digest"]


RAW_MANIFESTS = {
    "not-json": (b"{", r"not valid JSON"),
    "not-utf8": (b'{"a": "\xff"}', r"not UTF-8"),
    "a-list": (b"[]", r"a manifest is a JSON object"),
    "nested-deep": (b"[" * 100_000 + b"]" * 100_000, r"nested too deeply"),
    "empty": (b"", r"not valid JSON"),
}


@pytest.mark.parametrize("command", ["verify", "gate", "inspect"])
@pytest.mark.parametrize("name", sorted(RAW_MANIFESTS))
def test_a_manifest_that_is_not_one_is_exit_4(name, command, art, capsys):
    data, said = RAW_MANIFESTS[name]
    (art / "manifest.json").write_bytes(data)
    run_cli(capsys, [command, str(art)], 4, said)


@pytest.mark.parametrize("kind", ["fifo", "symlink", "directory", "missing"])
@pytest.mark.parametrize("command", ["verify", "gate", "inspect"])
def test_a_manifest_that_is_not_a_regular_file_is_never_opened(kind, command, art, capsys):
    m = art / "manifest.json"
    m.unlink()
    if kind == "fifo":
        os.mkfifo(m)
    elif kind == "symlink":
        m.symlink_to(art / "model.onnx")
    elif kind == "directory":
        m.mkdir()
    run_cli(capsys, [command, str(art)], 4, r"no manifest.json")


def _hex(built):
    return built[1].removeprefix("sha256:")


DIGESTS = {  # how the digest is written -> exit code (2: malformed, 4: another artifact's, 0: this one's)
    "as-printed": (lambda h: f"sha256:{h}", 0),
    "upper-prefix": (lambda h: f"SHA256:{h}", 0),
    "upper-hex": (lambda h: f"sha256:{h.upper()}", 0),
    "bare-hex": (lambda h: h, 0),
    "other-artifact": (lambda h: "sha256:" + "0" * 64, 4),
    "md5": (lambda h: "md5:" + h[:32], 2),
    "63-digits": (lambda h: "sha256:" + h[:63], 2),
    "65-digits": (lambda h: "sha256:" + h + "0", 2),
    "empty": (lambda h: "", 2),
    "trailing-space": (lambda h: f"sha256:{h} ", 2),
    "leading-space": (lambda h: f" sha256:{h}", 2),
    "double-prefix": (lambda h: f"sha256:sha256:{h}", 2),
    "non-hex": (lambda h: "sha256:" + "g" * 64, 2),
    "newline": (lambda h: f"sha256:{h}\n", 2),
}


@pytest.mark.parametrize("name", sorted(DIGESTS))
def test_a_digest_is_parsed_once_malformed_is_exit_2(name, art, built, capsys):
    make, code = DIGESTS[name]
    said = {0: None, 2: r"--digest: malformed digest", 4: r"digest: manifest.json is"}[code]
    run_cli(capsys, ["verify", str(art), "--digest", make(_hex(built))], code, said)


@pytest.mark.parametrize("digest", [12345, b"sha256:00", 1.5, ["sha256:x"], "md5:abc", ""])
def test_load_with_a_digest_that_is_not_one_is_an_input_error(digest, art):
    with pytest.raises(optpipe.InputError, match=r"digest"):
        optpipe.load(art, threads=1, digest=digest)


def test_load_wraps_a_broken_model_file_in_an_artifact_error(art, built):
    """Without a digest, a model file of the recorded size but other bytes reaches ONNX Runtime: its error is
    reported as the artifact's, naming the path (with the digest it is refused before)."""
    size = (art / "model.onnx").stat().st_size
    (art / "model.onnx").write_bytes(b"\x00" * size)
    with pytest.raises(optpipe.ArtifactError, match=r"its cpu-onnx model cannot be loaded"):
        optpipe.load(art, threads=1)
    with pytest.raises(optpipe.ArtifactError, match=r"modified: model.onnx"):
        optpipe.load(art, threads=1, digest=built[1])


@pytest.mark.parametrize("target", ["model", "model-parent", "recipe-folder", "cwd", "home", "plain-dir", "file",
                                    "symlink-to-artifact", "artifact-without-manifest"])
def test_overwrite_replaces_only_an_optpipe_artifact(target, tiny_llama, art, tmp_path, capsys, monkeypatch):
    model = tmp_path / "models" / "m"
    shutil.copytree(tiny_llama, model)
    (tmp_path / "models" / "notes.txt").write_text("keep me")
    rdir = tmp_path / "recipes"
    rdir.mkdir()
    recipe = write(rdir / "r.yaml", {**base_recipe(tiny_llama), "model": str(model)})
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "data.csv").write_text("1,2")
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "link").symlink_to(art)
    bare = tmp_path / "bare"
    shutil.copytree(art, bare)
    (bare / "manifest.json").unlink()
    out = {"model": model, "model-parent": tmp_path / "models", "recipe-folder": rdir, "cwd": work, "home": home,
           "plain-dir": plain, "file": tmp_path / "file.txt", "symlink-to-artifact": tmp_path / "link",
           "artifact-without-manifest": bare}[target]
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    run_cli(capsys, ["build", str(recipe), "-o", str(out), "--overwrite"], 2, r"--overwrite refused .*nothing was deleted")
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_overwrite_does_replace_an_artifact(tiny_llama, art, tmp_path, capsys):
    recipe = write(tmp_path / "r.yaml", base_recipe(tiny_llama))
    old = _manifest(art)["created_utc"]
    (art / "report.md").write_text("old")  # whatever the old artifact held goes
    run_cli(capsys, ["-q", "build", str(recipe), "-o", str(art), "--overwrite"], 0, json_too=False)
    assert (art / "report.md").read_text() != "old" and _manifest(art)["status"] == "passed" and old


def test_a_reference_artifact_whose_manifest_has_no_recipe_is_refused_at_validate(tiny_llama, art, tmp_path, capsys):
    _rewrite(art, lambda m: m.pop("recipe"))
    recipe = base_recipe(tiny_llama)
    recipe["gates"]["accuracy"]["reference"] = str(art)
    run_cli(capsys, ["validate", str(write(tmp_path / "r.yaml", recipe))], 2, r"gates\.accuracy\.reference")


def test_load_without_a_digest_still_refuses_a_linked_tokenizer(art):
    (art / "tokenizer.json").unlink()
    (art / "tokenizer.json").symlink_to("/etc/passwd")
    with pytest.raises(optpipe.ArtifactError, match=r"symlink .*tokenizer.json"):
        optpipe.load(art, threads=1)


@pytest.mark.parametrize("field", ["reference", "baseline"])
def test_a_reference_artifact_holding_a_fifo_is_refused_without_blocking(field, tiny_llama, art, tmp_path, capsys):
    _replace_with_fifo(art)
    recipe = base_recipe(tiny_llama)
    recipe["gates"]["accuracy" if field == "reference" else "speed"][field] = str(art)
    run_cli(capsys, ["validate", str(write(tmp_path / "r.yaml", recipe))], 2,
            rf"gates\.(accuracy|speed)\.{field}: .*not a regular file")


EVAL_DATA = {
    "fifo": (lambda p: os.mkfifo(p), r"--eval-data\.source: .*is a FIFO"),
    "binary": (lambda p: p.write_bytes(os.urandom(4096) + b"\0"), r"--eval-data\.source: .*(NUL byte|not UTF-8)"),
    "missing": (lambda p: None, r"--eval-data\.source: file .* not found"),
    "empty": (lambda p: p.write_bytes(b""), r"--eval-data\.source: .* is empty"),
    "unset-variable": (None, r"--eval-data: source: environment variable OPTPIPE_NO_SUCH_VAR is not set"),
}


@pytest.mark.parametrize("name", sorted(EVAL_DATA))
def test_gate_eval_data_that_is_not_text_is_exit_2_before_measuring(name, art, tmp_path, capsys, monkeypatch):
    make, said = EVAL_DATA[name]
    path = tmp_path / "eval.txt"
    if make is not None:
        make(path)
    monkeypatch.setattr(builder, "run_gates", lambda *a, **k: pytest.fail("measured"))
    monkeypatch.setattr(builder.models, "open_model", lambda *a, **k: pytest.fail("loaded a model"))
    given = "${OPTPIPE_NO_SUCH_VAR}" if make is None else str(path)
    run_cli(capsys, ["gate", str(art), "--eval-data", given], 2, said)


@pytest.mark.parametrize("value", [None, 5, ["a"], {"a": 1}])
def test_load_of_something_that_is_not_a_path_is_an_input_error(value):
    with pytest.raises(optpipe.InputError, match="must be a path"):
        optpipe.load(value)
