"""bf16-autocast: refused before loading where the CPU has no native bf16, unless it may fall back to fp32."""
import pytest

import optpipe
from optpipe.cli import main

from ..conftest import AVX2_ONLY, TORCH_INT4, fake_cpu, torch_recipe, write_recipe


def test_bf16_is_refused_before_loading_without_native_support(tiny_llama, tmp_path, monkeypatch, capsys):
    from optpipe import models

    fake_cpu(monkeypatch, AVX2_ONLY)
    monkeypatch.setattr(models, "load", lambda *a, **k: pytest.fail("the model was loaded before the refusal"))
    recipe = write_recipe(tmp_path, torch_recipe(tiny_llama, [{"name": "bf16-autocast"}]))
    assert main(["build", str(recipe), "-o", str(tmp_path / "art")]) == 2
    err = capsys.readouterr().err
    assert "passes[0] (bf16-autocast)" in err and "no avx512_bf16 or AMX" in err and "fallback: fp32" in err
    assert not (tmp_path / "art").exists()


def test_bf16_fallback_keeps_fp32_and_records_it(tiny_llama, tmp_path, monkeypatch):
    fake_cpu(monkeypatch, AVX2_ONLY)
    recipe = torch_recipe(tiny_llama, [{"name": "bf16-autocast", "fallback": "fp32"}] + TORCH_INT4)
    res = optpipe.build(recipe, output=tmp_path / "art", log=lambda m: None)
    assert res.manifest["passes"][0]["changes"] == {"dtype": "float32", "native_bf16": False}
    assert res.manifest["target"]["dtypes"] == ["float32"]
    assert res.manifest["environment"]["isa"]["avx512_bf16"] is False
