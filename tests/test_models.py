"""Resolving a recipe's `model`: builtin alias, GGUF file, model directory, a hub id served from the local cache
only — and an error naming model.source for everything else."""
import pytest

from optpipe import models
from optpipe.errors import ModelLoadError


def test_builtin_smollm2_resolves_to_the_shipped_gguf():
    r = models.resolve("builtin:smollm2-135m")
    assert r.kind == "gguf" and r.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    with pytest.raises(ModelLoadError, match=r"unknown builtin 'smollm3' \(known: smollm2-135m\)"):
        models.resolve("builtin:smollm3")


def test_local_forms(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert models.resolve(str(tmp_path / "m.gguf")).describe() == {
        "kind": "gguf", "location": str(tmp_path.resolve()), "gguf_file": "m.gguf"}
    (tmp_path / "hf").mkdir()
    with pytest.raises(ModelLoadError, match="has no config.json"):
        models.resolve(str(tmp_path / "hf"))
    (tmp_path / "hf" / "config.json").write_text("{}")
    assert models.resolve(str(tmp_path / "hf")).kind == "hf-dir"
    assert models.resolve(str(tmp_path / "hf"), gguf_file="x.gguf").kind == "gguf"
    with pytest.raises(ModelLoadError, match="GGUF file .*missing.gguf not found"):
        models.resolve(str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelLoadError, match="does not exist .*OPTPIPE_LLAMA2_13B"):
        models.resolve("./no/such/model")


def test_hub_ids_come_from_the_local_cache_only(tmp_path, monkeypatch):
    from huggingface_hub import constants

    snapshot = tmp_path / "models--org--tiny" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (tmp_path / "models--org--tiny" / "refs").mkdir()
    (tmp_path / "models--org--tiny" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    r = models.resolve("org/tiny")
    assert r.kind == "hub-cache" and r.location == str(snapshot)
    with pytest.raises(ModelLoadError, match=r"'org/absent' is neither a local path nor a model in the local "
                                             r"Hugging Face cache .*hf download org/absent"):
        models.resolve("org/absent")
