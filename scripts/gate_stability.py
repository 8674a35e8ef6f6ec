#!/usr/bin/env python
"""Do the gates give the same verdict every time? Re-gates existing artifacts (`optpipe gate --json`, its own
process each time) N times, some runs with CPU-bound processes beside it, and tabulates each gate's verdict,
the speed interval and the rounds discarded as busy. A verdict that differs between runs is a gate that
measures the machine, not the artifact. Writes docs/benchmarks.md (section `gate-stability-<isa>`) and
docs/gate_stability_<isa>.json.

    python scripts/gate_stability.py /tmp/matrix/smollm2-135m-cpu-torch-int8 /tmp/matrix/... --runs 5 --loaded 2
"""
from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import time
from pathlib import Path

from _doc import write_section
from recipe_matrix import isa_tag

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from optpipe import hw  # noqa: E402

HOG = "while True: pass"


def gate_once(artifact: Path, hogs: int) -> dict:
    procs = [subprocess.Popen([sys.executable, "-c", HOG]) for _ in range(hogs)]
    try:
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, "-m", "optpipe.cli", "-q", "gate", str(artifact), "--json"],
                           capture_output=True, text=True)
        seconds = time.perf_counter() - t0
    finally:
        for h in procs:
            h.kill()
    try:
        out = json.loads(p.stdout)
    except json.JSONDecodeError:
        return {"exit_code": p.returncode, "error": p.stderr.strip()[-400:], "seconds": seconds, "hogs": hogs}
    gates = out.get("gates") or {}
    spd = gates.get("speed", {})
    return {"exit_code": p.returncode, "hogs": hogs, "seconds": round(seconds, 1),
            "verdicts": {k: g.get("status") for k, g in gates.items()},
            "generation": {k: gates.get("generation", {}).get(k) for k in ("mean_first_divergence",
                           "teacher_forced_agreement", "repetition_reference", "repetition_candidate")},
            "decode_speedup": spd.get("decode_speedup"), "decode_speedup_ci95": spd.get("decode_speedup_ci95"),
            "rounds": spd.get("rounds"), "rounds_busy": spd.get("rounds_busy"), "threads": spd.get("threads"),
            "background_cpus_at_start": spd.get("background_cpus_at_start"),
            "ppl_delta_pct": gates.get("accuracy", {}).get("ppl_delta_pct")}


def table(results: dict, isa: str) -> str:
    env = hw.environment()
    lines = [f"Gate stability on {env['cpu']} ({isa}; {env['physical_cores']} cores), "
             f"{datetime.date.today().isoformat()}: `python scripts/gate_stability.py ARTIFACTS --runs N --loaded K`. "
             "Each run re-gates the artifact in its own process; loaded runs have a CPU-bound process (one per two CPUs) "
             "beside it; threads: what the gates ran at.", "",
             "| artifact | run | beside it | threads | exit | accuracy | speed | coverage | generation | "
             "decode speedup [95%] | rounds (busy) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, runs in results.items():
        for i, r in enumerate(runs, 1):
            v = r.get("verdicts", {})
            ci = r.get("decode_speedup_ci95") or [None, None]
            sp = (f"{r['decode_speedup']:.2f}× [{ci[0]}, {ci[1]}]" if r.get("decode_speedup") is not None else "–")
            lines.append(f"| {name} | {i} | {r['hogs']} CPU hog(s) | {r.get('threads', '–')} | {r['exit_code']} | "
                         f"{v.get('accuracy', '–')} | "
                         f"{v.get('speed', '–')} | {v.get('coverage', '–')} | {v.get('generation', '–')} | {sp} | {r.get('rounds')} "
                         f"({r.get('rounds_busy')}) |")
        every = {json.dumps(r.get("verdicts"), sort_keys=True) for r in runs}
        said = [f"{'identical' if len(every) == 1 else 'DIFFERENT'} verdicts over all {len(runs)} runs"]
        for label, group in (("quiet", [r for r in runs if not r["hogs"]]), ("loaded", [r for r in runs if r["hogs"]])):
            verdicts = {json.dumps(r.get("verdicts"), sort_keys=True) for r in group}
            if group:
                speed = sorted({(r.get("verdicts") or {}).get("speed", "error") for r in group})
                said.append(f"{label}: {'identical' if len(verdicts) == 1 else 'DIFFERENT'} verdicts "
                            f"(speed {', '.join(speed)}) over {len(group)} run(s)")
        lines.append(f"| {name} | **{'; '.join(said)}** | | | | | | | | | |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifacts", nargs="*", type=Path)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--loaded", type=int, default=2, help="how many of the runs have CPU hogs beside them")
    ap.add_argument("--no-docs", action="store_true")
    ap.add_argument("--table-only", action="store_true", help="rewrite the table from the recorded JSON, no runs")
    a = ap.parse_args()
    hogs = hw.usable_cpus()
    results = {}
    for art in [] if a.table_only else a.artifacts:
        runs = []
        for i in range(a.runs):
            loaded = i >= a.runs - a.loaded
            r = gate_once(art, hogs // 2 if loaded else 0)
            print(art.name, i + 1, json.dumps(r), flush=True)
            runs.append(r)
        results[art.name] = runs
    isa = isa_tag()
    record = ROOT / "docs" / f"gate_stability_{isa}.json"
    if not a.no_docs and record.exists():  # artifacts measured in earlier invocations stay in the table
        results = {**json.loads(record.read_text())["results"], **results}
    text = table(results, isa)
    print(text)
    if not a.no_docs:
        record.write_text(json.dumps(
            {"environment": hw.environment(), "results": results}, indent=1))
        write_section(ROOT / "docs" / "benchmarks.md", f"gate-stability-{isa}", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
