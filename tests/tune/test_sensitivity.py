"""Per-layer sensitivity: measured on the calibration text, ranked, and turned into int8.include patterns that
select exactly the group's MatMuls in the exported graph (fused or not); tune uses it as a search dimension."""
from __future__ import annotations

import copy
import re

import onnx
import pytest
import torch

from optpipe import data, models
from optpipe.errors import RecipeError
from optpipe.pipeline import ModelState, PassContext, run_passes
from optpipe.recipe import DataSpec, load_recipe
from optpipe.tune import tune
from optpipe.tune.sensitivity import measure
from optpipe.tune.space import NEVER, candidates
from tests.conftest import FUSED_INT4, tiny_recipe, write_recipe


@pytest.fixture(scope="module")
def ranked(tiny_llama):
    model, tok, _ = models.load(models_spec(tiny_llama))
    windows = data.token_windows(DataSpec(source="builtin:calibration", window=64, max_tokens=256), tok, None,
                                 "calibration").windows
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rows = measure(model, windows, block_size=32, zero_point="int", log=lambda m: None)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "weights not restored"
    return rows


def models_spec(path):
    from optpipe.recipe import ModelSpec

    return ModelSpec(source=str(path))


def test_every_group_is_measured_and_ranked(ranked):
    assert len(ranked) == 2 * 4  # 2 layers x (qkv, o, gate_up, down)
    assert {(r["layer"], r["projection"]) for r in ranked} == {
        (i, p) for i in (0, 1) for p in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")}
    kls = [r["mean_kl"] for r in ranked]
    assert kls == sorted(kls, reverse=True) and kls[0] > 0


@pytest.mark.parametrize("fused", [True, False])
def test_patterns_select_exactly_the_groups_matmuls(ranked, tiny_llama, tmp_path, fused):
    passes = [{"name": "export"}, {"name": "fuse"}] if fused else [{"name": "export"}, {"name": "fuse",
                                                                                        "qkv": False,
                                                                                        "gate_up": False}]
    recipe = load_recipe(write_recipe(tmp_path, {**tiny_recipe(tiny_llama, passes), "passes": passes}))
    model, tok, _ = models.load(recipe.model)
    state = ModelState("torch", torch_model=model, tokenizer=tok)
    run_passes(recipe._passes, state, PassContext(threads=1, workdir=tmp_path), log=lambda m: None)
    names = [n.name for n in state.onnx_model.graph.node if n.op_type == "MatMul"]
    hit = {}
    for r in ranked:
        matched = [n for n in names if re.search(r["pattern"], n)]
        expected = 1 if fused or r["projection"] in ("self_attn.o_proj", "mlp.down_proj") else \
            (3 if r["projection"] == "self_attn.qkv_proj" else 2)
        assert len(matched) == expected, (r["pattern"], matched)
        for n in matched:
            assert n not in hit, f"{n} matched by two groups"
            hit[n] = r["pattern"]
    assert set(hit) == {n for n in names if n != "lm_head"}


def _tune_recipe(tmp_path, model, keep, **sens):
    r = tiny_recipe(model, copy.deepcopy(FUSED_INT4))
    r["passes"][3]["int8"] = {"include": ["never-matches-anything-else"]}
    r["search"] = {"sensitivity": {"pass": 3, "keep_int8": keep, "tokens": 256, "zero_point": "int", **sens}}
    return write_recipe(tmp_path, r)


def test_validate_uses_placeholders_and_tune_the_measured_ranking(tmp_path, tiny_llama):
    recipe = load_recipe(_tune_recipe(tmp_path, tiny_llama, [0, 3]))
    cands = candidates(recipe)
    assert [c.settings for c in cands] == [{"sensitivity.keep_int8": 0}, {"sensitivity.keep_int8": 3}]
    assert cands[1].recipe.passes[3].options["int8"]["include"] == ["never-matches-anything-else"] + [NEVER] * 3
    ranking = ["a", "b", "c", "d"]
    cands = candidates(recipe, ranking=ranking)
    assert cands[1].recipe.passes[3].options["int8"]["include"] == ["never-matches-anything-else", "a", "b", "c"]
    assert cands[0].recipe.passes[3].options["int8"] == {"include": ["never-matches-anything-else"]}
    with pytest.raises(RecipeError, match=r"search.sensitivity.keep_int8: 3 groups asked for, the model has 2"):
        candidates(recipe, ranking=["a", "b"])


def test_sensitivity_must_name_an_int4_pass(tmp_path, tiny_llama):
    r = tiny_recipe(tiny_llama, copy.deepcopy(FUSED_INT4))
    r["search"] = {"sensitivity": {"pass": 1, "keep_int8": [0, 2]}}
    with pytest.raises(RecipeError, match=r"search.sensitivity.pass: passes\[1\] \(fuse\) has no int8.include"):
        candidates(load_recipe(write_recipe(tmp_path, r)))
    r["search"] = {"sensitivity": {"pass": 3, "keep_int8": [2, 2]}}
    with pytest.raises(RecipeError, match="give distinct counts"):
        load_recipe(write_recipe(tmp_path, r))


def test_tune_keeps_the_most_sensitive_groups_at_int8_and_caches_the_ranking(tmp_path, tiny_llama):
    path = _tune_recipe(tmp_path, tiny_llama, [0, 2])
    lines: list[str] = []
    res = tune(path, tmp_path / "out", cache_dir=tmp_path / "cache", log=lines.append)
    assert any(line.startswith("sensitivity:") for line in lines)
    rows = res.manifest["search"]["sensitivity"]["rows"]
    assert res.manifest["search"]["sensitivity"]["pass"] == 3
    with2 = next(e for e in res.trace if e["settings"]["sensitivity.keep_int8"] == 2)
    assert with2["status"] in ("passed", "rejected")
    # the candidate with 2 kept: its build has exactly the two most sensitive groups at INT8
    built = next(p for p in (tmp_path / "cache" / "builds").iterdir() if p.name == with2["build_key"])
    graph = onnx.load(built / "model.onnx", load_external_data=False).graph
    int8 = sorted(n.name for n in graph.node if n.op_type == "MatMulNBits"
                  and next(a.i for a in n.attribute if a.name == "bits") == 8)
    assert int8 == sorted(n.name for n in graph.node if n.op_type == "MatMulNBits"
                          and any(re.search(r["pattern"], n.name) for r in rows[:2]))
    assert len(int8) == 2
    html = (res.artifact_path / "report.html").read_text()
    assert 'id="figure-sensitivity"' in html
    lines.clear()
    tune(path, tmp_path / "again", cache_dir=tmp_path / "cache", log=lines.append)
    assert not any(line.startswith("sensitivity:") for line in lines)  # measured once, cached


def test_a_taken_output_is_refused_before_the_sensitivity_measurement_loads_the_model(tmp_path, tiny_llama):
    path = _tune_recipe(tmp_path, tiny_llama, [0, 2])
    (tmp_path / "out").mkdir()
    lines: list[str] = []
    with pytest.raises(RecipeError, match="already exists"):
        tune(path, tmp_path / "out", cache_dir=tmp_path / "cache", log=lines.append)
    assert not any(line.startswith(("loading", "sensitivity")) for line in lines), lines
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.json"))
