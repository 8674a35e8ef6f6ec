"""`optpipe tune` end to end on a tiny random Llama: the winner is emitted like a build, the cache makes a rerun
free, a broken candidate is dropped, and when nothing passes nothing is emitted (exit 3) and the report names the
nearest misses."""
from __future__ import annotations

import copy
import json
import re

import numpy as np
import plotly.io as pio
import pytest

from optpipe import artifact, models
from optpipe.builder import build
from optpipe.cli import main, parse_budget
from optpipe.errors import GateFailed, RecipeError
from optpipe.pipeline import ModelState, PassContext, run_passes
from optpipe.recipe import load_recipe
from optpipe.targets import get_target
from optpipe.tune import cache, tune
from optpipe.tune.search import MemoReference, choose, finalists, miss_distance, pareto, runoff_intervals
from optpipe.tune.space import candidates
from tests.conftest import FUSED_INT4, tiny_recipe, write_recipe

SPACE = {"passes[3].block_size": [32, 64], "passes[3].bits": [4, 2]}  # 2-bit: deliberately broken


def _tune_recipe(tmp_path, model, space=None, **gates):
    r = tiny_recipe(model, copy.deepcopy(FUSED_INT4), **gates)
    r["search"] = {"space": space or SPACE, "screen_windows": 2}
    return write_recipe(tmp_path, r)


def figure(html: str, name: str):
    m = re.search(rf'<script type="application/json" id="figure-{name}">(.*?)</script>', html, re.S)
    assert m, f"no embedded figure {name}"
    return pio.from_json(m.group(1).replace("<\\/", "</"))  # validates against plotly's schema


def points(fig) -> list[int]:
    return [c for t in fig.data if t.name != "Pareto front" for c in t.customdata]


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, tiny_llama):
    tmp = tmp_path_factory.mktemp("tune")
    path = _tune_recipe(tmp, tiny_llama)
    res = tune(path, tmp / "out", cache_dir=tmp / "cache", log=lambda m: None)
    return tmp, path, res


def test_the_best_passing_candidate_is_emitted_with_its_search_trace(tuned, tiny_llama):
    tmp, _, res = tuned
    m = artifact.read_manifest(res.artifact_path)
    assert m["status"] == "passed" and artifact.verify(res.artifact_path, res.digest) == []
    trace = m["search"]["trace"]
    assert [e["candidate"] for e in trace] == [1, 2, 3, 4]
    passed = [e for e in trace if e["status"] == "passed"]
    assert passed, trace
    relative = {int(k): v for k, v in m["search"]["runoff"]["relative"].items()} if "runoff" in m["search"] else None
    best, tied = choose(passed, "decode_tok_s", relative)
    assert m["search"]["winner"] == best["candidate"] and m["search"]["tied_on_objective"] == tied
    assert m["recipe"]["passes"][3]["block_size"] == best["settings"]["passes[3].block_size"]
    assert "search" not in m["recipe"] or m["recipe"]["search"] is None  # the manifest's recipe is the winner's own
    assert m["gates"]["speed"]["decode_speedup"] == best["decode_speedup"]
    # what the loaded model's config says, as `build` records it (a GGUF header would name neither)
    config = json.loads((tiny_llama / "config.json").read_text())
    assert m["model"]["vocab_size"] == config["vocab_size"] and m["model"]["architectures"] == config["architectures"]
    # the 2-bit candidates are dropped by the screen or refused by the gates: never emitted
    for e in trace:
        if e["settings"]["passes[3].bits"] == 2:
            assert e["status"] in ("screened", "rejected"), e


def test_report_html_has_one_pareto_point_per_evaluated_candidate(tuned):
    _, _, res = tuned
    html = (res.artifact_path / "report.html").read_text()
    assert "Plotly.newPlot" in html and not re.search(r"<script[^>]+src=", html)  # plotly.js inlined: opens offline
    fig = figure(html, "pareto")
    assert sorted(points(fig)) == [1, 2, 3, 4]
    timeline = figure(html, "timeline")
    assert list(timeline.data[0].x) == [p["seconds"] for p in artifact.read_manifest(res.artifact_path)["passes"]]


def test_a_rerun_takes_everything_from_the_cache(tuned):
    tmp, path, first = tuned
    lines: list[str] = []
    res = tune(path, tmp / "again", cache_dir=tmp / "cache", log=lines.append)
    assert all(e["cached"] == {"build": True, "quality": True, "speed": True} for e in res.trace)
    assert not any(re.match(r"\[\d+/\d+\]", line) for line in lines), "a pass ran again"
    assert res.manifest["search"]["winner"] == first.manifest["search"]["winner"]
    a, b = (artifact.read_manifest(p)["files"] for p in (first.artifact_path, res.artifact_path))
    assert a["model.onnx.data"] == b["model.onnx.data"]


def test_a_candidate_built_from_a_shared_prefix_equals_a_build_from_scratch(tuned, tiny_llama, tmp_path):
    """Candidate 2 starts from a copy of candidate 1's state after export/fuse/static-kv-cache: its files must be
    the bytes a build from scratch gives. And the emitted winner equals a plain `build` of its recipe."""
    tmp, path, res = tuned
    trace = {e["candidate"]: e for e in res.trace}
    assert trace[1]["passes_reused"] == 0 and trace[2]["passes_reused"] == 3
    c2 = candidates(load_recipe(path))[1]
    cached = cache.Store(tmp / "cache").build_dir(trace[2]["build_key"])
    model, tokenizer, _ = models.load(c2.recipe.model)
    state = ModelState("torch", torch_model=model, tokenizer=tokenizer)
    run_passes(c2.recipe._passes, state, PassContext(threads=1, workdir=tmp_path, scratch=tmp_path / "s"),
               log=lambda m: None)
    get_target("cpu-onnx").save(state, tmp_path / "scratch-build")
    for f in ("model.onnx", "model.onnx.data"):
        assert (tmp_path / "scratch-build" / f).read_bytes() == (cached / f).read_bytes(), f
    m = artifact.read_manifest(res.artifact_path)
    built = build({k: v for k, v in m["recipe"].items() if k != "search"}, tmp_path / "plain", log=lambda msg: None)
    plain = artifact.read_manifest(built.artifact_path)["files"]
    for f in ("model.onnx", "model.onnx.data"):
        assert plain[f]["sha256"] == m["files"][f]["sha256"], f


def test_when_nothing_passes_nothing_is_emitted_and_the_report_names_three_misses(tmp_path, tiny_llama):
    space = {"passes[3].block_size": [32, 64], "passes[3].zero_point": ["float", "symmetric"]}
    path = _tune_recipe(tmp_path, tiny_llama, space, accuracy={"max_ppl_delta_pct": 0.0, "decide_on": "point",
                                                               "max_mean_kl": 0.0})
    with pytest.raises(GateFailed) as e:
        tune(path, tmp_path / "out", cache_dir=tmp_path / "cache", log=lambda m: None)
    assert e.value.exit_code == 3
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".optpipe-")]
    search = e.value.report["search"]
    assert len(search["nearest_misses"]) == 3
    assert "nearest misses:" in str(e.value) and str(e.value).count("\n  - candidate") == 3
    html = open(e.value.report["report"]).read()
    assert "No candidate passed every gate" in html
    assert sorted(points(figure(html, "pareto"))) == [1, 2, 3, 4]
    # nearest first: the distances the message is ordered by never decrease
    by = {t["candidate"]: t for t in search["trace"]}
    d = [miss_distance(by[n]) for n in search["nearest_misses"]]
    assert d == sorted(d)


def test_cli_tune_exit_codes(tmp_path, tiny_llama, capsys):
    bad = _tune_recipe(tmp_path, tiny_llama, {"passes[3].block_size": [32, 48]})
    assert main(["tune", str(bad), "-o", str(tmp_path / "o"), "--cache", str(tmp_path / "c")]) == 2
    assert "search.space['passes[3].block_size'][1] (48)" in capsys.readouterr().err
    refused = _tune_recipe(tmp_path, tiny_llama, {"passes[3].bits": [2]}, accuracy={"max_ppl_delta_pct": 0.5})
    assert main(["-q", "tune", str(refused), "-o", str(tmp_path / "o"), "--cache", str(tmp_path / "c")]) == 3
    assert not (tmp_path / "o").exists()
    assert main(["tune", str(refused), "--budget", "soon"]) == 2


def test_budget_of_candidates_stops_the_search(tmp_path, tiny_llama):
    path = _tune_recipe(tmp_path, tiny_llama, {"passes[3].block_size": [32, 64]})
    res = tune(path, tmp_path / "out", cache_dir=tmp_path / "cache", budget_candidates=1, log=lambda m: None)
    assert res.manifest["search"]["evaluated"] == 1 and res.manifest["search"]["stopped"] == "budget: 1 candidates"


@pytest.mark.parametrize("text, expected", [("30m", (30.0, None)), ("1.5h", (90.0, None)), ("24", (None, 24)),
                                            ("45min", (45.0, None)), (None, (None, None))])
def test_parse_budget(text, expected):
    assert parse_budget(text) == expected


@pytest.mark.parametrize("text", ["0", "-3", "0m", "fast", "m"])
def test_parse_budget_refuses(text):
    with pytest.raises(RecipeError, match="--budget"):
        parse_budget(text)


def _e(n, ppl, tok_s, size, **kw):
    return {"candidate": n, "ppl_delta_pct": ppl, "decode_tok_s": tok_s, "artifact_bytes": size, **kw}


def test_pareto_keeps_only_candidates_nothing_beats_on_all_three():
    trace = [_e(1, 1.0, 100, 50), _e(2, 0.5, 100, 50), _e(3, 2.0, 200, 50), _e(4, 2.0, 150, 40), _e(5, 3.0, 90, 60)]
    assert pareto(trace) == [2, 3, 4]  # 1 is beaten by 2 (more accurate, as fast, as small); 5 by all


def _p(n, speedup, ci, ppl, size=100):
    return {"candidate": n, "decode_speedup": speedup, "decode_speedup_ci95": ci, "ppl_delta_pct": ppl,
            "ppl_delta_pct_decided": ppl + 0.2, "artifact_bytes": size}


def test_finalists_are_those_the_gates_figures_cannot_tell_from_the_best():
    fast, close, slow = _p(1, 4.2, [4.0, 4.4], 0.5), _p(2, 4.1, [3.6, 4.8], 0.4), _p(3, 2.9, [2.7, 3.2], 0.0)
    assert finalists([slow, close, fast], "decode_tok_s") == [fast, close]


def test_the_runoff_decides_and_a_tie_goes_to_the_more_accurate():
    fast, close = _p(1, 4.2, [4.0, 4.4], 0.5), _p(2, 4.1, [3.6, 4.8], 0.4)
    tied = {1: [1.0, 1.0, 1.0], 2: [0.99, 0.95, 1.03]}
    assert choose([fast, close], "decode_tok_s", tied) == (close, [1, 2])
    slower = {1: [1.0, 1.0, 1.0], 2: [0.9, 0.85, 0.95]}
    assert choose([fast, close], "decode_tok_s", slower) == (fast, [1])
    assert choose([fast, close], "decode_tok_s") == (fast, [1])  # no runoff: the point decides
    small = _p(5, 1.0, [0.9, 1.1], 0.9, size=50)
    assert choose([fast, small], "size")[0] is small


def test_runoff_intervals_are_ratios_to_the_leader_per_round():
    rates = {1: [100.0, 110.0, 105.0, 95.0], 2: [80.0, 88.0, 84.0, 76.0], 3: [101.0, 108.0, 106.0, 96.0]}
    rel = runoff_intervals(rates)
    assert rel[3] == [1.0, 1.0, 1.0]  # the leader (highest geometric mean)
    assert rel[2][0] == pytest.approx(0.8 * 100 / 101, rel=0.02) and rel[2][2] < 1.0  # clearly slower
    assert rel[1][1] < 1.0 <= rel[1][2]  # within noise of the leader


def test_miss_distance_orders_by_relative_shortfall():
    base = {"max_ppl_delta_pct": 1.0, "min_decode_speedup": 2.0}
    near = {**base, "status": "rejected", "gate_status": {"accuracy": "failed"}, "ppl_delta_pct_decided": 1.1}
    slow = {**base, "status": "rejected", "gate_status": {"accuracy": "passed", "speed": "failed"},
            "decode_speedup_lower_95": 1.0}
    screened = {**base, "status": "screened", "screen_ppl_delta_lower_95": 1.2}
    assert miss_distance(near) == pytest.approx(0.1)
    assert miss_distance(slow) == pytest.approx(0.5)
    assert miss_distance(screened) > miss_distance(slow)  # a full-gate figure is nearer than a screen's


class _Counting:
    def __init__(self):
        self.calls = 0

    def logits(self, ids):
        self.calls += 1
        return np.full((len(ids), 4), float(ids.sum()), dtype=np.float32)


def test_memo_reference_computes_each_window_once():
    inner = _Counting()
    memo = MemoReference(inner)
    a, b = np.arange(5), np.arange(1, 6)
    for _ in range(3):
        memo.logits(a), memo.logits(b)
    assert inner.calls == 2
    assert json.dumps(memo.logits(a).tolist()) == json.dumps(inner.logits(a).tolist())


def test_an_interrupted_search_resumes_from_what_it_finished(tmp_path, tiny_llama):
    path = _tune_recipe(tmp_path, tiny_llama, {"passes[3].block_size": [32, 64]})

    def interrupt_at_second(msg):
        if msg.startswith("candidate 2/"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tune(path, tmp_path / "out", cache_dir=tmp_path / "cache", log=interrupt_at_second)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".optpipe-")]
    assert not [p for p in (tmp_path / "cache" / "builds").iterdir() if p.name.startswith(".tmp-")]
    res = tune(path, tmp_path / "out", cache_dir=tmp_path / "cache", log=lambda m: None)
    cached = {e["candidate"]: e["cached"] for e in res.trace}
    assert cached[1] == {"build": True, "quality": True, "speed": True}
    assert cached[2] == {"build": False, "quality": False, "speed": False}


PLUGIN = '''
from optpipe.errors import BuildError
from optpipe.pipeline import Pass, PassConfig, PassResult


class MaybeFailConfig(PassConfig):
    fail: bool = False


class MaybeFail(Pass):
    name = "maybe-fail"
    Config = MaybeFailConfig
    requires = frozenset({"onnx"})

    def call(self, state, ctx):
        if self.config.fail:
            raise BuildError("this combination cannot be built")
        return PassResult(False, {}, [])
'''


def test_a_candidate_that_fails_to_build_is_recorded_and_the_search_goes_on(tmp_path, tiny_llama):
    (tmp_path / "maybe_fail.py").write_text(PLUGIN)
    r = tiny_recipe(tiny_llama, [*copy.deepcopy(FUSED_INT4), {"name": "maybe-fail", "path": "maybe_fail.py"}])
    r["search"] = {"space": {"passes[4].fail": [True, False]}}
    res = tune(write_recipe(tmp_path, r), tmp_path / "out", cache_dir=tmp_path / "cache", allow_plugins=True,
               log=lambda m: None)
    failed, ok = res.trace
    assert failed["status"] == "failed" and "this combination cannot be built" in failed["reason"]
    assert "passes[4]" in failed["reason"]  # the pass at fault is named
    assert ok["status"] == "passed" and res.manifest["search"]["winner"] == 2
    assert res.manifest["search"]["evaluated"] == 1
