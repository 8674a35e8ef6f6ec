"""Every malformed recipe in tests/data/bad_recipes/ is refused by `optpipe validate` with exit 2, within 5 s,
with a one-line-per-problem message naming the file and the field (its first line says which: `# expect: ...`),
and never with a traceback."""
import time

import pytest

from optpipe.cli import main

from .conftest import DATA

BAD = sorted((DATA / "bad_recipes").glob("*.yaml"))


def test_there_are_at_least_sixty():
    assert len(BAD) >= 60


@pytest.mark.parametrize("path", BAD, ids=[p.stem for p in BAD])
def test_validate_refuses_with_exit_2_naming_file_and_field(path, capsys, monkeypatch):
    monkeypatch.delenv("OPTPIPE_ALLOW_PLUGINS", raising=False)
    expect = path.read_bytes().split(b"\n", 1)[0].decode("ascii").removeprefix("# expect: ")
    t0 = time.perf_counter()
    code = main(["validate", str(path)])
    seconds = time.perf_counter() - t0
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and "internal error" not in err
    assert path.name in err or str(path) in err, err
    assert expect in err, err
    assert seconds < 5, seconds
