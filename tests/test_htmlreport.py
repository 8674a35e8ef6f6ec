"""report.html: self-contained (opens offline), figures readable without a browser, and drawn by a real one."""
from __future__ import annotations

import copy
import re
import shutil
import subprocess

import plotly.io as pio
import pytest

from optpipe import artifact, htmlreport
from optpipe.builder import build
from tests.conftest import FUSED_INT4, tiny_recipe


def embedded(html: str, name: str):
    m = re.search(rf'<script type="application/json" id="figure-{name}">(.*?)</script>', html, re.S)
    assert m, name
    return pio.from_json(m.group(1).replace("<\\/", "</"))


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_llama):
    out = tmp_path_factory.mktemp("report") / "art"
    return build(tiny_recipe(tiny_llama, copy.deepcopy(FUSED_INT4)), out, log=lambda m: None)


def test_build_writes_a_self_contained_report_listed_in_the_manifest(built):
    m = built.manifest
    assert artifact.HTML_REPORT in m["files"]
    html = (built.artifact_path / artifact.HTML_REPORT).read_text()
    assert not re.search(r"<script[^>]+src=", html)  # plotly.js is inlined: nothing to fetch
    timeline = embedded(html, "timeline")
    assert list(timeline.data[0].x) == [p["seconds"] for p in m["passes"]]
    assert [y.split(": ", 1)[1] for y in timeline.data[0].y] == [p["name"] for p in m["passes"]]
    for gate in m["gates"]:
        assert f"<td>{gate}</td>" in html


def test_text_from_the_manifest_is_escaped():
    manifest = {"status": "passed", "recipe": {"name": "<script>alert(1)</script>", "target": "cpu-onnx",
                                               "model": {"source": "m"}},
                "environment": {"cpu": "x", "isa": {"avx2": True}, "physical_cores": 2}, "passes": [],
                "gates": {"accuracy": {"status": "passed", "failures": ["</script><b>"]}}}
    html = htmlreport.render_build(manifest)
    assert "<script>alert(1)</script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "</script><b>" not in html


def test_pareto_front_drawn_is_the_accuracy_speed_front():
    pts = [{"candidate": 1, "ppl_delta_pct": 1.0, "decode_tok_s": 10}, {"candidate": 2, "ppl_delta_pct": 0.5,
                                                                        "decode_tok_s": 8},
           {"candidate": 3, "ppl_delta_pct": 2.0, "decode_tok_s": 9}, {"candidate": 4, "ppl_delta_pct": 0.2,
                                                                        "decode_tok_s": 5}]
    assert [p["candidate"] for p in htmlreport.front_2d(pts)] == [4, 2, 1]


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="no headless Chromium here (apt-get install chromium)")
def test_a_real_browser_draws_the_figures_offline(built, tmp_path):
    page = built.artifact_path / artifact.HTML_REPORT
    dom = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
                          "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120).stdout
    # plotly replaces the empty div with its SVG: the figure was drawn, from the inlined library
    assert re.search(r'id="plot-timeline"[^>]*class="[^"]*js-plotly-plot', dom) or \
        ('id="plot-timeline"' in dom and "main-svg" in dom)
