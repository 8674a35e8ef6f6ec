"""cpu-torch static-kv-cache: what it leaves for the target (layout, length, compile) and what it refuses."""
import pytest

from optpipe import models
from optpipe.builder import check
from optpipe.errors import RecipeError
from optpipe.handoff import KVCacheLayout
from optpipe.passes.torch_static_kv_cache import TorchStaticKVCache, TorchStaticKVConfig
from optpipe.pipeline import ModelState, PassContext
from optpipe.recipe import ModelSpec

from ..conftest import torch_recipe


def test_records_a_static_layout_for_the_target_and_notes_a_length_beyond_the_model(tiny_llama):
    model = models.load(ModelSpec(source=str(tiny_llama)))[0]  # max_position_embeddings 512
    state = ModelState("torch", torch_model=model)
    res = TorchStaticKVCache(TorchStaticKVConfig(max_length=256, compile=True)).call(state, PassContext())
    assert res.modified and res.changes == {"max_length": 256, "compile": True} and res.notes == []
    assert state.handoff.kv_cache == KVCacheLayout("static", 256) and state.handoff.compile is True
    res = TorchStaticKVCache(TorchStaticKVConfig(max_length=1024)).call(state, PassContext())
    assert "beyond the model's max_position_embeddings 512" in res.notes[0]
    assert state.handoff.compile is False


def test_recipe_refuses_a_cache_longer_than_the_model_positions_and_a_second_cache(tiny_llama):
    with pytest.raises(RecipeError, match=r"static-kv-cache.*max_position_embeddings"):
        check(torch_recipe(tiny_llama, [{"name": "static-kv-cache", "max_length": 4096}]))
    with pytest.raises(RecipeError, match=r"passes\[1\] \(static-kv-cache\): given twice"):
        check(torch_recipe(tiny_llama, [{"name": "static-kv-cache"}, {"name": "static-kv-cache"}]))
    with pytest.raises(RecipeError, match=r"passes\[0\].max_length: Input should be greater than or equal to 16"):
        check(torch_recipe(tiny_llama, [{"name": "static-kv-cache", "max_length": 8}]))
