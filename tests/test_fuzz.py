"""Fuzzing with hypothesis: a recipe with random values and random structural mutations either validates
(exit 0) or is refused with exit 2 and a message naming a field; a mutated manifest verifies (0) or is refused
(4). Never a traceback, never another exit code."""
import copy
import json
import shutil

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import optpipe
from optpipe.cli import main

from .conftest import FUSED_INT4, tiny_recipe

VALID = {"name": "fuzz", "model": "builtin:smollm2-135m", "target": "cpu-onnx",
         "passes": [{"name": "export"}, {"name": "fuse"}, {"name": "static-kv-cache", "max_length": 2048},
                    {"name": "quantize-int4", "block_size": 32, "algorithm": "rtn", "include": [], "exclude": ["lm_head"]}],
         "evaluation": {"source": "builtin:evaluation", "window": 512, "max_tokens": 2048},
         "calibration": {"source": "builtin:calibration", "window": 256, "max_tokens": 1024},
         "gates": {"accuracy": {"max_ppl_delta_pct": 3.0, "max_mean_kl": 0.05, "min_top1_agreement": 0.8},
                   "speed": {"min_decode_speedup": 1.5, "prompt_tokens": 64, "new_tokens": 64, "repeats": 3}}}

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
                    st.sampled_from(["builtin:evaluation", "cpu-torch", "export", "gptq", "[", "${NOPE}", ".nan",
                                     "../x.txt", "static-kv-cache", "lm_head", "builtin:smollm2-135m"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                      max_leaves=6)


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


@st.composite
def mutated(draw, base):
    doc = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in _paths(doc) if p]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = doc
        for k in path[:-1]:
            parent = parent[k]
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "replace":
            parent[path[-1]] = draw(values)
        elif action == "delete":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=10))] = draw(values)
        else:
            parent.append(draw(values))
    return doc


def _no_traceback(err: str) -> None:
    assert "Traceback" not in err and "internal error" not in err, err


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(doc=mutated(VALID))
def test_fuzzed_recipes_validate_or_exit_2(doc, tmp_path_factory, capsys, monkeypatch):
    monkeypatch.delenv("OPTPIPE_ALLOW_PLUGINS", raising=False)
    path = tmp_path_factory.mktemp("fuzz") / "recipe.yaml"
    try:
        path.write_text(yaml.safe_dump(doc, allow_unicode=True), encoding="utf-8")
    except (UnicodeEncodeError, yaml.YAMLError):  # surrogates and the like: not a file anybody can write
        return
    code = main(["validate", str(path)])
    err = capsys.readouterr().err
    _no_traceback(err)
    assert code in (0, 2), err
    if code == 2:
        assert str(path) in err


def test_the_unmutated_fuzz_base_is_valid(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(VALID))
    assert main(["validate", str(path)]) == 0


@pytest.fixture(scope="module")
def artifact(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("fuzz-art") / "art"
    optpipe.build(tiny_recipe(tiny_llama, FUSED_INT4), output=out, log=lambda m: None)
    return out


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzzed_manifests_verify_or_exit_4(artifact, data, tmp_path_factory, capsys):
    path = tmp_path_factory.mktemp("fuzz-m") / "art"
    shutil.copytree(artifact, path)
    manifest = json.loads((artifact / "manifest.json").read_text())
    small = {"status": manifest["status"], "files": manifest["files"], "recipe": {"target": "cpu-onnx"}}
    doc = data.draw(mutated(small))
    (path / "manifest.json").write_text(json.dumps(doc))
    code = main(["verify", str(path)])
    err = capsys.readouterr().err
    _no_traceback(err)
    assert code in (0, 4), err
