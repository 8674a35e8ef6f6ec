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


def test_bf16_flags_without_fast_bf16_matmuls_are_refused_too(tiny_llama, tmp_path, monkeypatch, capsys):
    """An AVX-512 BF16 Xeon ran torch's bf16 matmul at 0.55x fp32: the flag alone does not make bf16 worth it, so a
    measured ratio below 1 refuses the bf16 recipe (naming the figure) and makes `fallback: fp32` keep fp32."""
    from ..conftest import AVX512_BF16

    fake_cpu(monkeypatch, AVX512_BF16, bf16_speedup=0.55)
    recipe = write_recipe(tmp_path, torch_recipe(tiny_llama, [{"name": "bf16-autocast"}]))
    assert main(["build", str(recipe), "-o", str(tmp_path / "art")]) == 2
    err = capsys.readouterr().err
    assert "has avx512_bf16 but torch's bf16 matmul measured 0.55x the fp32 speed" in err and "fallback: fp32" in err
    res = optpipe.build(torch_recipe(tiny_llama, [{"name": "bf16-autocast", "fallback": "fp32"}] + TORCH_INT4),
                        output=tmp_path / "fb", log=lambda m: None)
    assert res.manifest["passes"][0]["changes"] == {"dtype": "float32", "native_bf16": False}


def test_bf16_is_used_only_where_it_is_measurably_faster(monkeypatch):
    """The decision rests on the lower end of the ratio's 95% interval: a point just over 1.0 with an interval
    reaching below it (an AMX Xeon measured 0.95-1.0x, a point that flipped the verdict between runs) is refused."""
    from optpipe import hw
    from optpipe.passes.torch_bf16 import bf16_shortfall

    from ..conftest import AVX512_BF16

    fake_cpu(monkeypatch, AVX512_BF16)
    monkeypatch.setattr(hw, "bf16_matmul_speedup", lambda: (1.02, 0.97))
    assert "measured 1.02x the fp32 speed here (95% interval from 0.97x" in bf16_shortfall()
    monkeypatch.setattr(hw, "bf16_matmul_speedup", lambda: (1.7, 1.55))
    assert bf16_shortfall() is None


def test_the_bf16_matmul_measurement_is_a_positive_ratio():
    from optpipe import hw

    hw.bf16_matmul_speedup.cache_clear()
    ratio, low = hw.bf16_matmul_speedup()
    assert 0.01 < low <= ratio < 100
