"""Speed gate: prefill latency and decode tok/s of the artifact vs fp32 PyTorch eager, in one process,
interleaved run by run, median of `repeats` (after one warm-up each), same prompt, same threads."""
from __future__ import annotations

import statistics
import time

import numpy as np

from ..progress import track
from . import GateResult


def _timed(runner, prompt, new_tokens):
    c0 = time.process_time()
    g = runner.generate(prompt, new_tokens, eos_token_id=None)
    return g, time.process_time() - c0


def measure(reference, candidate, prompt: np.ndarray, new_tokens: int, repeats: int) -> dict:
    runs = {"reference": [], "candidate": []}
    tokens = {}
    for name, r in (("reference", reference), ("candidate", candidate)):
        tokens[name] = r.generate(prompt, new_tokens).tokens  # warm-up (allocations, kernel selection)
    for _ in track(range(repeats), desc="speed gate", unit="round"):
        for name, r in (("reference", reference), ("candidate", candidate)):
            g, cpu = _timed(r, prompt, new_tokens)
            runs[name].append((g.prefill_seconds, g.decode_tokens_per_second, cpu))
    med = {k: (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v)) for k, v in runs.items()}
    agree = sum(a == b for a, b in zip(tokens["reference"], tokens["candidate"])) / max(len(tokens["reference"]), 1)
    return {
        "reference_prefill_ms": round(med["reference"][0] * 1e3, 2),
        "candidate_prefill_ms": round(med["candidate"][0] * 1e3, 2),
        "reference_decode_tok_s": round(med["reference"][1], 2),
        "candidate_decode_tok_s": round(med["candidate"][1], 2),
        "prefill_speedup": round(med["reference"][0] / med["candidate"][0], 3),
        "decode_speedup": round(med["candidate"][1] / med["reference"][1], 3),
        "greedy_token_agreement": round(agree, 3),
        "prompt_ids": [int(t) for t in prompt], "candidate_tokens": [int(t) for t in tokens["candidate"]],
        "prompt_tokens": int(prompt.size), "new_tokens": new_tokens, "repeats": repeats,
        "runs": {k: [[round(a * 1e3, 2), round(b, 2), round(c, 3)] for a, b, c in v] for k, v in runs.items()},
        "runs_columns": ["prefill_ms", "decode_tok_s", "cpu_seconds"],
    }


def check(metrics: dict, gate, threads: int) -> GateResult:
    thresholds = {**gate.model_dump(), "threads": threads}
    failures = []
    if gate.min_decode_speedup is not None and metrics["decode_speedup"] < gate.min_decode_speedup:
        failures.append(f"decode speedup {metrics['decode_speedup']:.2f}x below min_decode_speedup "
                        f"{gate.min_decode_speedup}x ({metrics['candidate_decode_tok_s']} vs "
                        f"{metrics['reference_decode_tok_s']} tok/s fp32 eager; short by "
                        f"{100 * (1 - metrics['decode_speedup'] / gate.min_decode_speedup):.0f}%)")
    if gate.min_prefill_speedup is not None and metrics["prefill_speedup"] < gate.min_prefill_speedup:
        failures.append(f"prefill speedup {metrics['prefill_speedup']:.2f}x below min_prefill_speedup "
                        f"{gate.min_prefill_speedup}x")
    return GateResult("speed", not failures, {**metrics, "threads": threads}, thresholds, failures)
