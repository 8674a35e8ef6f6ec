"""What the gates compare with: fp32-onnx, a deployed artifact (`gates.accuracy.reference`, `gates.speed.baseline`)
and `optpipe gate NEW --against DEPLOYED`, on a tiny random-init Llama; refusals name the field at fault."""
import json
import shutil

import pytest

import optpipe
from optpipe.cli import main
from optpipe.errors import GateFailed, RecipeError

from .conftest import DATA, FUSED_INT4, _byte_tokenizer, make_tiny, tiny_recipe, write_recipe

SPEED = {"min_decode_speedup": 0.05, "prompt_tokens": 16, "new_tokens": 8, "repeats": 1, "threads": 1}


@pytest.fixture(scope="module")
def deployed(tiny_llama, tmp_path_factory):
    """An emitted INT4 artifact: what is 'deployed'."""
    out = tmp_path_factory.mktemp("deployed") / "int4"
    optpipe.build(tiny_recipe(tiny_llama, FUSED_INT4), output=out, log=lambda m: None)
    return out


def test_fp32_onnx_reference_of_the_plain_export_is_exact(tiny_llama, tmp_path):
    """Candidate = the export alone, reference = fp32-onnx: the same graph on the same runtime, so ΔPPL is 0 with
    a zero-width interval (against fp32 eager it is the exporter's small difference), and the manifest says so."""
    recipe = tiny_recipe(tiny_llama, [{"name": "export"}], accuracy={"reference": "fp32-onnx", "max_ppl_delta_pct": 0.0,
                                                                     "max_mean_kl": 0.0},
                         speed={**SPEED, "baseline": "fp32-onnx"})
    res = optpipe.build(recipe, output=tmp_path / "a", log=lambda m: None)
    acc = res.manifest["gates"]["accuracy"]
    assert acc["ppl_delta_pct"] == 0.0 and acc["ppl_delta_pct_ci95"] == [0.0, 0.0] and acc["mean_kl"] == 0.0
    assert "fp32 ONNX export" in res.manifest["reference"] and "fp32 ONNX" in res.manifest["speed_baseline"]
    assert res.manifest["recipe"]["gates"]["accuracy"]["reference"] == "fp32-onnx"
    assert not list(tmp_path.glob(".optpipe-reference-*"))  # the exported reference is removed after the gates


def test_fp32_onnx_and_eager_references_judge_the_same_candidate(tiny_llama, tmp_path):
    eager = optpipe.build(tiny_recipe(tiny_llama, FUSED_INT4, speed=SPEED), output=tmp_path / "e", log=lambda m: None)
    onnx = optpipe.build(tiny_recipe(tiny_llama, FUSED_INT4, accuracy={"reference": "fp32-onnx", "max_ppl_delta_pct": 5},
                                     speed=SPEED), output=tmp_path / "o", log=lambda m: None)
    a, b = (r.manifest["gates"]["accuracy"] for r in (eager, onnx))
    assert a["ppl_candidate"] == b["ppl_candidate"]  # the same candidate
    assert abs(a["ppl_reference"] - b["ppl_reference"]) / a["ppl_reference"] < 1e-3  # the export is faithful
    assert "fp32 eager" in eager.manifest["reference"] and "fp32 ONNX" in onnx.manifest["reference"]


def test_an_artifact_as_reference_is_a_regression_gate(tiny_llama, deployed, tmp_path, capsys):
    same = tiny_recipe(tiny_llama, FUSED_INT4, accuracy={"reference": str(deployed), "max_ppl_delta_pct": 0.0},
                       speed={**SPEED, "baseline": str(deployed)})
    res = optpipe.build(same, output=tmp_path / "same", log=lambda m: None)  # the same build: no change at all
    assert res.manifest["gates"]["accuracy"]["ppl_delta_pct"] == 0.0
    assert str(deployed) in res.manifest["reference"] and "sha256:" in res.manifest["reference"]
    broken = FUSED_INT4 + [{"name": "corrupt-scales", "path": str(DATA / "corrupt_scales.py")}]
    recipe = write_recipe(tmp_path, tiny_recipe(tiny_llama, broken, accuracy={"reference": str(deployed),
                                                                              "max_ppl_delta_pct": 1.0}, speed=SPEED))
    assert main(["build", str(recipe), "-o", str(tmp_path / "bad"), "--allow-plugins"]) == 3
    assert "accuracy: perplexity delta" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_gate_against_a_deployed_artifact(tiny_llama, deployed, tmp_path, capsys):
    assert main(["gate", str(deployed), "--against", str(deployed), "--max-slowdown", "50", "--threads", "1",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["gates"]["accuracy"]["ppl_delta_pct"] == 0.0 and out["against"]["artifact"] == str(deployed.resolve())
    assert out["gates"]["speed"]["thresholds"]["min_decode_speedup"] == 0.5
    assert out["gates"]["accuracy"]["thresholds"]["max_mean_kl"] is None  # distance from fp32 is not the question

    broken = FUSED_INT4 + [{"name": "corrupt-scales", "path": str(DATA / "corrupt_scales.py"), "factor": 1.5}]
    new = tmp_path / "new"
    optpipe.build(tiny_recipe(tiny_llama, broken, accuracy={"max_ppl_delta_pct": 1000}, speed=SPEED), output=new,
                  allow_plugins=True, log=lambda m: None)
    assert main(["gate", str(new), "--against", str(deployed), "--max-ppl-increase", "0.5", "--max-slowdown", "90",
                 "--threads", "1"]) == 3
    err = capsys.readouterr().err
    assert f"regression check against {deployed.resolve()} failed" in err
    assert "perplexity delta" in err and "exceeds max_ppl_delta_pct 0.5%" in err
    # the deployed artifact and the new one are untouched
    assert main(["verify", str(deployed)]) == 0 and main(["verify", str(new)]) == 0


def test_regression_tolerances_need_against_and_obey_bounds(deployed, capsys):
    assert main(["gate", str(deployed), "--max-slowdown", "5"]) == 2
    assert "tolerances of --against" in capsys.readouterr().err
    assert main(["gate", str(deployed), "--against", str(deployed), "--max-slowdown", "100"]) == 2
    assert "--against" in capsys.readouterr().err


def test_references_that_cannot_be_trusted_are_refused_before_loading(tiny_llama, deployed, tmp_path, capsys):
    missing = write_recipe(tmp_path, tiny_recipe(tiny_llama, FUSED_INT4, accuracy={"reference": "no/such/artifact"}))
    assert main(["validate", str(missing)]) == 2
    err = capsys.readouterr().err
    assert "gates.accuracy.reference" in err and "is not a directory" in err

    tampered = tmp_path / "tampered"
    shutil.copytree(deployed, tampered)
    (tampered / "model.onnx.data").write_bytes(b"\0" * 16)
    recipe = write_recipe(tmp_path, tiny_recipe(tiny_llama, FUSED_INT4, speed={**SPEED, "baseline": str(tampered)}))
    assert main(["validate", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "gates.speed.baseline" in err and "cannot be trusted" in err and "model.onnx.data" in err

    other = make_tiny(tmp_path / "other-vocab", "llama", vocab_size=300)
    recipe = write_recipe(tmp_path, tiny_recipe(other, FUSED_INT4, accuracy={"reference": str(deployed)}), "v.yaml")
    with pytest.raises(RecipeError, match=r"gates.accuracy.reference: .* 256-token vocabulary, this one has 300"):
        optpipe.build(recipe, output=tmp_path / "x", log=lambda m: None)

    # a GGUF model's vocabulary comes from its header (the token list), so the check runs before loading it too
    gguf = {**tiny_recipe(tiny_llama, FUSED_INT4, accuracy={"reference": str(deployed)}),
            "model": "builtin:smollm2-135m"}
    assert main(["validate", str(write_recipe(tmp_path, gguf, "g.yaml"))]) == 2
    assert "256-token vocabulary, this one has 49152" in capsys.readouterr().err


def test_a_reference_whose_tokenizer_gives_other_ids_is_refused(tiny_llama, deployed, tmp_path, capsys):
    """The same vocabulary size, other ids (the byte alphabet in reverse order): refused before the passes run
    (build) and before anything is measured (gate --against)."""
    other = tmp_path / "reordered"
    shutil.copytree(tiny_llama, other)
    _byte_tokenizer(reverse=True).save_pretrained(other)
    lines: list[str] = []
    with pytest.raises(RecipeError, match=r"gates.accuracy.reference: .*tokenizer gives 256 of this model's 256 "
                                          r"tokens another id"):
        optpipe.build(tiny_recipe(other, FUSED_INT4, accuracy={"reference": str(deployed)}), output=tmp_path / "x",
                      log=lines.append)
    assert not any(line.startswith("[1/") for line in lines), lines
    new = tmp_path / "new"
    optpipe.build(tiny_recipe(other, FUSED_INT4, accuracy={"max_ppl_delta_pct": 1000}, speed=SPEED), output=new,
                  log=lambda m: None)
    capsys.readouterr()
    assert main(["gate", str(new), "--against", str(deployed), "--threads", "1"]) == 2
    err = capsys.readouterr().err
    assert "--against: " in err and "another id" in err and "accuracy gate" not in err
    assert main(["gate", str(new), "--against", str(tmp_path / "nowhere")]) == 2  # not an artifact: said as before
    assert "--against: " in capsys.readouterr().err


def test_fp32_onnx_is_refused_for_a_streaming_build(tiny_llama, tmp_path):
    recipe = tiny_recipe(tiny_llama, [{"name": "export"}], accuracy={"reference": "fp32-onnx"})
    recipe["model"] = {"source": str(tiny_llama), "streaming": True}
    with pytest.raises(RecipeError, match=r"gates.accuracy.reference: fp32-onnx needs the whole model in memory"):
        optpipe.build(recipe, output=tmp_path / "x", log=lambda m: None)


def test_a_gate_failure_against_fp32_still_names_fp32(tiny_llama, tmp_path):
    broken = FUSED_INT4 + [{"name": "corrupt-scales", "path": str(DATA / "corrupt_scales.py")}]
    with pytest.raises(GateFailed, match="perplexity delta"):
        optpipe.build(tiny_recipe(tiny_llama, broken, speed=SPEED), output=tmp_path / "x", keep_rejected=True,
                      allow_plugins=True, log=lambda m: None)
    m = json.loads((tmp_path / "x.rejected" / "manifest.json").read_text())
    assert m["reference"].startswith("fp32 eager") and m["speed_baseline"].startswith("fp32 eager")
