"""Hypothesis against the two readers of bytes an attacker controls: the GGUF header reader and the manifest
reader. Every input ends in a value or the reader's own error (ValueError / ModelLoadError, ArtifactError), fast,
never another exception, never a hang or an allocation the file does not justify."""
import json
import struct
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from optpipe import artifact, preflight
from optpipe.errors import ArtifactError, ModelLoadError

pytestmark = pytest.mark.timeout(30)
FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

u64 = st.one_of(st.integers(0, 64), st.sampled_from([2 ** 31, 2 ** 32 - 1, 2 ** 62, 2 ** 63, 2 ** 64 - 1]))
vtype = st.one_of(st.integers(0, 13), st.integers(14, 2 ** 32 - 1))


@st.composite
def gguf_bytes(draw):
    """A header that starts well and goes wrong anywhere: counts, lengths, types and payloads drawn freely."""
    out = b"GGUF" + struct.pack("<I", draw(st.integers(0, 4))) + struct.pack("<QQ", draw(u64), draw(u64))
    for _ in range(draw(st.integers(0, 6))):
        key = draw(st.text(max_size=12)).encode()
        out += struct.pack("<Q", draw(st.one_of(st.just(len(key)), u64))) + key
        t = draw(vtype)
        out += struct.pack("<I", t)
        if t == 9:
            out += struct.pack("<IQ", draw(vtype), draw(u64))
        out += draw(st.binary(max_size=40))
    return out + draw(st.binary(max_size=64))


@FAST
@given(data=gguf_bytes())
def test_the_gguf_header_reader_ends_in_a_header_or_its_own_error(tmp_path, data):
    path = tmp_path / "f.gguf"
    path.write_bytes(data)
    t0 = time.perf_counter()
    try:
        header = preflight.gguf_header(path)
    except (ValueError, ModelLoadError):
        header = None
    assert time.perf_counter() - t0 < 2
    if header is not None:
        assert isinstance(header, dict) and header["__tensor_count__"] >= 0
        try:
            preflight._gguf_facts(path)
        except ModelLoadError:
            pass


@FAST
@given(data=st.binary(max_size=256))
def test_random_bytes_after_the_magic_never_escape_the_reader(tmp_path, data):
    path = tmp_path / "g.gguf"
    path.write_bytes(b"GGUF" + data)
    try:
        preflight.gguf_header(path)
    except (ValueError, ModelLoadError):
        pass


json_values = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                                     st.text(max_size=8)),
                           lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                   st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                           max_leaves=10)


@FAST
@given(doc=st.one_of(json_values, st.dictionaries(st.sampled_from(["files", "status", "recipe", "schema_version"]),
                                                  json_values, max_size=4)),
       files=st.one_of(st.none(), st.dictionaries(st.text(max_size=10), json_values, max_size=3)))
def test_the_manifest_reader_accepts_a_well_formed_table_or_says_exit_4(tmp_path, doc, files):
    d = tmp_path / "a"
    d.mkdir(exist_ok=True)
    if isinstance(doc, dict) and files is not None:
        doc = {**doc, "files": files}
    (d / "manifest.json").write_text(json.dumps(doc))
    try:
        m = artifact.read_manifest(d)
    except ArtifactError:
        return
    assert isinstance(m["files"], dict) and m["files"]
    try:
        problems = artifact.verify(d)
    except ArtifactError:
        return
    assert problems  # nothing listed is present: a random manifest never verifies


@FAST
@given(raw=st.binary(max_size=200))
def test_manifest_bytes_of_any_kind_are_a_manifest_or_exit_4(tmp_path, raw):
    d = tmp_path / "b"
    d.mkdir(exist_ok=True)
    (d / "manifest.json").write_bytes(raw)
    try:
        artifact.read_manifest(d)
    except ArtifactError:
        pass
