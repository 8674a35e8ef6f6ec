"""Adversarial process conditions: a hang-up or a kill during a gate, a closed stderr, a full stdout, Ctrl-C under
--json. Run as a user's shell would run them (subprocesses) where the process itself is what is tested."""
import json
import signal
import subprocess
import sys
import threading
import time

import pytest

from optpipe import artifact
from optpipe.cli import main

from ..conftest import FUSED_INT4, tiny_recipe
from .harness import base_recipe, write

pytestmark = pytest.mark.timeout(30)
CLI = [sys.executable, "-m", "optpipe.cli"]


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGTERM])
def test_a_signal_during_the_gates_leaves_nothing_behind(signum, tiny_llama, tmp_path):
    recipe = write(tmp_path / "r.yaml", tiny_recipe(tiny_llama, FUSED_INT4, speed={
        "min_decode_speedup": 0.01, "prompt_tokens": 16, "new_tokens": 200, "repeats": 50, "threads": 1}))
    out = tmp_path / "art"
    proc = subprocess.Popen(CLI + ["build", str(recipe), "-o", str(out)], stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reached = threading.Event()

    def read():
        for line in proc.stderr:
            lines.append(line)
            if "speed gate:" in line:
                reached.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert reached.wait(25), "".join(lines[-20:])
    time.sleep(0.5)
    proc.send_signal(signum)
    proc.wait(timeout=20)
    reader.join(timeout=10)
    err = "".join(lines)
    assert proc.returncode == 130 and "nothing was emitted" in err, (proc.returncode, err[-2000:])
    assert "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob(".optpipe-*"))


@pytest.mark.parametrize("good", [True, False])
def test_a_closed_stderr_still_gives_the_exit_code_and_the_json(good, tiny_llama, tmp_path):
    recipe = base_recipe(tiny_llama)
    if not good:
        recipe["seed"] = "x"
    file = write(tmp_path / "r.yaml", recipe)
    run = subprocess.run(CLI + ["validate", str(file), "--json"], stderr=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         text=True, timeout=25, preexec_fn=lambda: __import__("os").close(2))
    assert run.returncode == (0 if good else 2), run.stdout
    assert json.loads(run.stdout)["status"] == ("ok" if good else "error")


@pytest.mark.parametrize("argv", [["passes", "--json"], ["targets"], ["passes", "export"]])
def test_a_full_stdout_is_exit_2_with_a_message_not_a_traceback(argv):
    """Large output fails mid-print, small output at the final flush: both are said on stderr."""
    with open("/dev/full", "w") as full:
        run = subprocess.run(CLI + argv, stdout=full, stderr=subprocess.PIPE, text=True, timeout=25)
    assert run.returncode == 2, run.stderr
    assert "cannot write the result to standard output: No space left on device" in run.stderr
    assert "Traceback" not in run.stderr and "Exception ignored" not in run.stderr


def test_an_interrupted_verify_under_json_still_prints_one_json_object(tmp_path, capsys, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(artifact, "verify", interrupted)
    (tmp_path / "manifest.json").write_text(json.dumps({"files": {"a": {"bytes": 0, "sha256": "0" * 64}}}))
    assert main(["verify", str(tmp_path), "--json"]) == 130
    out = capsys.readouterr().out
    assert json.loads(out) == {"status": "interrupted", "exit_code": 130, "error": "interrupted; nothing was emitted"}
