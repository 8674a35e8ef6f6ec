"""Tamper-evident artifacts: `verify` reads nothing outside the artifact, follows no symlink, answers every
malformed manifest with exit 4 and one line; the digest printed by `build` pins the manifest and so every file."""
import hashlib
import json
import os
import shutil

import pytest

import optpipe
from optpipe.cli import main


@pytest.fixture
def art(artifact_copy, built_artifact):
    return artifact_copy, built_artifact[1]


def _manifest(path):
    return json.loads((path / "manifest.json").read_text())


def _write_manifest(path, m):
    (path / "manifest.json").write_text(json.dumps(m, indent=2))


def _verify(capsys, *args):
    code = main(["verify", *map(str, args)])
    err = capsys.readouterr().err
    assert "Traceback" not in err and "internal error" not in err
    return code, err


def test_digest_from_build_verifies_and_is_shown_by_inspect(art, capsys):
    path, digest = art
    assert digest.startswith("sha256:") and len(digest) == 71
    assert _verify(capsys, path, "--digest", digest)[0] == 0
    assert main(["inspect", str(path)]) == 0 and digest in capsys.readouterr().out
    assert optpipe.load(path, threads=1, digest=digest).max_length == 256


def test_edited_gate_figure_is_caught_by_the_digest(art, capsys):
    path, digest = art
    m = _manifest(path)
    m["gates"]["accuracy"]["ppl_delta_pct"] = 0.01
    _write_manifest(path, m)
    code, err = _verify(capsys, path, "--digest", digest)
    assert code == 4 and "digest: manifest.json is" in err


@pytest.mark.parametrize("status", ["rejected", "passed "])
def test_status_edit_is_refused(art, capsys, status):
    path, digest = art
    m = _manifest(path)
    m["status"] = status
    _write_manifest(path, m)
    assert _verify(capsys, path)[0] == 4  # not `passed`: not deployable, digest or not
    assert _verify(capsys, path, "--digest", digest)[0] == 4
    with pytest.raises(optpipe.ArtifactError, match="not 'passed'"):
        optpipe.load(path, threads=1)
    assert optpipe.load(path, threads=1, allow_rejected=True).max_length == 256


def test_rehashed_model_swap_passes_plain_verify_but_not_the_digest(art, capsys):
    path, digest = art
    data = path / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[100] ^= 0xFF
    data.write_bytes(bytes(raw))
    m = _manifest(path)
    m["files"]["model.onnx.data"] = {"bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
    _write_manifest(path, m)
    assert _verify(capsys, path)[0] == 0  # the manifest vouches for itself: this is why the digest exists
    code, err = _verify(capsys, path, "--digest", digest)
    assert code == 4 and "digest" in err
    with pytest.raises(optpipe.ArtifactError, match="digest"):
        optpipe.load(path, threads=1, digest=digest)


@pytest.mark.parametrize("entry", ["../../../../etc/passwd", "/etc/passwd", "a/../../x", "./model.onnx", "",
                                   "sub//x", "manifest.json"])
def test_entries_outside_the_artifact_are_refused(art, capsys, entry):
    path, _ = art
    target = "/etc/passwd"
    m = _manifest(path)
    raw = open(target, "rb").read()
    m["files"][entry] = {"bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
    _write_manifest(path, m)
    code, err = _verify(capsys, path)
    assert code == 4 and ("not a relative path inside the artifact" in err or "cannot list itself" in err)
    assert err.count("\n") == 1  # one line


@pytest.mark.parametrize("kind", ["file", "dir-etc", "dir-parent", "replaced-file"])
def test_symlinks_are_refused(art, capsys, kind):
    path, _ = art
    if kind == "file":
        os.symlink("/etc/passwd", path / "passwd")
    elif kind == "dir-etc":
        os.symlink("/etc", path / "etc")
    elif kind == "dir-parent":
        os.symlink("..", path / "up")
    else:  # a listed file replaced by a link to an identical copy elsewhere
        copy = path.parent / "copy.onnx"
        shutil.copy(path / "model.onnx", copy)
        (path / "model.onnx").unlink()
        os.symlink(copy, path / "model.onnx")
    code, err = _verify(capsys, path)
    assert code == 4 and "symlink" in err


def test_nested_manifest_and_any_unlisted_file_are_refused(art, capsys):
    path, _ = art
    (path / "nested").mkdir()
    (path / "nested" / "manifest.json").write_text("{}")
    code, err = _verify(capsys, path)
    assert code == 4 and "unexpected file: nested/manifest.json" in err


@pytest.mark.parametrize("content", [b"[1, 2]", b"{}", b"[" * 100000 + b"]" * 100000, b"\xff\xfe{}", b"not json",
                                     b'{"files": {"model.onnx": {"sha256": "00"}}}',
                                     b'{"files": {"model.onnx": {"bytes": -1, "sha256": "' + b"0" * 64 + b'"}}}',
                                     b'{"files": {"model.onnx": {"bytes": true, "sha256": "' + b"0" * 64 + b'"}}}',
                                     b'{"files": []}', b'"a string"', b"null"])
def test_malformed_manifests_exit_4_with_one_line(art, capsys, content):
    path, _ = art
    (path / "manifest.json").write_bytes(content)
    for cmd in (["verify", str(path)], ["inspect", str(path)], ["gate", str(path)]):
        assert main(cmd) == 4
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    with pytest.raises(optpipe.ArtifactError):
        optpipe.load(path)
