"""The search space: every combination a complete recipe, and errors that name the search path and value at fault."""
from __future__ import annotations

import copy

import pytest

from optpipe.errors import RecipeError
from optpipe.recipe import load_recipe
from optpipe.tune.space import candidates
from tests.conftest import FUSED_INT4, tiny_recipe, write_recipe

EMBED = [*copy.deepcopy(FUSED_INT4), {"name": "quantize-embedding"}]


def _recipe(tmp_path, model, space, passes=None, **search):
    r = tiny_recipe(model, copy.deepcopy(passes or FUSED_INT4))
    r["search"] = {"space": space, **search}
    return load_recipe(write_recipe(tmp_path, r))


def test_every_combination_in_order_earliest_pass_slowest(tmp_path, tiny_llama):
    recipe = _recipe(tmp_path, tiny_llama, {"passes[3].zero_point": ["float", "int"], "passes[2].max_length": [128, 256],
                                            "passes[3].block_size": [32, 64]})
    cands = candidates(recipe)
    assert [c.number for c in cands] == list(range(1, 9))
    assert all(c.recipe is not None for c in cands)
    # passes[2] varies slowest: candidates 1-4 share the static-kv-cache length, so they share a prefix
    assert [c.settings["passes[2].max_length"] for c in cands] == [128] * 4 + [256] * 4
    c = cands[5]
    assert c.recipe.passes[2].options["max_length"] == c.settings["passes[2].max_length"]
    assert c.recipe.passes[3].options["block_size"] == c.settings["passes[3].block_size"]
    assert c.recipe.passes[3].options["zero_point"] == c.settings["passes[3].zero_point"]
    assert c.recipe.search is None and c.recipe._passes is not None  # a plain recipe, already validated


def test_nested_option_and_switching_a_pass_off(tmp_path, tiny_llama):
    recipe = _recipe(tmp_path, tiny_llama, {"passes[3].int8.edge_layers": [0, 1], "passes[4].enabled": [True, False]},
                     passes=EMBED)
    cands = candidates(recipe)
    assert len(cands) == 4
    off = next(c for c in cands if c.settings["passes[4].enabled"] is False and c.settings["passes[3].int8.edge_layers"] == 1)
    assert [p.name for p in off.recipe.passes] == ["export", "fuse", "static-kv-cache", "quantize-int4"]
    assert off.recipe.passes[3].options["int8"] == {"edge_layers": 1}


def test_a_combination_the_chain_refuses_is_kept_as_invalid(tmp_path, tiny_llama):
    # static-kv-cache needs fuse: fuse off with the cache on is no recipe, but fuse off with the cache off is one
    recipe = _recipe(tmp_path, tiny_llama, {"passes[1].enabled": [True, False], "passes[2].enabled": [True, False]})
    cands = candidates(recipe)
    bad = [c for c in cands if c.invalid]
    assert [c.settings for c in bad] == [{"passes[1].enabled": False, "passes[2].enabled": True}]
    assert "needs an earlier pass providing fused-attention" in bad[0].invalid


@pytest.mark.parametrize("space, message", [
    ({"passes[3].block_size": [32, 48]}, "search.space['passes[3].block_size'][1] (48): no candidate with this value "
                                         "is a valid recipe: passes[3].block_size: must be 32, 64 or 128"),
    ({"passes[3].blok_size": [32]}, "search.space['passes[3].blok_size']: pass quantize-int4 has no option 'blok_size'"),
    ({"passes[7].block_size": [32]}, "search.space['passes[7].block_size']: the recipe has 4 passes"),
    ({"passes[1].enabled": ["no"]}, "search.space['passes[1].enabled']: enabled takes true/false"),
    ({"passes[1].enabled": [False]}, "search.space['passes[1].enabled'][0] (false): no candidate with this value is "
                                     "a valid recipe: passes[1] (static-kv-cache): needs an earlier pass providing "
                                     "fused-attention (pass indices of the candidate, which goes without passes[1] "
                                     "(fuse))"),
])
def test_errors_name_the_path_and_value(tmp_path, tiny_llama, space, message):
    with pytest.raises(RecipeError) as e:
        candidates(_recipe(tmp_path, tiny_llama, space))
    assert message in str(e.value)
    assert str(e.value).startswith(str(tmp_path / "recipe.yaml"))


@pytest.mark.parametrize("search, message", [
    ({"space": {"block_size": [32]}}, "search.space: Value error, 'block_size': a search path is passes[I].OPTION"),
    ({"space": {}}, "name at least one option to vary"),
    ({"space": {"passes[3].block_size": []}}, "give at least one value"),
    ({"space": {"passes[3].block_size": [32, 32]}}, "a value is given twice"),
    ({"space": {"passes[3].block_size": [32]}, "objective": "latency"}, "search.objective"),
])
def test_malformed_search_section_is_a_recipe_error(tmp_path, tiny_llama, search, message):
    r = tiny_recipe(tiny_llama, copy.deepcopy(FUSED_INT4))
    r["search"] = search
    with pytest.raises(RecipeError) as e:
        load_recipe(write_recipe(tmp_path, r))
    assert message.replace("Value error, ", "") in str(e.value)


def test_space_larger_than_max_candidates_is_refused(tmp_path, tiny_llama):
    recipe = _recipe(tmp_path, tiny_llama, {"passes[3].block_size": [32, 64, 128], "passes[3].zero_point":
                                            ["float", "int", "symmetric"]}, max_candidates=8)
    with pytest.raises(RecipeError, match=r"search.space: 9 combinations, more than search.max_candidates \(8\)"):
        candidates(recipe)


def test_a_recipe_without_search_is_refused_by_tune(tmp_path, tiny_llama):
    recipe = load_recipe(write_recipe(tmp_path, tiny_recipe(tiny_llama, copy.deepcopy(FUSED_INT4))))
    with pytest.raises(RecipeError, match="search: the recipe has no search section"):
        candidates(recipe)


def test_validate_reports_the_search_space(tmp_path, tiny_llama, capsys):
    from optpipe.cli import main

    recipe = tiny_recipe(tiny_llama, copy.deepcopy(FUSED_INT4))
    recipe["search"] = {"space": {"passes[1].enabled": [True, False], "passes[2].enabled": [True, False]}}
    path = write_recipe(tmp_path, recipe)
    assert main(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert "search: 4 candidates, 1 of them combinations the pass chain refuses" in out
    assert "candidate 3: passes[1] (static-kv-cache): needs an earlier pass providing fused-attention" in out
    recipe["search"] = {"space": {"passes[3].block_size": [32, 48]}}
    assert main(["validate", str(write_recipe(tmp_path, recipe))]) == 2
    assert "search.space['passes[3].block_size'][1] (48)" in capsys.readouterr().err
