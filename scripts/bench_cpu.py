#!/usr/bin/env python
"""Side-by-side CPU benchmark, one process, same prompt, same threads, interleaved rounds:
fp32 PyTorch eager, optpipe artifacts (cpu-onnx INT8/INT4; cpu-torch bf16/INT8/INT4 when given), and llama.cpp (llama-cpp-python, optional) on the same
GGUF (the shipped Q4_1 and a Q8_0 requantized from it), or, with `--model DIR`, on that HF checkpoint converted to
GGUF by llama.cpp's own converter and quantized to Q8_0, Q4_K_M (with an importance matrix from the calibration
text when `--llama-cpp-bin` has llama-imatrix and llama-quantize) and Q4_0, so both start from the same weights. Reports prefill ms, decode tok/s (wall and per CPU-second),
perplexity on the built-in evaluation text (same token ids for every engine), peak RSS (each engine alone in a
child process) and artifact size. Writes a table into docs/benchmarks.md.

    python scripts/bench_cpu.py --int4 artifacts/smollm2-int4 --int8 artifacts/smollm2-int8 --threads 1 2 \
        --torch-bf16 artifacts/smollm2-torch-bf16 --torch-int8 artifacts/smollm2-torch-int8 \
        --torch-int4 artifacts/smollm2-torch-int4
    python scripts/bench_cpu.py --model /tmp/smollm2-offgrid --int4 OUT --int8 "" \
        --llama-cpp-src LLAMA_CPP_DIR --llama-cpp-bin LLAMA_CPP_DIR/build/bin --section bench_offgrid

LLAMA_CPP_DIR: the llama.cpp source vendored in llama-cpp-python's sdist (`pip download --no-binary :all:
llama-cpp-python`, vendor/llama.cpp); its converter needs `gguf` and `sentencepiece`. Build the two tools with
`cmake -S . -B build -DLLAMA_CURL=OFF && cmake --build build --target llama-imatrix llama-quantize`.
"""
from __future__ import annotations

import argparse
import atexit
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from _doc import write_section  # noqa: E402 - scripts/_doc.py

from optpipe import data, hw, models  # noqa: E402
from optpipe.gates.accuracy import log_softmax  # noqa: E402
from optpipe.recipe import EVALUATION_TOKENS, DataSpec, ModelSpec  # noqa: E402
from optpipe.targets.base import Generation  # noqa: E402


class LlamaCppRunner:
    def __init__(self, path: str, threads: int, n_ctx: int = 1024):
        from llama_cpp import Llama

        self.llm = Llama(model_path=path, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                         logits_all=True, verbose=False)

    def logits(self, ids):
        self.llm.reset()
        self.llm.eval([int(t) for t in ids])
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)

    def generate(self, ids, max_new_tokens, eos_token_id=None):
        llm = self.llm
        llm.reset()
        t0 = time.perf_counter()
        llm.eval([int(t) for t in ids])
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        t1 = time.perf_counter()
        tokens = [tok]
        while len(tokens) < max_new_tokens:
            llm.eval([tok])
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            tokens.append(tok)
        return Generation(tokens, t1 - t0, time.perf_counter() - t1)


def gguf_path() -> Path:
    r = models.resolve("builtin:smollm2-135m")
    return Path(r.location) / r.gguf_file


def requantize(src: Path, ftype: str, workdir: Path) -> Path:
    import llama_cpp

    dst = workdir / f"{src.stem}-{ftype}.gguf"
    if not dst.exists():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype.upper()}")
        params.allow_requantize = True
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
        if rc != 0:
            raise RuntimeError(f"llama_model_quantize to {ftype} failed ({rc})")
    return dst


def convert_hf(model_dir: Path, llama_src: Path, workdir: Path) -> Path:
    """The checkpoint in fp32 GGUF, written by llama.cpp's converter (so llama.cpp starts from the same weights)."""
    dst = workdir / "model-f32.gguf"
    subprocess.run([sys.executable, str(llama_src / "convert_hf_to_gguf.py"), str(model_dir), "--outtype", "f32",
                    "--outfile", str(dst)], check=True, capture_output=True, text=True,
                   env={**os.environ, "PYTHONPATH": str(llama_src / "gguf-py")})
    return dst


def quantize_with_imatrix(src: Path, ftype: str, bin_dir: Path, threads: int, workdir: Path) -> Path:
    """llama.cpp's importance matrix from the calibration text (never the evaluation text), then `ftype` with it."""
    calib = workdir / "calibration.txt"
    calib.write_text(data.builtin_path("builtin:calibration").read_text(encoding="utf-8"), encoding="utf-8")
    imatrix = workdir / "imatrix.gguf"
    subprocess.run([str(bin_dir / "llama-imatrix"), "-m", str(src), "-f", str(calib), "-o", str(imatrix), "-c", "512",
                    "-t", str(threads)], check=True, capture_output=True, text=True)
    dst = workdir / f"{src.stem}-{ftype.lower()}-imatrix.gguf"
    subprocess.run([str(bin_dir / "llama-quantize"), "--imatrix", str(imatrix), str(src), str(dst), ftype.upper()],
                   check=True, capture_output=True, text=True)
    return dst


def gguf_engines(a, tmp: Path) -> list[tuple[str, Path]]:
    if a.model == "builtin:smollm2-135m":
        src = gguf_path()
        return [("llama.cpp Q4_1 (shipped GGUF)", src), ("llama.cpp Q8_0", requantize(src, "q8_0", tmp)),
                ("llama.cpp Q4_0", requantize(src, "q4_0", tmp))]
    f32 = convert_hf(Path(a.model), Path(a.llama_cpp_src), tmp)
    rows = [("llama.cpp Q8_0", requantize(f32, "q8_0", tmp)), ("llama.cpp Q4_K_M", requantize(f32, "q4_k_m", tmp))]
    if a.llama_cpp_bin:
        rows.append(("llama.cpp Q4_K_M + imatrix",
                     quantize_with_imatrix(f32, "q4_k_m", Path(a.llama_cpp_bin), max(a.threads), tmp)))
    return rows + [("llama.cpp Q4_0", requantize(f32, "q4_0", tmp))]


def make_runner(kind: str, arg: str, threads: int, model=None):
    if kind == "torch":
        from optpipe.targets.torch_eager import TorchEagerRunner

        if model is None:
            model, _, _ = models.load(ModelSpec(source=arg))
        return TorchEagerRunner(model, threads)
    if kind == "onnx":
        from optpipe.targets.cpu_onnx import CpuOnnxTarget

        return CpuOnnxTarget().load(Path(arg), threads)
    if kind == "torch-artifact":
        from optpipe.targets.cpu_torch import CpuTorchTarget

        return CpuTorchTarget().load(Path(arg), threads)
    if kind == "ipex-artifact":
        from optpipe.targets.cpu_ipex import CpuIpexTarget

        return CpuIpexTarget().load(Path(arg), threads)
    return LlamaCppRunner(arg, threads)


def read_bandwidth(threads: int, gib: float = 1.0) -> float:
    """Memory read bandwidth (GB/s): a float32 array of `gib` GiB summed with `threads` threads, best of 5."""
    import torch

    torch.set_num_threads(threads)
    x = torch.ones(int(gib * (1 << 30)) // 4)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best / 1e9


def onnx_bytes_per_token(path: Path) -> int:
    """Weight bytes a decode step reads in the *loaded* graph: the graph as ONNX Runtime leaves it after constant
    folding (float16-stored scales cast to float32, anything else built from constants), saved by ONNX Runtime, so
    a tensor counts at the size the kernels read, not the size the file stores; an embedding table only looked up
    by row does not count."""
    import tempfile

    import onnx
    import onnxruntime as ort

    from optpipe.runtime.ort_decoder import session_options

    with tempfile.TemporaryDirectory() as tmp:
        so = session_options(1, optimize="basic")
        so.optimized_model_filepath = str(Path(tmp) / "folded.onnx")
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", "folded.data")
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        m = onnx.load(str(Path(tmp) / "folded.onnx"), load_external_data=False)
    size = {t.name: int(np.prod(t.dims, dtype=np.int64)) * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(
        t.data_type)).itemsize for t in m.graph.initializer}
    read = {i for n in m.graph.node if n.op_type not in ("Gather", "GatherBlockQuantized") for i in n.input
            if i in size}
    return sum(size[i] for i in read)


def bytes_per_token(kind: str, arg: str, model) -> int | None:
    """Weight bytes one decode step reads: every weight but an embedding table only looked up by row."""
    if kind == "torch":
        emb = model.get_input_embeddings().weight
        head = model.get_output_embeddings().weight
        total = sum(p.numel() * p.element_size() for p in model.parameters())
        return total - (0 if head.data_ptr() == emb.data_ptr() else emb.numel() * emb.element_size())
    if kind == "onnx":
        return onnx_bytes_per_token(Path(arg) / "model.onnx")
    if kind == "llama":
        from gguf import GGUFReader

        tensors = {t.name: int(t.n_bytes) for t in GGUFReader(arg).tensors}
        return sum(tensors.values()) - (tensors.get("token_embd.weight", 0) if "output.weight" in tensors else 0)
    return None


def ratio_lines(results: dict, engines: list, a) -> list[str]:
    """optpipe's rows against one baseline row, round by round: each round ran every engine back to back, so the
    same round's ratio cancels what the machine did meanwhile; geometric mean and 95% t-interval over the rounds
    (the speed gate's statistic)."""
    from optpipe.gates.speed import ratio_interval

    top = f"t{max(a.threads)}"
    base = a.ratio_against
    if base is None:
        within = [name for name, kind, *_ in engines if kind == "llama"
                  and results[name].get("ppl_delta_pct", float("inf")) <= a.ratio_ppl]
        if not within:
            return []
        base = max(within, key=lambda n: results[n][top]["decode_tok_s"])
    ours = [name for name, kind, *_ in engines if kind in ("onnx", "torch-artifact", "ipex-artifact")]
    columns = [("decode tok/s", 1, False), ("tok/CPU-s", 2, False), ("prefill speed", 0, True)]
    lines = ["", f"Against **{base}**" + ("" if a.ratio_against else
                                           f" (the fastest llama.cpp row within {a.ratio_ppl:g}% perplexity)")
             + f": the same round's ratio, geometric mean [95% interval] over {a.rounds} rounds (> 1: optpipe "
             "faster; prefill speed = its prefill ms ÷ ours).", "",
             "| engine | " + " | ".join(f"{t}T {c}" for t in a.threads for c, *_ in columns) + " |",
             "|---|" + "---|" * (len(columns) * len(a.threads))]
    for name in ours:
        cells = []
        for t in a.threads:
            mine, theirs = results[name][f"t{t}"]["rounds"], results[base][f"t{t}"]["rounds"]
            for label, i, inverse in columns:
                ratios = [(y[i] / x[i]) if inverse else (x[i] / y[i]) for x, y in zip(mine, theirs)]
                g, lo, hi = ratio_interval(ratios)
                results[name][f"t{t}"][f"vs_base_{label.replace(' ', '_').replace('/', '_per_')}"] = [g, lo, hi]
                cells.append(f"{g:.2f} [{lo:.2f}, {hi:.2f}]")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    results["ratio_baseline"] = base
    return lines


REPORTS = {"report.html", "report.md"}  # for people, not loaded: about 5 MB of inlined plotly.js


def dir_size(p: Path) -> int:
    """Bytes a deployment ships to run the model: every file but the human-readable reports."""
    return p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*")
                                                    if f.is_file() and f.name not in REPORTS)


def child_rss(kind: str, arg: str, threads: int, prompt: list[int], new_tokens: int) -> float:
    """Peak RSS (MiB, VmHWM) of a fresh process that loads one engine and generates (ru_maxrss would carry
    over the parent's peak across fork/exec)."""
    code = ("import sys,json,resource,numpy as np;sys.path.insert(0,%r);sys.path.insert(0,%r);"
            "import bench_cpu as b;r=b.make_runner(%r,%r,%d);r.generate(np.array(%r),%d);"
            "print([int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')][0]/1024)") % (
        str(ROOT / "src"), str(ROOT / "scripts"), kind, arg, threads, prompt, new_tokens)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin:smollm2-135m", help="the reference checkpoint (HF directory) the "
                    "artifacts were built from; llama.cpp rows convert it (see --llama-cpp-src)")
    ap.add_argument("--llama-cpp-src", default=None, help="llama.cpp source directory (convert_hf_to_gguf.py)")
    ap.add_argument("--llama-cpp-bin", default=None, help="directory with llama-imatrix and llama-quantize: adds "
                    "Q4_K_M with an importance matrix")
    ap.add_argument("--int4", default="artifacts/smollm2-int4")
    ap.add_argument("--int8", default="artifacts/smollm2-int8")
    for fmt in ("bf16", "int8", "int4"):
        ap.add_argument(f"--torch-{fmt}", default=None, help=f"a cpu-torch {fmt} artifact (row left out when absent)")
    for fmt in ("fp32", "bf16", "int4"):
        ap.add_argument(f"--ipex-{fmt}", default=None, help=f"a cpu-ipex {fmt} artifact (only in the IPEX environment)")
    ap.add_argument("--onnx", nargs="*", default=[], metavar="LABEL=DIR", help="more cpu-onnx artifacts as rows")
    ap.add_argument("--section", default="bench_cpu", help="marker name of the table in the doc (bench_cpu_ipex: IPEX)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ratio-against", default=None, metavar="LABEL",
                    help="the row optpipe's rows are divided by, round by round (default: the fastest llama.cpp "
                         "row within --ratio-ppl of fp32 perplexity at the most threads)")
    ap.add_argument("--ratio-ppl", type=float, default=3.0, help="perplexity limit (%%) for the default baseline")
    ap.add_argument("--eval-tokens", type=int, default=EVALUATION_TOKENS, help="perplexity text length (tokens)")
    ap.add_argument("--no-llama-cpp", action="store_true")
    ap.add_argument("--speed-only", action="store_true", help="no perplexity (random-weight checkpoints: "
                    "scripts/make_synthetic_checkpoint.py --shape llama-1b); adds bandwidth efficiency columns")
    ap.add_argument("--doc", default=str(ROOT / "docs" / "benchmarks.md"))
    ap.add_argument("--json", default=str(ROOT / "docs" / "bench_cpu.json"))
    a = ap.parse_args()
    if a.model != "builtin:smollm2-135m" and not a.no_llama_cpp and not a.llama_cpp_src:
        ap.error("--model DIR needs --llama-cpp-src (llama.cpp source with convert_hf_to_gguf.py) for the "
                 "llama.cpp rows, or --no-llama-cpp")
    if a.llama_cpp_src and not (Path(a.llama_cpp_src) / "convert_hf_to_gguf.py").is_file():
        ap.error(f"--llama-cpp-src {a.llama_cpp_src}: no convert_hf_to_gguf.py there")

    model, tok, _ = models.load(ModelSpec(source=a.model))
    ev = data.token_windows(DataSpec(source="builtin:evaluation", window=512, max_tokens=a.eval_tokens), tok, None, "evaluation")
    prompt = np.concatenate(ev.windows)[: a.prompt_tokens]
    engines = [("PyTorch eager fp32", "torch", a.model, None)]
    for label, kind, path in ([("optpipe cpu-onnx INT8", "onnx", a.int8), ("optpipe cpu-onnx INT4", "onnx", a.int4)]
                              + [(f"optpipe cpu-onnx {x.split('=', 1)[0]}", "onnx", x.split("=", 1)[1]) for x in a.onnx]
                              + [(f"optpipe cpu-torch {f.upper()}", "torch-artifact", getattr(a, f"torch_{f}"))
                                 for f in ("bf16", "int8", "int4")]
                              + [(f"optpipe cpu-ipex {f.upper()}", "ipex-artifact", getattr(a, f"ipex_{f}"))
                                 for f in ("fp32", "bf16", "int4")]):
        if path:  # an empty --int4/--int8 leaves the ONNX rows out
            engines.append((label, kind, path, Path(path)))
    tmp = Path(tempfile.mkdtemp(prefix="optpipe-bench-"))  # GGUF conversions: up to 7 GB for a 1B model
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)  # every run left them behind (filled a disk)
    have_llama = not a.no_llama_cpp
    if have_llama:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            print("llama-cpp-python not installed (pip install -e '.[bench]'): llama.cpp rows skipped", file=sys.stderr)
            have_llama = False
    if have_llama:
        engines += [(label, "llama", str(path), path) for label, path in gguf_engines(a, tmp)]

    if a.ratio_against and a.ratio_against not in [name for name, *_ in engines]:
        ap.error(f"--ratio-against {a.ratio_against!r}: no such row (rows: {', '.join(n for n, *_ in engines)})")
    results = {name: {"size_mb": round(dir_size(p) / 1e6, 1) if p else None} for name, *_ , p in engines}
    # perplexity (1 thread build of each runner is enough; same token ids everywhere)
    ref_nll = None
    for name, kind, arg, _ in ([] if a.speed_only else engines):
        r = make_runner(kind, arg, a.threads[0], model)
        nll = n = 0.0
        for w in ev.windows:
            lp = log_softmax(r.logits(w))[:-1]
            nll -= lp[np.arange(w.size - 1), w[1:]].sum()
            n += w.size - 1
        results[name]["ppl"] = float(np.exp(nll / n))
        ref_nll = results[name]["ppl"] if ref_nll is None else ref_nll
        results[name]["ppl_delta_pct"] = round(100 * (results[name]["ppl"] / ref_nll - 1), 2)
        del r
    for threads in a.threads:
        runners = {name: make_runner(kind, arg, threads, model) for name, kind, arg, _ in engines}
        for r in runners.values():
            r.generate(prompt, 8)
        runs = {name: [] for name in runners}
        for _ in range(a.rounds):
            for name, r in runners.items():
                c0 = time.process_time()
                g = r.generate(prompt, a.new_tokens)
                cpu = time.process_time() - c0
                runs[name].append((g.prefill_seconds * 1e3, g.decode_tokens_per_second,
                                   (len(g.tokens) - 1) / max(cpu, 1e-9)))  # whole generate call
        for name, v in runs.items():
            results[name][f"t{threads}"] = {"prefill_ms": round(statistics.median(x[0] for x in v), 1),
                                            "decode_tok_s": round(statistics.median(x[1] for x in v), 1),
                                            "tok_per_cpu_s": round(statistics.median(x[2] for x in v), 1),
                                            "rounds": [[round(y, 3) for y in x] for x in v]}
        del runners
    bandwidth = read_bandwidth(max(a.threads))
    for name, kind, arg, _ in engines:
        results[name]["bytes_per_token"] = bytes_per_token(kind, arg, model)
    for name, kind, arg, _ in engines:
        results[name]["peak_rss_mib"] = round(child_rss(kind, arg, a.threads[0], [int(t) for t in prompt], 16))

    eager = {t: results["PyTorch eager fp32"][f"t{t}"]["decode_tok_s"] for t in a.threads}
    date = datetime.date.today().isoformat()
    env = hw.environment()
    lines = [f"<!-- {a.section}: generated by scripts/bench_cpu.py on {date} -->",
             f"Model: {a.model}. Machine: {env['cpu']}, {env['logical_cpus']} CPUs, ISA: "
             f"{', '.join(k for k, v in env['isa'].items() if v)}; onnxruntime {env['versions'].get('onnxruntime')}, "
             f"torch {env['versions'].get('torch')}. Date: {date}. Prompt {a.prompt_tokens} tokens, {a.new_tokens} new "
             f"tokens, greedy, batch 1, median of {a.rounds} interleaved rounds. "
             + ("No perplexity (--speed-only). " if a.speed_only else
                f"Perplexity on the built-in evaluation text ({ev.tokens} tokens, windows of 512, same token ids for "
                "every engine). ")
             + f"Memory read bandwidth {bandwidth:.1f} GB/s ({max(a.threads)} threads, 1 GiB summed); bandwidth "
             f"efficiency = weight bytes read per decoded token × {max(a.threads)}T decode tok/s ÷ that.", "",
             "| engine | ppl | Δppl vs fp32 | " + " | ".join(
                 f"{t}T prefill ms | {t}T decode tok/s | {t}T × eager | {t}T tok/CPU-s" for t in a.threads)
             + " | MB read / token | bandwidth eff. | peak RSS MiB | size MB |",
             "|---|---|---|" + "---|---|---|---|" * len(a.threads) + "---|---|---|---|"]
    for name, r in results.items():
        results[name]["bandwidth_efficiency"] = None
        cells = [f"{r['ppl']:.3f}", f"{r['ppl_delta_pct']:+.2f}%"] if "ppl" in r else ["–", "–"]
        for t in a.threads:
            x = r[f"t{t}"]
            cells += [str(x["prefill_ms"]), str(x["decode_tok_s"]), f"{x['decode_tok_s'] / eager[t]:.2f}",
                      str(x["tok_per_cpu_s"])]
        per_token = r["bytes_per_token"]
        if per_token:
            r["bandwidth_efficiency"] = per_token * r[f"t{max(a.threads)}"]["decode_tok_s"] / (bandwidth * 1e9)
        cells += [f"{per_token / 1e6:.0f}" if per_token else "–",
                  f"{100 * r['bandwidth_efficiency']:.0f}%" if per_token else "–"]
        cells += [str(r["peak_rss_mib"]), str(r["size_mb"]) if r["size_mb"] else "–"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ratio_lines(results, engines, a)
    table = "\n".join(lines)
    print(table)
    json_path = Path(a.json) if a.section == "bench_cpu" else Path(a.json).with_name(f"{a.section}.json")
    baseline = results.pop("ratio_baseline", None)
    json_path.write_text(json.dumps({"date": date, "environment": env, "read_bandwidth_gb_s": round(bandwidth, 2),
                                     "ratio_baseline": baseline, "results": results}, indent=2))
    write_section(Path(a.doc), a.section, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
