"""Progress in logs: one plain line per long step, never carriage returns; -q says nothing."""
from optpipe import progress


def test_a_log_gets_one_line_when_the_step_ends(capsys):
    assert list(progress.track(range(3), "calibrating", unit="layer")) == [0, 1, 2]  # capsys: stderr is no TTY
    with progress.bar(2048, "writing weights", "B") as b:
        b.update(2048)
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert len(lines) == 2 and lines[0].startswith("    calibrating: 3 layer in ") and lines[0].endswith("s")
    assert lines[1].startswith("    writing weights: 2,048 B in ")


def test_quiet_and_unlogged_steps_say_nothing(capsys):
    assert sum(progress.track(range(4), "speed gate", log=False)) == 6
    progress.set_quiet(True)
    try:
        assert list(progress.track("ab", "tokenizing")) == ["a", "b"]
        progress.note("tracing")
        assert not progress.interactive()
    finally:
        progress.set_quiet(False)
    assert capsys.readouterr().err == ""


def test_a_note_comes_before_a_step_with_nothing_to_count(capsys):
    progress.note("tracing opt with torch.onnx.export")
    assert capsys.readouterr().err == "    tracing opt with torch.onnx.export\n"
