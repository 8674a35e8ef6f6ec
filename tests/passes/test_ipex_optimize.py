"""ipex-optimize: records the IPEX settings the cpu-ipex target applies at load (with the IPEX version that will
apply them) and stops the build at once, saying how to install IPEX, where it does not import. Runs without
IPEX: an importable stand-in takes its place."""
import sys
from types import ModuleType

import pytest
from pydantic import ValidationError

from optpipe.errors import RecipeError
from optpipe.passes.ipex_optimize import IpexConfig, IpexOptimize
from optpipe.pipeline import ModelState, PassContext


def test_settings_and_the_ipex_version_go_to_the_handoff(monkeypatch):
    fake = ModuleType("intel_extension_for_pytorch")
    fake.__version__ = "2.8.0+test"
    monkeypatch.setitem(sys.modules, "intel_extension_for_pytorch", fake)
    state = ModelState("torch")
    config = IpexConfig(weight_only="int4", block_size=32, lowp_mode="bf16")
    result = IpexOptimize(config).call(state, PassContext())
    assert result.modified and result.changes["ipex_version"] == "2.8.0+test"
    assert state.handoff.ipex == {"weight_only": "int4", "block_size": 32, "lowp_mode": "bf16",
                                  "deployment_mode": True, "ipex_version": "2.8.0+test"}


def test_without_ipex_the_pass_refuses_naming_the_environment_to_use(monkeypatch):
    monkeypatch.setitem(sys.modules, "intel_extension_for_pytorch", None)  # import raises ImportError
    with pytest.raises(RecipeError, match=r"intel-extension-for-pytorch is not importable.*check_ipex\.sh"):
        IpexOptimize(IpexConfig()).call(ModelState("torch"), PassContext())


def test_the_old_option_name_is_refused_naming_the_new_one():
    with pytest.raises(ValidationError, match=r"`group_size` is now `block_size`.*write `block_size: 32`"):
        IpexConfig.model_validate({"group_size": 32})
