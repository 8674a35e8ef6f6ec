"""End to end on a tiny random-init model: build, emit, inspect, verify, re-gate; and both gates refusing."""
import json

import pytest

import optpipe
from optpipe.cli import main
from optpipe.errors import GateFailed

from .conftest import AVX2_ONLY, AVX512_BF16, DATA, FUSED_INT4, ROOT, fake_cpu, tiny_recipe, write_recipe


def test_build_emits_artifact_with_manifest(tiny_llama, tmp_path, capsys):
    out = tmp_path / "art"
    res = optpipe.build(tiny_recipe(tiny_llama, FUSED_INT4), output=out, log=lambda m: None)
    assert res.passed and res.artifact_path == out.resolve()
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "passed" and m["schema_version"] == 1
    assert [p["name"] for p in m["passes"]] == ["export", "fuse", "static-kv-cache", "quantize-int4"]
    assert m["passes"][3]["changes"]["layers_quantized"] == 8
    assert "gates.accuracy.ppl_delta_pct" in m["summary"] and "gates.speed.decode_speedup" in m["summary"]
    assert m["gates"]["accuracy"]["thresholds"]["max_ppl_delta_pct"] == 5.0
    assert {"model.onnx", "model.onnx.data", "report.md"} <= set(m["files"])
    assert m["environment"]["isa"]["avx2"] in (True, False)
    assert not list(tmp_path.glob(".optpipe-staging-*"))
    # the Python API loads it and generates
    runner = optpipe.load(out, threads=1)
    assert len(runner.generate(__import__("numpy").arange(5, 15), 4, eos_token_id=None).tokens) == 4

    assert main(["inspect", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["recipe"]["name"] == "tiny"
    assert main(["verify", str(out)]) == 0
    # one changed byte is detected
    data = out / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    data.write_bytes(bytes(raw))
    assert main(["verify", str(out)]) == 4
    assert "modified: model.onnx.data" in capsys.readouterr().err


def test_gate_command_reruns_on_user_text(tiny_llama, tmp_path, capsys):
    out = tmp_path / "art"
    optpipe.build(tiny_recipe(tiny_llama, FUSED_INT4), output=out, log=lambda m: None)
    text = tmp_path / "mine.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    assert main(["gate", str(out), "--eval-data", str(text), "--threads", "1"]) == 0
    assert "gates passed" in capsys.readouterr().out
    assert main(["gate", str(out), "--eval-data", str(tmp_path / "nope.txt")]) == 2


def test_accuracy_gate_rejects_corrupted_scales(tiny_llama, tmp_path, capsys):
    passes = FUSED_INT4 + [{"name": "corrupt-scales", "path": str(DATA / "corrupt_scales.py")}]
    recipe = write_recipe(tmp_path, tiny_recipe(tiny_llama, passes, accuracy={"max_ppl_delta_pct": 5.0}))
    out = tmp_path / "art"
    assert main(["build", str(recipe), "-o", str(out), "--allow-plugins"]) == 3
    err = capsys.readouterr().err
    assert "accuracy: perplexity delta" in err and "exceeds max_ppl_delta_pct 5.0%" in err
    assert not out.exists() and not list(tmp_path.glob(".optpipe-staging-*"))


def test_speed_gate_rejects_impossible_speedup_and_keeps_candidate_on_request(tiny_llama, tmp_path):
    out = tmp_path / "art"
    recipe = tiny_recipe(tiny_llama, FUSED_INT4, speed={"min_decode_speedup": 1000, "prompt_tokens": 16,
                                                        "new_tokens": 8, "repeats": 1, "threads": 1})
    with pytest.raises(GateFailed, match=r"decode speedup .* below min_decode_speedup 1000") as e:
        optpipe.build(recipe, output=out, keep_rejected=True, log=lambda m: None)
    assert not out.exists()
    kept = tmp_path / "art.rejected"
    assert (kept / "manifest.json").is_file() and e.value.exit_code == 3
    assert json.loads((kept / "manifest.json").read_text())["status"] == "rejected"


def test_gates_beside_a_busy_machine_measure_at_the_threads_left_free(tiny_llama, tmp_path, monkeypatch):
    from optpipe import hw

    out = tmp_path / "art"
    speed = {"min_decode_speedup": 0.01, "prompt_tokens": 16, "new_tokens": 8, "repeats": 2, "max_background_cpus": 8}
    optpipe.build(tiny_recipe(tiny_llama, FUSED_INT4, speed=speed), output=out, log=lambda m: None)
    monkeypatch.setattr(hw, "physical_cores", lambda: 2)
    monkeypatch.setattr(hw, "usable_cpus", lambda: 2)
    monkeypatch.setattr(hw, "probe_load", lambda *a, **k: 1.0)  # another process keeps one of two CPUs busy
    said = []
    speed_record = optpipe.gate(out, log=said.append).manifest["gates"]["speed"]
    assert speed_record["threads"] == 1 and speed_record["thresholds"]["threads"] == 1
    assert speed_record["threads_default"] == 2 and speed_record["background_cpus_at_start"] == 1.0
    assert any("measuring at 1 thread(s), not 2" in m for m in said)
    # a thread count the user fixed is kept (a busy machine then costs rounds, not threads)
    speed_record = optpipe.gate(out, threads=2, log=lambda m: None).manifest["gates"]["speed"]
    assert speed_record["threads"] == 2 and "threads_default" not in speed_record


def test_existing_output_is_not_overwritten_without_flag(tiny_llama, tmp_path):
    out = tmp_path / "art"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(optpipe.RecipeError, match="already exists"):
        optpipe.build(tiny_recipe(tiny_llama, FUSED_INT4), output=out, log=lambda m: None)
    assert (out / "keep.txt").read_text() == "x"


def test_an_output_no_directory_can_be_made_in_is_refused_before_the_model_loads(tiny_llama, tmp_path):
    """It was an internal error ('FileNotFoundError ... please report it') after the model had loaded."""
    (tmp_path / "a_file").write_text("x")
    said = []
    with pytest.raises(optpipe.RecipeError, match=r"a_file/art: cannot write an artifact there \(Not a directory"):
        optpipe.build(tiny_recipe(tiny_llama, FUSED_INT4), output=tmp_path / "a_file" / "art", log=said.append)
    assert not any("loading model" in m for m in said), said


def test_missing_model_and_uncached_hub_id_fail_fast(tmp_path):
    import time

    with pytest.raises(optpipe.ModelLoadError, match="does not exist"):
        optpipe.build(tiny_recipe(tmp_path / "no-such-dir" / "x", FUSED_INT4) | {"model": "./no/such/dir"},
                      output=tmp_path / "o", log=lambda m: None)
    t0 = time.perf_counter()  # a bare name is a hub id, served from the local cache only: no minute of retries
    with pytest.raises(optpipe.ModelLoadError, match="neither a local path nor a model in the local Hugging Face cache"):
        optpipe.build(tiny_recipe(tmp_path, FUSED_INT4) | {"model": "someorg/not-cached-model"},
                      output=tmp_path / "o", log=lambda m: None)
    assert time.perf_counter() - t0 < 10


def test_out_of_tree_plugin_pass_by_path(tiny_llama, tmp_path):
    from .conftest import ROOT

    passes = FUSED_INT4 + [{"name": "embedding-fp16", "path": str(ROOT / "passes" / "embedding_fp16.py")}]
    res = optpipe.build(tiny_recipe(tiny_llama, passes), output=tmp_path / "a", allow_plugins=True, log=lambda m: None)
    rec = res.manifest["passes"][-1]
    assert rec["name"] == "embedding-fp16" and rec["changes"]["gathers_rewritten"] == 1
    assert rec["changes"]["bytes_saved"] == 256 * 64 * 2


def test_plugin_errors_name_the_file(tiny_llama, tmp_path):
    from optpipe.recipe import recipe_from_dict

    bad = tmp_path / "nopass.py"
    bad.write_text("x = 1\n")
    with pytest.raises(optpipe.RecipeError, match=r"passes\[1\]\.path: .*defines no Pass subclass with name = 'mine'"):
        recipe_from_dict(tiny_recipe(tiny_llama, [{"name": "export"}, {"name": "mine", "path": str(bad)}]),
                         allow_plugins=True)
    with pytest.raises(optpipe.RecipeError, match=r"passes\[1\]\.path: plugin file .* not found"):
        recipe_from_dict(tiny_recipe(tiny_llama, [{"name": "export"}, {"name": "mine", "path": str(tmp_path / "x.py")}]))


def test_plugin_code_runs_only_when_allowed(tiny_llama, tmp_path, capsys, monkeypatch):
    """A recipe is data: `validate` and `build` never execute a plugin file without the opt-in."""
    marker = tmp_path / "plugin-ran"
    plugin = tmp_path / "evil.py"
    plugin.write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    recipe = write_recipe(tmp_path, tiny_recipe(tiny_llama, [{"name": "export"}, {"name": "evil", "path": str(plugin)}]))
    monkeypatch.delenv("OPTPIPE_ALLOW_PLUGINS", raising=False)
    assert main(["validate", str(recipe)]) == 2
    assert main(["build", str(recipe), "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("passes[1].path") == 2 and "--allow-plugins" in err
    assert not marker.exists()
    assert main(["validate", str(recipe), "--allow-plugins"]) == 2  # runs it (then finds no Pass named evil)
    assert marker.exists()
    marker.unlink()
    monkeypatch.setenv("OPTPIPE_ALLOW_PLUGINS", "1")
    assert main(["validate", str(recipe)]) == 2 and marker.exists()


def test_sigterm_during_build_leaves_nothing_behind(tiny_llama, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    recipe = write_recipe(tmp_path, tiny_recipe(tiny_llama, FUSED_INT4, speed={
        "min_decode_speedup": 0.01, "prompt_tokens": 16, "new_tokens": 200, "repeats": 50, "threads": 1}))
    out = tmp_path / "art"
    proc = subprocess.Popen([sys.executable, "-m", "optpipe.cli", "build", str(recipe), "-o", str(out)],
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(tmp_path.glob(".optpipe-staging-*")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert list(tmp_path.glob(".optpipe-staging-*")), "the build never reached staging"
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 130 and "nothing was emitted" in err, (proc.returncode, err[-2000:])
    assert not out.exists() and not list(tmp_path.glob(".optpipe-staging-*"))


@pytest.mark.parametrize("flags,refused", [(AVX2_ONLY, {"smollm2-135m-cpu-torch-bf16", "smollm2-135m-cpu-ipex-bf16",
                                                        "smollm2-135m-cpu-ipex-int4"}),
                                           (AVX512_BF16, set())])
def test_shipped_recipes_this_cpu_can_build(flags, refused, monkeypatch):
    """Only recipes that truly need bf16 are refused on an AVX2-only CPU; the INT4/INT8 ones fall back to fp32."""
    from optpipe.builder import cpu_refusal
    from optpipe.recipe import load_recipe

    fake_cpu(monkeypatch, flags)
    got = {p.stem for p in (ROOT / "recipes").glob("*.yaml") if cpu_refusal(load_recipe(p))}
    assert got == refused
