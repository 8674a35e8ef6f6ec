"""`optpipe tune --ray`: builds and output-comparing gates on Ray workers, speed in the driver; same winner."""
from __future__ import annotations

import copy

import pytest

from optpipe.errors import RecipeError
from optpipe.tune import tune
from optpipe.tune.distributed import available, chunks
from tests.conftest import FUSED_INT4, tiny_recipe, write_recipe


@pytest.mark.parametrize("numbers, parts, expected", [
    ([1, 2, 3, 4, 5], 2, [[1, 2, 3], [4, 5]]),
    ([1, 2], 4, [[1], [2]]),
    ([7, 9, 11, 12], 1, [[7, 9, 11, 12]]),
])
def test_chunks_are_contiguous_and_balanced(numbers, parts, expected):
    assert chunks(numbers, parts) == expected


def _recipe(tmp_path, model):
    r = tiny_recipe(model, copy.deepcopy(FUSED_INT4))
    # size: a deterministic objective, so the winner cannot depend on timing noise
    r["search"] = {"space": {"passes[3].block_size": [32, 64], "passes[3].zero_point": ["float", "symmetric"]},
                   "objective": "size"}
    return write_recipe(tmp_path, r)


@pytest.mark.skipif(not available(), reason="needs ray (optpipe[distributed])")
def test_ray_search_gives_the_same_winner_as_in_process(tmp_path, tiny_llama):
    path = _recipe(tmp_path, tiny_llama)
    local = tune(path, tmp_path / "local", cache_dir=tmp_path / "cache-local", log=lambda m: None)
    lines: list[str] = []
    distributed = tune(path, tmp_path / "ray", cache_dir=tmp_path / "cache-ray", ray=True, ray_workers=2,
                       log=lines.append)
    assert distributed.manifest["search"]["winner"] == local.manifest["search"]["winner"]
    assert [e["status"] for e in distributed.trace] == [e["status"] for e in local.trace]
    assert any(line.startswith("ray: 2 workers") for line in lines)
    for e in distributed.trace:  # built and gated by the workers; speed measured by the driver
        assert e["cached"]["build"] and e["cached"]["quality"] and not e["cached"]["speed"], e
        assert e["measured_on"]["quality"] and e["measured_on"]["speed"]
    a = {e["candidate"]: e["ppl_delta_pct"] for e in local.trace}
    b = {e["candidate"]: e["ppl_delta_pct"] for e in distributed.trace}
    assert a == pytest.approx(b, abs=1e-3)


def test_ray_address_that_does_not_answer_is_a_clear_error(tmp_path, tiny_llama, monkeypatch):
    if not available():
        with pytest.raises(RecipeError, match=r"--ray: Ray is not installed"):
            tune(_recipe(tmp_path, tiny_llama), tmp_path / "o", cache_dir=tmp_path / "c", ray=True,
                 log=lambda m: None)
        return
    monkeypatch.setenv("RAY_ADDRESS", "")
    with pytest.raises(RecipeError, match="--ray-address: cannot join a Ray cluster at 127.0.0.1:1"):
        tune(_recipe(tmp_path, tiny_llama), tmp_path / "o", cache_dir=tmp_path / "c", ray_address="127.0.0.1:1",
             log=lambda m: None)
    assert not (tmp_path / "o").exists()
