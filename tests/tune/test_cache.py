"""optpipe.tune.cache: keys change exactly when what decides a result changes, and the store never shows half an
entry."""
import json
import os
from types import SimpleNamespace

from optpipe.recipe import recipe_from_dict
from optpipe.tune import cache

from ..conftest import tiny_recipe


def _recipe(path, **quant):
    return recipe_from_dict(tiny_recipe(path, [{"name": "export"}, {"name": "quantize-int4", **quant}]))


def test_content_key_ignores_key_order_and_sees_values():
    assert cache.content_key({"a": 1, "b": [1, 2]}) == cache.content_key({"b": [1, 2], "a": 1})
    assert cache.content_key({"a": 1}) != cache.content_key({"a": 2})


def test_build_key_follows_the_pass_options_and_the_model_files(tiny_llama, tmp_path):
    base = cache.build_key(_recipe(tiny_llama), str(tiny_llama))
    assert cache.build_key(_recipe(tiny_llama), str(tiny_llama)) == base
    assert cache.build_key(_recipe(tiny_llama, block_size=64), str(tiny_llama)) != base
    copy = tmp_path / "m"
    copy.mkdir()
    for f in tiny_llama.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    moved = cache.build_key(_recipe(copy), str(copy))
    weights = next(copy.glob("*.safetensors"))
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the same path touched: another model
    assert cache.build_key(_recipe(copy), str(copy)) != moved


def test_speed_is_keyed_by_the_kind_of_machine_and_threads_not_the_host(tiny_llama):
    r = _recipe(tiny_llama)
    avx512 = {"cpu": "EPYC", "machine": "x86_64", "isa": ["avx2", "avx512f"], "physical_cores": 2, "host": "a"}
    key = cache.speed_key("b", r, avx512, 2, True)
    assert cache.speed_key("b", r, {**avx512, "host": "b"}, 2, True) == key
    assert cache.speed_key("b", r, {**avx512, "isa": ["avx2"]}, 2, True) != key
    assert cache.speed_key("b", r, avx512, 1, True) != key
    assert cache.speed_key("b", r, avx512, 2, False) != key
    assert cache.quality_key("b", r, 4) != cache.quality_key("b", r, 8)


def test_a_build_is_seen_only_once_committed_and_the_first_commit_wins(tmp_path):
    store = cache.Store(tmp_path / "c")
    tmp = store.new_build_dir("k" * 64)
    (tmp / "model.onnx").write_bytes(b"first")
    assert store.build_dir("k" * 64) is None  # being written: invisible
    final = store.commit_build("k" * 64, tmp, {"status": "built"})
    assert store.build_dir("k" * 64) == final and store.build_info("k" * 64) == {"status": "built"}
    again = store.new_build_dir("k" * 64)
    (again / "model.onnx").write_bytes(b"second")
    store.commit_build("k" * 64, again, {"status": "built"})  # another worker's, later: discarded
    assert (final / "model.onnx").read_bytes() == b"first" and not again.exists()


def test_evaluations_round_trip_and_leave_no_temporary_file(tmp_path):
    store = cache.Store(tmp_path)
    assert store.evaluation("e") is None
    store.save_evaluation("e", {"ppl": 1.5, "where": SimpleNamespace(a=1)})
    assert store.evaluation("e")["ppl"] == 1.5
    assert [p.name for p in (tmp_path / "evals").iterdir()] == ["e.json"]
    assert json.loads((tmp_path / "evals" / "e.json").read_text())["where"].startswith("namespace(")
