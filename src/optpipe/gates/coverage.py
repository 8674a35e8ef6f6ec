"""Coverage gate: what the artifact actually runs in low precision, read from the runner (its graph or modules),
not from what the passes said they did. A recipe whose quantize pass matched nothing (an `include` regex that
selects no layer) would otherwise pass every other gate: the float model is accurate, and a little faster."""
from __future__ import annotations

from . import GateResult

FLOAT = ("float", "bfloat16", "float16", "float32", "float64")


def measure(precisions: dict[str, str], storage: dict | None = None) -> dict:
    """What runs in which precision, and (`storage`, when the runner can read it) what it stores: bits per weight
    overall and per tensor class, bytes per precision (runtime/storage.py)."""
    by: dict[str, int] = {}
    for p in precisions.values():
        by[p] = by.get(p, 0) + 1
    n = len(precisions)
    q = sum(c for p, c in by.items() if not p.startswith(FLOAT))
    out = {"linears": n, "quantized": q, "quantized_fraction": round(q / n, 4) if n else None,
           "by_precision": dict(sorted(by.items())), "layers": dict(sorted(precisions.items()))}
    if storage is not None:
        out["bits_per_weight"] = storage["bits_per_weight"]
        out["bits_per_weight_layers"] = storage["bits_per_weight_layers"]
        out["storage"] = storage
    return out


def storage_of(runner) -> dict | None:
    read = getattr(runner, "storage", None)
    return read() if read is not None else None


def check(metrics: dict, gate, intent: list[tuple[str, int | None]]) -> GateResult:
    """`intent`: each quantize pass of the recipe (label, layers it quantized). Every one must have quantized a
    layer, and the artifact's quantized fraction must reach `min_quantized_fraction` when the recipe sets one."""
    thresholds = gate.model_dump()
    if metrics["linears"] == 0:  # the runtime cannot list its layers (e.g. IPEX's own fused modules)
        return GateResult("coverage", None, {**metrics, "reason": "the runner does not expose its layers"},
                          thresholds, [])
    failures = [f"{label} quantized no layer (its record's `skipped` says why: include/exclude, block size): the "
                "artifact runs it in float"
                for label, n in intent if not n]
    if intent and metrics["quantized"] == 0:
        failures.append(f"the recipe quantizes, but all {metrics['linears']} linears of the artifact are float")
    frac, want = metrics["quantized_fraction"], gate.min_quantized_fraction
    if want is not None and frac is not None and frac < want:
        failures.append(f"quantized fraction {frac:.3f} ({metrics['quantized']}/{metrics['linears']} linears) below "
                        f"min_quantized_fraction {want}")
    return GateResult("coverage", not failures, metrics, thresholds, failures)
