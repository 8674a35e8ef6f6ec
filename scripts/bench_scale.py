#!/usr/bin/env python
"""Scale benchmark: the streaming INT4 build of recipes/llama2-13b-cpu.yaml on a checkpoint with Llama-2-13B's
shapes, at several layer counts, each build in its own process under `/usr/bin/time -v` (peak RSS as the OS
measures it). Prints and writes to docs/benchmarks.md: peak RSS, wall time per stage, artifact size, gate
figures, and whether the artifact loaded in ONNX Runtime and generated tokens.

    python scripts/make_synthetic_checkpoint.py models/llama2-13b-synthetic      # once: ~26 GB, a few minutes
    python scripts/bench_scale.py --checkpoint models/llama2-13b-synthetic --layers 2 4 8 40

Fewer layers than the checkpoint has are built from a view of it (config with fewer layers, index without the
other layers' tensors, the same shard files linked), so every size reads the same weights.

`--calibrated` builds a variant with the calibration passes, run block by block: `smoothquant` first and GPTQ
for the decoder layers (512 calibration tokens), to show that their memory too follows one layer, not the model:

    python scripts/bench_scale.py --checkpoint models/llama2-13b-synthetic --layers 2 4 8 --calibrated

Random weights are noise: INT4 on noise moves perplexity by a few percent (on 2 layers, +4.6%), which is not
what it does to a trained model. The benchmark therefore builds a copy of the recipe whose accuracy threshold is
`--max-ppl-delta` (default 10%), and says so in its output; the shipped recipe keeps 3% for real weights.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml
from _doc import write_section

ROOT = Path(__file__).resolve().parent.parent


def layer_view(checkpoint: Path, layers: int, into: Path) -> Path:
    cfg = json.loads((checkpoint / "config.json").read_text())
    if layers >= cfg["num_hidden_layers"]:
        return checkpoint
    view = into / f"view-{layers}"
    view.mkdir(parents=True, exist_ok=True)
    index = json.loads((checkpoint / "model.safetensors.index.json").read_text())
    keep = {k: v for k, v in index["weight_map"].items()
            if not (m := re.match(r"model\.layers\.(\d+)\.", k)) or int(m.group(1)) < layers}
    (view / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": keep}))
    (view / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": layers}))
    for f in checkpoint.iterdir():
        if f.suffix == ".safetensors" or f.name.startswith(("tokenizer", "special_tokens")):
            link = view / f.name
            if not link.exists():
                link.symlink_to(f.resolve())
    return view


def run_build(recipe: Path, checkpoint: Path, out: Path, threads: int | None) -> dict:
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "optpipe.cli", "build", str(recipe), "-o", str(out),
           "--overwrite", "--keep-rejected"]
    if threads:
        cmd += ["--threads", str(threads)]
    env = {**os.environ, "OPTPIPE_LLAMA2_13B": str(checkpoint), "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    err = proc.stderr
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", err).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", err).group(1)
    parts = [float(x) for x in wall.split(":")]
    seconds = sum(p * 60 ** i for i, p in enumerate(reversed(parts)))
    art = out if out.exists() else Path(str(out) + ".rejected")
    manifest = json.loads((art / "manifest.json").read_text()) if (art / "manifest.json").exists() else None
    if manifest is None:
        sys.stderr.write(err[-3000:])
        raise SystemExit(f"build failed (exit {proc.returncode}); no manifest")
    data = art / "model.onnx.data"
    speed = manifest["gates"]["speed"]
    build_peak = (manifest.get("peak_rss_mib") or {}).get("build")
    return {"exit_code": proc.returncode, "status": manifest["status"], "peak_rss_gib": round(rss_kb / 2**20, 2),
            "build_peak_rss_gib": round(build_peak / 1024, 2) if build_peak else None,
            "wall_seconds": round(seconds, 1), "stages": manifest.get("stage_seconds"),
            "artifact_gb": round(sum(f.stat().st_size for f in art.iterdir() if f.is_file()) / 1e9, 2),
            "external_data_gb": round(data.stat().st_size / 1e9, 2),
            "ppl_delta_pct": manifest["summary"]["gates.accuracy.ppl_delta_pct"],
            "candidate_decode_tok_s": speed.get("candidate_decode_tok_s"),
            "reference_decode_tok_s": speed.get("reference_decode_tok_s"),
            "generated_tokens": len(speed.get("candidate_tokens") or []), "path": str(art)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 4, 8, 40])
    ap.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "llama2-13b-cpu.yaml")
    ap.add_argument("--max-ppl-delta", type=float, default=10.0)
    ap.add_argument("--out", type=Path, default=ROOT / "artifacts")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--doc", default=str(ROOT / "docs" / "benchmarks.md"))
    ap.add_argument("--json", default=str(ROOT / "docs" / "bench_scale.json"))
    ap.add_argument("--calibrated", action="store_true",
                    help="smoothquant + GPTQ (layer by layer) instead of the recipe's RTN; own doc section and json")
    a = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="optpipe-scale-"))
    recipe = yaml.safe_load(a.recipe.read_text())
    recipe["gates"]["accuracy"]["max_ppl_delta_pct"] = a.max_ppl_delta
    section, prefix = "bench_scale", "scale"
    if a.calibrated:
        section, prefix = "bench_scale_calibrated", "scale-calibrated"
        recipe["passes"] = [{"name": "smoothquant", "alpha": 0.5}] + [
            {**p, "algorithm": "gptq"} if p["name"] == "quantize-int4" else p for p in recipe["passes"]]
        recipe["calibration"] = {"source": "builtin:calibration", "max_tokens": 512, "window": 256}
        if a.json == str(ROOT / "docs" / "bench_scale.json"):
            a.json = str(ROOT / "docs" / "bench_scale_calibrated.json")
    recipe_path = work / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe))
    results = {}
    for n in a.layers:
        print(f"== {n} layers", flush=True)
        r = run_build(recipe_path, layer_view(a.checkpoint.resolve(), n, work), a.out / f"{prefix}-{n}layers", a.threads)
        results[n] = r
        print(json.dumps(r), flush=True)
        report(a, section, results)  # after every size: a long run stopped early keeps what it measured
    return 0


def report(a, section: str, results: dict) -> None:
    date = datetime.date.today().isoformat()
    variant = (" + smoothquant and GPTQ for the decoder layers, block by block, 512 calibration tokens (--calibrated)"
               if a.calibrated else "")
    lines = [f"<!-- {section}: generated by scripts/bench_scale.py on {date} -->",
             f"Checkpoint: `{a.checkpoint}` (Llama-2-13B shapes, random bf16 weights). Recipe: `{a.recipe.name}`{variant} "
             f"with max_ppl_delta_pct {a.max_ppl_delta} (random weights). Each build in its own process; peak RSS from "
             "`/usr/bin/time -v`.", "",
             "| layers | peak RSS GiB (process) | peak RSS GiB before the gates (read + quantize + write) | wall s | load / passes / save / gates s | external data GB | Δppl | "
             "decode tok/s artifact vs streamed fp32 | tokens generated | status |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for n, r in results.items():
        st = r["stages"] or {}
        lines.append(f"| {n} | {r['peak_rss_gib']} | {r['build_peak_rss_gib']} | {r['wall_seconds']} | "
                     f"{st.get('load')} / {st.get('passes')} / {st.get('save')} / {st.get('gates')} | "
                     f"{r['external_data_gb']} | {r['ppl_delta_pct']:+.2f}% | "
                     f"{r['candidate_decode_tok_s']} vs {r['reference_decode_tok_s']} | {r['generated_tokens']} | "
                     f"{r['status']} |")
    table = "\n".join(lines)
    print(table)
    Path(a.json).write_text(json.dumps({"date": date, "variant": "calibrated" if a.calibrated else "recipe",
                                        "results": results}, indent=2))
    write_section(Path(a.doc), section, table)


if __name__ == "__main__":
    sys.exit(main())
