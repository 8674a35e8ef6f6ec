"""The command line a platform engineer scripts against: --version, python -m optpipe, --help with exit codes,
passes/targets listings generated from the code, --json results, -q, and progress without \\r in logs."""
import json
import subprocess
import sys

import optpipe
from optpipe.cli import main

from .conftest import FUSED_INT4, tiny_recipe, write_recipe


def test_version_and_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "optpipe", "--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == f"optpipe {optpipe.__version__}"


def test_help_documents_exit_codes_and_examples(capsys):
    assert main(["--help"]) == 0  # main returns the exit code, --help included (no SystemExit to catch)
    text = capsys.readouterr().out
    assert "exit codes:" in text and "3  a gate refused" in text and "optpipe build recipes/" in text
    assert main(["verify", "--help"]) == 0
    assert "--digest" in capsys.readouterr().out


def test_passes_and_targets_are_listed_from_the_code(capsys):
    assert main(["passes", "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    assert {"export", "quantize-int4", "bf16-autocast"} <= set(table)
    impls = {tuple(i["targets"]): i for i in table["quantize-int4"]}
    opts = {o["name"]: o for o in impls[("cpu-onnx",)]["options"]}
    assert opts["block_size"]["default"] == 32 and "Literal" in opts["block_size"]["type"]
    assert main(["passes", "static-kv-cache"]) == 0
    assert "max_length: int = 2048" in capsys.readouterr().out
    assert main(["passes", "nope"]) == 2
    assert main(["targets", "--json"]) == 0
    assert set(json.loads(capsys.readouterr().out)) == {"cpu-onnx", "cpu-torch", "cpu-ipex", "gpu-tensorrt"}


def test_doctor_says_which_recipes_this_cpu_can_build(capsys, monkeypatch):
    from optpipe import hw

    from .conftest import ROOT

    monkeypatch.setattr(hw, "cpu_flags", lambda: frozenset({"avx2"}))
    assert main(["doctor", "--json", "--recipes", str(ROOT / "recipes")]) == 0
    recipes = {k.rsplit("/", 1)[1]: v for k, v in json.loads(capsys.readouterr().out)["recipes"].items()}
    assert recipes["smollm2-135m-cpu-torch-bf16.yaml"]["buildable"] is False
    assert "bf16" in recipes["smollm2-135m-cpu-torch-bf16.yaml"]["reason"]
    assert recipes["smollm2-135m-cpu-torch-int4.yaml"]["buildable"] is True


def test_json_results_and_quiet_build(tiny_llama, tmp_path, capsys):
    recipe = write_recipe(tmp_path, tiny_recipe(tiny_llama, FUSED_INT4))
    assert main(["validate", str(recipe), "--json"]) == 0
    v = json.loads(capsys.readouterr().out)
    assert v["status"] == "ok" and v["model_type"] == "llama" and v["family"] == "llama" and v["passes"][0] == "export"
    out = tmp_path / "art"
    assert main(["-q", "build", str(recipe), "-o", str(out), "--json"]) == 0
    captured = capsys.readouterr()
    b = json.loads(captured.out)
    assert b["status"] == "passed" and b["digest"].startswith("sha256:") and captured.err == ""
    assert main(["verify", str(out), "--json", "--digest", b["digest"]]) == 0
    assert json.loads(capsys.readouterr().out)["problems"] == []
    assert main(["build", str(recipe), "-o", str(out), "--json"]) == 2  # exists: the error is JSON too
    err = json.loads(capsys.readouterr().out)
    assert err["status"] == "error" and err["exit_code"] == 2 and "already exists" in err["error"]


def test_json_refusal_carries_the_gate_measurements(tiny_llama, tmp_path, capsys):
    """A pipeline reading `--json` learns why a build was refused: each gate's status, statistic and interval."""
    recipe = write_recipe(tmp_path, tiny_recipe(tiny_llama, FUSED_INT4, speed={
        "min_decode_speedup": 1000, "prompt_tokens": 16, "new_tokens": 8, "repeats": 2, "threads": 1}))
    assert main(["-q", "build", str(recipe), "-o", str(tmp_path / "art"), "--json"]) == 3
    err = json.loads(capsys.readouterr().out)
    speed = err["gates"]["speed"]
    assert err["exit_code"] == 3 and speed["status"] == "failed" and speed["rounds"] >= 2
    lo, hi = speed["decode_speedup_ci95"]
    assert lo <= speed["decode_speedup"] <= hi < 1000 and err["gates"]["accuracy"]["status"] == "passed"


def test_build_log_has_no_carriage_returns_when_not_a_tty(tiny_llama, tmp_path):
    recipe = write_recipe(tmp_path, tiny_recipe(tiny_llama, FUSED_INT4 + []))
    proc = subprocess.run([sys.executable, "-m", "optpipe", "build", str(recipe), "-o", str(tmp_path / "o")],
                          capture_output=True, timeout=300)  # bytes: text mode would turn \r into \n
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert b"\r" not in proc.stderr and b"accuracy gate:" in proc.stderr and b"window in" in proc.stderr


def test_model_option_points_a_recipe_at_another_model(tiny_llama, tiny_qwen2, tmp_path, capsys):
    """`--model` swaps the recipe's model and keeps its passes and gates: a shipped recipe pointed at your weights."""
    recipe = write_recipe(tmp_path, tiny_recipe(tiny_llama, FUSED_INT4))
    assert main(["validate", str(recipe), "--model", str(tiny_qwen2), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model_type"] == "qwen2"
    assert main(["validate", str(recipe), "--model", str(tmp_path / "absent"), "--json"]) == 2
    assert "absent does not exist" in json.loads(capsys.readouterr().out)["error"]
    out = tmp_path / "art"
    assert main(["-q", "build", str(recipe), "--model", str(tiny_qwen2), "-o", str(out), "--json"]) == 0
    capsys.readouterr()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["model_type"] == "qwen2" and manifest["recipe"]["model"]["source"] == str(tiny_qwen2)


def test_a_closed_output_pipe_ends_quietly_with_141():
    """`optpipe inspect ART | head` was an 'internal error: BrokenPipeError ... please report it'."""
    import os
    import subprocess
    import sys

    read, write = os.pipe()
    os.close(read)  # the reader is gone before anything is written
    try:
        proc = subprocess.run([sys.executable, "-m", "optpipe", "passes"], stdout=write, stderr=subprocess.PIPE,
                              text=True, timeout=120)
    finally:
        os.close(write)
    assert proc.returncode == 141, proc.stderr
    assert "error" not in proc.stderr.lower() and "Exception" not in proc.stderr, proc.stderr
