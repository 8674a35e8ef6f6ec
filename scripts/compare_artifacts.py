"""Are two artifacts the same model? For a refactoring that must not change what a recipe builds (issue 14: model
files byte-identical, or logits within 1e-5 where a numeric path legitimately changed).

    python scripts/compare_artifacts.py BEFORE AFTER [--tokens 1024] [--json]

Per model file: byte-identical or not; where not, what differs — ONNX: initializers (name, dtype, shape, values),
the graph's own bytes (nodes, inputs, outputs) apart from the model's metadata, metadata keys, op counts;
safetensors: each tensor. Then both artifacts are loaded with `optpipe.load` (rejected ones too) and run on the
first `--tokens` tokens of the built-in evaluation text in 512-token windows: max |Δ logit| and top-1 flips.
To compare what two commits build, build the recipe at the older one from a worktree
(`git worktree add /tmp/old REV; cd /tmp/old; PYTHONPATH=src python -m optpipe build RECIPE -o A --keep-rejected`)
and at HEAD, then compare A and B; this environment loads artifacts of older commits (checked back to 03a2235).
"""
from __future__ import annotations

import argparse
import filecmp
import json
from collections import Counter
from pathlib import Path

import numpy as np

SKIP = {"manifest.json", "report.md", "report.html"}  # describe a build (times, paths, figures), not the model


def onnx_differences(a: Path, b: Path) -> dict:
    import onnx
    from onnx import numpy_helper

    ma, mb = onnx.load(str(a)), onnx.load(str(b))
    ia = {t.name: t for t in ma.graph.initializer}
    ib = {t.name: t for t in mb.graph.initializer}
    changed = [n for n in sorted(set(ia) & set(ib))
               if not _same_array(numpy_helper.to_array(ia[n]), numpy_helper.to_array(ib[n]))]
    meta_a = {p.key: p.value for p in ma.metadata_props}
    meta_b = {p.key: p.value for p in mb.metadata_props}
    for m in (ma, mb):  # the graph's structure, with initializer data out of the way (compared above)
        for t in m.graph.initializer:
            t.ClearField("raw_data")
            t.ClearField("external_data")
            t.data_location = 0
    ops_a = Counter(n.op_type for n in ma.graph.node)
    ops_b = Counter(n.op_type for n in mb.graph.node)
    return {"initializers_only_before": sorted(set(ia) - set(ib)), "initializers_only_after": sorted(set(ib) - set(ia)),
            "initializers_changed": changed, "initializers_compared": len(set(ia) & set(ib)),
            "graph_identical": ma.graph.SerializeToString() == mb.graph.SerializeToString(),
            "ops_only_before": dict(ops_a - ops_b), "ops_only_after": dict(ops_b - ops_a),
            "metadata_changed": sorted(k for k in meta_a.keys() & meta_b.keys() if meta_a[k] != meta_b[k]),
            "metadata_only_before": sorted(meta_a.keys() - meta_b.keys()),
            "metadata_only_after": sorted(meta_b.keys() - meta_a.keys())}


def safetensors_differences(a: Path, b: Path) -> dict:
    import torch
    from safetensors.torch import load_file

    ta, tb = load_file(str(a)), load_file(str(b))
    changed = [k for k in sorted(set(ta) & set(tb)) if ta[k].dtype != tb[k].dtype or not torch.equal(ta[k], tb[k])]
    return {"tensors_only_before": sorted(set(ta) - set(tb)), "tensors_only_after": sorted(set(tb) - set(ta)),
            "tensors_changed": changed, "tensors_compared": len(set(ta) & set(tb))}


def _same_array(x: np.ndarray, y: np.ndarray) -> bool:
    return x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()


def file_differences(a: Path, b: Path) -> dict:
    names = sorted({p.name for p in a.iterdir() if p.is_file()} | {p.name for p in b.iterdir() if p.is_file()})
    out = {}
    for name in names:
        if name in SKIP:
            continue
        fa, fb = a / name, b / name
        if not (fa.is_file() and fb.is_file()):
            out[name] = {"identical": False, "missing_in": "after" if fa.is_file() else "before"}
            continue
        entry = {"identical": filecmp.cmp(fa, fb, shallow=False)}
        if not entry["identical"] and name.endswith(".onnx"):
            entry.update(onnx_differences(fa, fb))
        elif not entry["identical"] and name.endswith(".safetensors"):
            entry.update(safetensors_differences(fa, fb))
        out[name] = entry
    return out


def evaluation_ids(paths, runners, tokens: int) -> np.ndarray:
    """The built-in evaluation text in the first of the artifacts' tokenizers (an artifact older than its manifest's
    `tokenizer_dir` still holds one: `tokenizer/` or its root)."""
    from transformers import AutoTokenizer

    from optpipe.data import builtin_path
    from optpipe.errors import InputError

    text = builtin_path("builtin:evaluation").read_text()
    for runner in runners:
        try:
            return np.asarray(runner.encode(text)).reshape(-1)[:tokens]
        except InputError:
            continue
    for d in (q for p in paths for q in (p / "tokenizer", p)):
        if (d / "tokenizer.json").is_file():
            return np.asarray(AutoTokenizer.from_pretrained(str(d))(text, add_special_tokens=False)["input_ids"])[:tokens]
    raise SystemExit("neither artifact carries a tokenizer")


def logits(runner, ids: np.ndarray) -> np.ndarray:
    outs = [np.asarray(runner.logits(ids[i:i + 512]), np.float32) for i in range(0, ids.size, 512)]
    return np.concatenate([o.reshape(-1, o.shape[-1]) for o in outs])


def compare(a: Path, b: Path, tokens: int = 1024, threads: int = 2) -> dict:
    files = file_differences(a, b)
    import optpipe

    ra, rb = (optpipe.load(p, threads=threads, allow_rejected=True) for p in (a, b))
    ids = evaluation_ids((b, a), (rb, ra), tokens)
    la, lb = logits(ra, ids), logits(rb, ids)
    d = np.abs(la.astype(np.float64) - lb.astype(np.float64))
    return {"before": str(a), "after": str(b), "files": files,
            "files_identical": all(f["identical"] for f in files.values()),
            "logits": {"positions": int(la.shape[0]), "max_abs_diff": float(d.max()),
                       "top1_flips": int((la.argmax(-1) != lb.argmax(-1)).sum())}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path)
    ap.add_argument("--tokens", type=int, default=1024, help="evaluation tokens run through both (default 1024)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    r = compare(a.before, a.after, a.tokens, a.threads)
    if a.json:
        print(json.dumps(r, indent=1))
        return 0
    for name, f in r["files"].items():
        detail = {k: v for k, v in f.items() if k != "identical" and v not in ([], {}, None)}
        print(f"{name}: {'byte-identical' if f['identical'] else 'differs'}" + (f"  {detail}" if detail else ""))
    lg = r["logits"]
    print(f"logits over {lg['positions']} positions: max |diff| {lg['max_abs_diff']:.3g}, top-1 flips {lg['top1_flips']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
