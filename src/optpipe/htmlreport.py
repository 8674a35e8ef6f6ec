"""report.html: one self-contained page (plotly.js inlined, opens offline) beside an artifact, for people.

`build` writes the gate table and the pass timeline; `tune` adds the Pareto figure of every evaluated candidate
(ΔPPL with its 95% interval against decode speed, marker area by artifact size) and the candidate table. Each
figure's JSON is also embedded as `<script type="application/json" id="figure-NAME">`, so a test (or a tool) can
read exactly what is drawn without a browser.
"""
from __future__ import annotations

import html
import json

import plotly.graph_objects as go
import plotly.io as pio

from .runtime.storage import STORAGE_COLUMNS, storage_rows

STATUS_COLOURS = {"passed": "#2a9d8f", "rejected": "#e76f51", "screened": "#8d99ae"}
PARETO_TRACE = "Pareto front"


def _esc(x) -> str:
    return html.escape(str(x))


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_esc(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _figure(fig: go.Figure, name: str, first: bool) -> str:
    data = pio.to_json(fig, validate=True).replace("</", "<\\/")  # never ends the script element early
    div = pio.to_html(fig, full_html=False, include_plotlyjs=first, div_id=f"plot-{name}",
                      config={"displaylogo": False})
    return f'<script type="application/json" id="figure-{name}">{data}</script>\n{div}'


def pareto_figure(trace: list[dict]) -> go.Figure:
    """One marker per evaluated candidate (x: decode tok/s; y: ΔPPL % with its 95% interval; area: size)."""
    fig = go.Figure()
    points = [e for e in trace if e.get("ppl_delta_pct") is not None and e.get("decode_tok_s") is not None]
    biggest = max((e["artifact_bytes"] for e in points), default=1)
    for status in ("passed", "rejected", "screened"):
        group = [e for e in points if e["status"] == status]
        if not group:
            continue
        lo = [e["ppl_delta_pct"] - e["ppl_delta_pct_ci95"][0] for e in group]
        hi = [e["ppl_delta_pct_ci95"][1] - e["ppl_delta_pct"] for e in group]
        fig.add_trace(go.Scatter(
            x=[e["decode_tok_s"] for e in group], y=[e["ppl_delta_pct"] for e in group], mode="markers",
            name=status, marker={"color": STATUS_COLOURS[status], "sizemode": "area", "sizeref": biggest / 900,
                                 "size": [e["artifact_bytes"] for e in group], "line": {"width": 1}},
            error_y={"type": "data", "symmetric": False, "array": hi, "arrayminus": lo},
            customdata=[e["candidate"] for e in group],
            text=[_hover(e) for e in group], hovertemplate="%{text}<extra></extra>"))
    front = front_2d(points)
    if front:
        fig.add_trace(go.Scatter(x=[e["decode_tok_s"] for e in front], y=[e["ppl_delta_pct"] for e in front],
                                 mode="lines", name=PARETO_TRACE, line={"dash": "dot", "color": "#264653"},
                                 hoverinfo="skip"))
    for e in points:
        if e.get("winner"):
            fig.add_annotation(x=e["decode_tok_s"], y=e["ppl_delta_pct"], text=f"winner: candidate {e['candidate']}",
                               showarrow=True, arrowhead=2, ay=-40)
    limits = {e.get("max_ppl_delta_pct") for e in trace if e.get("max_ppl_delta_pct") is not None}
    for limit in limits:
        fig.add_hline(y=limit, line_dash="dash", line_color="#e76f51",
                      annotation_text=f"max_ppl_delta_pct {limit}%", annotation_position="top left")
    fig.update_layout(title="Candidates: accuracy against decode speed (marker area: artifact size)",
                      xaxis_title="decode tok/s (quick unpaired run, every candidate alike; the paired speed gate decides)",
                      yaxis_title="ΔPPL vs reference, % (95% interval)", template="plotly_white", height=520)
    return fig


def front_2d(points: list[dict]) -> list[dict]:
    """The drawn front: candidates no other is both more accurate and faster than (size aside), by speed."""
    def beaten(b):
        return any(a["ppl_delta_pct"] <= b["ppl_delta_pct"] and a["decode_tok_s"] >= b["decode_tok_s"]
                   and (a["ppl_delta_pct"], a["decode_tok_s"]) != (b["ppl_delta_pct"], b["decode_tok_s"]) for a in points)
    return sorted((b for b in points if not beaten(b)), key=lambda e: e["decode_tok_s"])


def _hover(e: dict) -> str:
    settings = "<br>".join(f"{k} = {json.dumps(v)}" for k, v in e["settings"].items())
    return (f"candidate {e['candidate']} ({e['status']})<br>{settings}<br>ΔPPL {e['ppl_delta_pct']:+.2f}% "
            f"[{e['ppl_delta_pct_ci95'][0]:+.2f}, {e['ppl_delta_pct_ci95'][1]:+.2f}]<br>"
            f"decode {e['decode_tok_s']} tok/s, {e['artifact_bytes'] / 1e6:.1f} MB")


def sensitivity_figure(sens: dict, top: int = 30) -> go.Figure:
    """The most sensitive (layer, projection) groups: mean KL with that group alone quantized."""
    rows = sens["rows"][:top]
    fig = go.Figure(go.Bar(y=[f"layer {r['layer']} {r['projection']}" for r in rows], x=[r["mean_kl"] for r in rows],
                           orientation="h", marker_color="#e9c46a"))
    fig.update_layout(title=f"Per-layer sensitivity: mean KL with one group alone quantized ({sens.get('tokens')} "
                            f"calibration tokens; top {len(rows)} of {len(sens['rows'])})",
                      yaxis={"autorange": "reversed", "automargin": True, "type": "category", "dtick": 1},
                      template="plotly_white", height=160 + 22 * len(rows), xaxis_title="mean KL")
    return fig


def timeline_figure(passes: list[dict]) -> go.Figure:
    fig = go.Figure(go.Bar(y=[f"{i}: {p['name']}" for i, p in enumerate(passes)],
                           x=[p["seconds"] for p in passes], orientation="h", marker_color="#457b9d"))
    fig.update_layout(title="Pass timeline (seconds)", template="plotly_white", height=160 + 40 * len(passes),
                      yaxis={"autorange": "reversed", "automargin": True, "dtick": 1, "type": "category"},
                      xaxis_title="seconds")
    return fig


def _gate_rows(gates: dict) -> list[list]:
    rows = []
    for name, g in gates.items():
        figures = {k: v for k, v in g.items() if k not in ("status", "passed", "thresholds", "failures", "runs",
                                                           "runs_columns", "layers", "prompt_ids", "candidate_tokens")
                   and (not isinstance(v, (list, dict)) or k.endswith("_ci95"))}
        shown = ", ".join(f"{k}={v}" for k, v in list(figures.items())[:8])
        rows.append([name, g["status"], shown, "; ".join(g.get("failures") or [])])
    return rows


STYLE = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;"
         "margin:1em 0;font-size:13px}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}"
         "th{background:#f1f3f5}.passed{color:#2a9d8f}.rejected{color:#e76f51}")


def _page(title: str, parts: list[str]) -> str:
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{_esc(title)}</title><style>{STYLE}</style>"
            f"</head><body><h1>{_esc(title)}</h1>\n" + "\n".join(parts) + "\n</body></html>\n")


def _machine(env: dict) -> str:
    isa = ", ".join(k for k, v in (env.get("isa") or {}).items() if v) or "baseline x86-64"
    return f"<p>Measured on {_esc(env.get('cpu'))} ({_esc(isa)}), {_esc(env.get('physical_cores'))} physical cores.</p>"


def _artifact_parts(m: dict, first: bool) -> list[str]:
    return [f"<p>status: <b class='{_esc(m['status'])}'>{_esc(m['status'])}</b>; target {_esc(m['recipe']['target'])}; "
            f"model {_esc(m['recipe']['model']['source'])}; compared with {_esc(m.get('reference'))}; speed "
            f"baseline {_esc(m.get('speed_baseline'))}</p>",
            "<h2>Gates</h2>", _table(["gate", "status", "figures", "failures"], _gate_rows(m["gates"])),
            *_storage_parts(m),
            "<h2>Passes</h2>", _figure(timeline_figure(m["passes"]), "timeline", first)]


def _storage_parts(m: dict) -> list[str]:
    storage = (m["gates"].get("coverage") or {}).get("storage")
    if not storage:
        return []
    return [f"<h2>Storage: {_esc(storage['bits_per_weight'])} bits per weight</h2>",
            _table(STORAGE_COLUMNS, storage_rows(storage))]


def render_build(manifest: dict) -> str:
    return _page(f"optpipe artifact: {manifest['recipe']['name']}",
                 [_machine(manifest["environment"]), *_artifact_parts(manifest, True)])


def render_tune(search: dict, manifest: dict | None, environment: dict) -> str:
    trace = search["trace"]
    parts = [_machine(environment)]
    if manifest is not None:
        tied = [n for n in search.get("tied_on_objective", []) if n != search["winner"]]
        parts.append(f"<p>Winner: candidate {search['winner']} of {search['candidates']} "
                     f"({search['evaluated']} evaluated, objective {_esc(search['objective'])})"
                     + (f"; tied on the objective with {', '.join(map(str, tied))} (head to head, the 95% "
                        "interval of the speed ratio reaches 1), so the most accurate of them won" if tied else "")
                     + ".</p>")
        if search.get("runoff"):
            ro = search["runoff"]
            parts.append(f"<p>Runoff ({_esc(ro['phase'])}, {ro['rounds']} interleaved rounds, {ro['threads']} "
                         "thread(s)): each finalist's speed over the leader's, 95% interval.</p>")
            parts.append(_table(["candidate", "ratio to the leader", "95% interval"],
                                [[n, v[0], f"[{v[1]}, {v[2]}]"] for n, v in ro["relative"].items()]))
    else:
        parts.append(f"<p><b class='rejected'>No candidate passed every gate</b> ({search['evaluated']} evaluated"
                     f"{'; ' + _esc(search['stopped']) if search.get('stopped') else ''}); nothing was emitted. "
                     "Nearest misses:</p>")
        by_number = {e["candidate"]: e for e in trace}
        parts.append(_table(["candidate", "settings", "ΔPPL %", "decode tok/s", "why refused"],
                            [[n, _settings(by_number[n]), _ppl(by_number[n]), by_number[n].get("decode_tok_s"),
                              "; ".join(by_number[n].get("failures") or [by_number[n].get("reason", "")])]
                             for n in search.get("nearest_misses", [])]))
    parts += ["<h2>Pareto: accuracy, speed, size</h2>", _figure(pareto_figure(trace), "pareto", True)]
    if search.get("sensitivity"):
        parts += ["<h2>Sensitivity</h2>", _figure(sensitivity_figure(search["sensitivity"]), "sensitivity", False)]
    parts += ["<h2>Candidates</h2>", _table(
        ["#", "settings", "status", "ΔPPL % [95%]", "decode tok/s", "decode speedup [95%]", "MB", "Pareto",
         "cached", "seconds"],
        [[e["candidate"], _settings(e), e["status"], _ppl(e), e.get("decode_tok_s"),
          f"{e['decode_speedup']} {e.get('decode_speedup_ci95')}" if e.get("decode_speedup") else "",
          round(e["artifact_bytes"] / 1e6, 1) if e.get("artifact_bytes") else "", "yes" if e.get("pareto") else "",
          "build+gates" if all((e.get("cached") or {}).values()) and e.get("cached") else
          ("build" if (e.get("cached") or {}).get("build") else ""), e["seconds"]] for e in trace])]
    if manifest is not None:
        parts += _artifact_parts(manifest, False)
    return _page(f"optpipe tune: {search.get('recipe_file') or 'recipe'}", parts)


def _settings(e: dict) -> str:
    return ", ".join(f"{k}={json.dumps(v)}" for k, v in e["settings"].items())


def _ppl(e: dict) -> str:
    if e.get("ppl_delta_pct") is None:
        return e.get("reason", "")
    lo, hi = e["ppl_delta_pct_ci95"]
    return f"{e['ppl_delta_pct']:+.2f} [{lo:+.2f}, {hi:+.2f}]"
