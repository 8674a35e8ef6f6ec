"""The pass manager: registration, chain checks, running passes and recording what each did."""
import pytest
from pydantic import ValidationError

import optpipe
from optpipe.errors import BuildError, RecipeError
from optpipe.pipeline import (
    ModelState,
    Pass,
    PassConfig,
    PassContext,
    PassResult,
    Patterns,
    calibrated_when,
    registered_passes,
    run_passes,
    validate_pass_chain,
)
from optpipe.recipe import recipe_from_dict

from .conftest import TORCH_INT4, tiny_recipe, torch_recipe


def base(**over):
    r = {"name": "t", "model": "builtin:smollm2-135m", "target": "cpu-onnx",
         "passes": [{"name": "export"}, {"name": "fuse"}, {"name": "quantize-int4", "block_size": 32}]}
    r.update(over)
    return r


def test_unknown_pass_and_target():
    with pytest.raises(RecipeError, match=r"passes\[0\].name: unknown pass 'exprot'"):
        recipe_from_dict(base(passes=[{"name": "exprot"}]))
    with pytest.raises(RecipeError, match=r"target: must be"):
        recipe_from_dict(base(target="cpu-magic"))


def test_pass_order_is_checked():
    with pytest.raises(RecipeError, match=r"passes\[0\] \(quantize-int4\).*add `export` before it"):
        recipe_from_dict(base(passes=[{"name": "quantize-int4"}]))
    with pytest.raises(RecipeError, match=r"static-kv-cache.*fused-attention"):
        recipe_from_dict(base(passes=[{"name": "export"}, {"name": "static-kv-cache"}]))
    with pytest.raises(RecipeError, match=r"at least one pass"):
        recipe_from_dict(base(passes=[]))


def test_every_pass_module_is_registered_by_the_package():
    """The package imports every public module of optpipe/passes (no list to forget), and each one's passes register
    themselves by being defined."""
    import subprocess
    import sys
    from pathlib import Path

    import optpipe.passes as pkg

    modules = sorted(p.stem for p in Path(pkg.__file__).parent.glob("*.py") if not p.stem.startswith("_"))
    code = ("import optpipe.pipeline as p; r = p.registered_passes(); "
            "print(sorted({c.__module__.rsplit('.', 1)[1] for impls in r.values() for c in impls}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert eval(out) == modules


class _Cfg(PassConfig):
    renamed = {"group_size": "block_size"}
    block_size: int = 32
    algorithm: str = "rtn"
    include: Patterns = []


class _Adds(Pass):
    name = "adds"
    Config = _Cfg
    provides = frozenset({"added"})
    needs = calibrated_when(algorithm="gptq")

    def call(self, state, ctx):
        return PassResult(True, {"block_size": self.config.block_size, "per_layer": {"l0": 1}}, ["a note"])


class _Crashes(Pass):
    name = "crashes"
    Config = _Cfg

    def call(self, state, ctx):
        return {}["missing"]


def test_run_passes_records_each_pass_and_names_the_one_that_crashed():
    state, said = ModelState("onnx"), []
    records = run_passes([_Adds(_Cfg(block_size=64))], state, PassContext(), log=said.append)
    assert [r.to_json()["options"] for r in records] == [{"block_size": 64, "algorithm": "rtn", "include": []}]
    assert records[0].changes["per_layer"] == {"l0": 1} and records[0].notes == ["a note"]
    assert state.features == {"added"} and said[0] == "[1/1] adds ..." and said[1].endswith(": block_size=64")
    with pytest.raises(BuildError, match=r"pass crashes \(passes\[1\]\) failed: KeyError: 'missing'") as e:
        run_passes([_Adds(_Cfg()), _Crashes(_Cfg())], ModelState("onnx"), PassContext(), log=lambda m: None)
    assert isinstance(e.value.__cause__, KeyError)  # the traceback stays chained


def test_options_say_when_calibration_is_needed_and_refuse_old_names_and_bad_regexes():
    assert _Adds(_Cfg()).needs == frozenset() and _Adds(_Cfg(algorithm="gptq")).needs == {"calibration"}
    with pytest.raises(ValidationError, match=r"option `group_size` is now `block_size`.*write `block_size: 64`"):
        _Cfg(group_size=64)
    with pytest.raises(ValidationError, match=r"invalid regex '\(q_proj'"):
        _Cfg(include=["(q_proj"])
    with pytest.raises(BuildError, match="needs calibration data, but none is configured"):
        PassContext().calibration_windows()


def test_same_pass_name_resolves_per_target(tiny_llama):
    impls = {c.__module__.rsplit(".", 1)[1] for c in registered_passes()["quantize-int4"]}
    assert impls == {"quantize_int4", "torch_quantize"}
    onnx_chain = validate_pass_chain(recipe_from_dict(tiny_recipe(tiny_llama, [{"name": "export"}, {"name": "quantize-int4"}])), "r")
    torch_chain = validate_pass_chain(recipe_from_dict(torch_recipe(tiny_llama, TORCH_INT4)), "r")
    assert onnx_chain[1].input_stage == "onnx" and torch_chain[0].input_stage == "torch"


def test_torch_pass_is_refused_for_onnx_target(tiny_llama):
    with pytest.raises(optpipe.RecipeError, match=r"passes\[0\] \(bf16-autocast\): not available for target cpu-onnx"):
        recipe_from_dict(tiny_recipe(tiny_llama, [{"name": "bf16-autocast"}, {"name": "export"}]))


def test_a_pass_registers_itself_only_where_built_ins_live():
    """Defining a Pass subclass in optpipe.passes registers it (no decorator to forget); one defined anywhere else
    (a test, a `path:` plugin file) is not, so it cannot shadow a built-in by being imported. Intermediate bases
    without a name (TorchPass, OnnxQuantizePass) are not passes of their own."""
    import types

    import optpipe.pipeline as p

    before = p.registered_passes()
    fake = types.ModuleType("optpipe.passes.zz_test_only")
    exec("from optpipe.pipeline import TorchPass\n"
         "class ZzTestOnly(TorchPass):\n    name = 'zz-test-only'\n", fake.__dict__)
    elsewhere = type("Elsewhere", (p.Pass,), {"name": "export", "__module__": "tests.somewhere"})
    try:
        after = p.registered_passes()
        assert [c.__name__ for c in after["zz-test-only"]] == ["ZzTestOnly"]
        assert elsewhere not in after["export"] and after["export"] == before["export"]
        assert not any(c in (p.TorchPass, p.OnnxQuantizePass) for impls in after.values() for c in impls)
    finally:
        p._REGISTRY.pop("zz-test-only", None)
