import pytest

from optpipe.cli import main
from optpipe.errors import RecipeError
from optpipe.recipe import load_recipe, recipe_from_dict

from .conftest import ROOT, write_recipe


def base(**over):
    r = {"name": "t", "model": "builtin:smollm2-135m", "target": "cpu-onnx",
         "passes": [{"name": "export"}, {"name": "fuse"}, {"name": "quantize-int4", "block_size": 32}]}
    r.update(over)
    return r


@pytest.mark.parametrize("name", ["smollm2-135m-cpu-int4", "smollm2-135m-cpu-int8", "llama2-13b-cpu"])
def test_shipped_recipes_validate(name):
    r = load_recipe(ROOT / "recipes" / f"{name}.yaml")
    assert r.target == "cpu-onnx" and r.passes[0].name == "export"


def test_pass_option_error_names_file_and_field(tmp_path):
    p = write_recipe(tmp_path, base(passes=[{"name": "export"}, {"name": "fuse"}, {"name": "quantize-int4", "block_size": 48}]))
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    msg = str(e.value)
    assert str(p) in msg and "passes[2].block_size" in msg and "32" in msg and "128" in msg


def test_unknown_top_level_and_pass_fields(tmp_path):
    with pytest.raises(RecipeError, match=r"colour: unknown field"):
        recipe_from_dict(base(colour="red"))
    with pytest.raises(RecipeError, match=r"passes\[1\].bogus: unknown field"):
        recipe_from_dict(base(passes=[{"name": "export"}, {"name": "fuse", "bogus": 1}]))


def test_env_expansion(monkeypatch):
    monkeypatch.setenv("TINY_MODEL_DIR", "/somewhere/model")
    r = recipe_from_dict(base(model="${TINY_MODEL_DIR}"))
    assert r.model.source == "/somewhere/model"
    with pytest.raises(RecipeError, match="NOT_SET_ANYWHERE"):
        recipe_from_dict(base(model="${NOT_SET_ANYWHERE}"))


def test_cli_validate_exit_codes(tmp_path, capsys):
    good = write_recipe(tmp_path, base(), "good.yaml")
    bad = write_recipe(tmp_path, base(passes=[{"name": "export"}, {"name": "fuse"}, {"name": "quantize-int4", "algorithm": "magic"}]), "bad.yaml")
    assert main(["validate", str(good)]) == 0
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml: passes[2].algorithm" in err
    assert main(["validate", str(tmp_path / "missing.yaml")]) == 2


def test_cli_validate_checks_the_pass_chain(tmp_path, capsys):
    """validate runs the same chain checks as build: stages, targets, and what a streaming build can run."""
    streaming = base(passes=[{"name": "awq"}, {"name": "export"}])
    streaming["model"] = {"source": "/somewhere/model", "streaming": True}
    bad = write_recipe(tmp_path, streaming, "stream.yaml")
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "stream.yaml: passes[0] (awq): not available with model.streaming" in err and "smoothquant" in err
    order = write_recipe(tmp_path, base(passes=[{"name": "export"}, {"name": "smoothquant"}]), "order.yaml")
    assert main(["validate", str(order)]) == 2
    assert "passes[1] (smoothquant): works on the torch model" in capsys.readouterr().err
