"""Generation gate: what a user sees, not only next-token statistics. Greedy continuations of prompts cut from the
evaluation text, candidate vs reference:

- first divergence: the position where the two continuations first differ (mean over prompts; greedy agreement
  after that point compares unrelated text, which is why it is not reported);
- teacher-forced agreement: the candidate fed the reference's continuation, how often its top-1 is the
  reference's next token;
- degenerate output: a repetition loop (fraction of repeated 4-grams above the reference's) or a total length to
  EOS far from the reference's (MLPerf bounds generation length against the reference the same way).
"""
from __future__ import annotations

import numpy as np

from ..progress import track
from . import GateResult


def prompts(windows: list[np.ndarray], n: int, length: int) -> list[np.ndarray]:
    """`n` prompts of `length` tokens spread evenly over the evaluation text."""
    ids = np.concatenate(windows)
    if ids.size <= length or n == 0:
        return [ids[:length]][:n]
    starts = np.linspace(0, ids.size - length - 1, n).astype(int)
    return [ids[s:s + length] for s in starts]


def repetition(tokens: list[int], n: int = 4) -> float:
    """Fraction of the n-grams of `tokens` that already occurred earlier in it (0: none; near 1: a loop)."""
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def first_divergence(a: list[int], b: list[int]) -> int:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


def measure(reference, candidate, prompt_list: list[np.ndarray], new_tokens: int, eos_token_id: int | None) -> dict:
    rows = []
    for p in track(prompt_list, desc="generation gate", unit="prompt"):
        ref = reference.generate(p, new_tokens, eos_token_id=eos_token_id).tokens
        cand = candidate.generate(p, new_tokens, eos_token_id=eos_token_id).tokens
        # teacher forcing: one prefill over prompt + the reference's continuation
        logits = candidate.logits(np.concatenate([p, np.asarray(ref[:-1], dtype=np.int64)]))[p.size - 1:]
        agree = float(np.mean(np.argmax(logits, axis=-1) == np.asarray(ref))) if len(ref) else 1.0
        rows.append({"first_divergence": first_divergence(ref, cand), "teacher_forced_agreement": agree,
                     "repetition_reference": repetition(ref), "repetition_candidate": repetition(cand),
                     "length_reference": len(ref), "length_candidate": len(cand)})
    if not rows:
        return {"prompts": 0}
    mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
    return {"prompts": len(rows), "new_tokens": new_tokens,
            "mean_first_divergence": round(mean["first_divergence"], 2),
            "first_divergence": [r["first_divergence"] for r in rows],
            "teacher_forced_agreement": round(mean["teacher_forced_agreement"], 4),
            "repetition_reference": round(mean["repetition_reference"], 4),
            "repetition_candidate": round(mean["repetition_candidate"], 4),
            "length_reference": sum(r["length_reference"] for r in rows),
            "length_candidate": sum(r["length_candidate"] for r in rows)}


def check(metrics: dict, gate) -> GateResult:
    thresholds = gate.model_dump()
    if not metrics.get("prompts"):
        return GateResult("generation", None, {**metrics, "reason": "gates.generation.prompts is 0"}, thresholds)
    failures = []
    m = metrics
    if gate.min_mean_first_divergence is not None and m["mean_first_divergence"] < gate.min_mean_first_divergence:
        failures.append(f"mean first divergence {m['mean_first_divergence']} tokens below min_mean_first_divergence "
                        f"{gate.min_mean_first_divergence} (per prompt: {m['first_divergence']})")
    if gate.min_teacher_forced_agreement is not None and m["teacher_forced_agreement"] < gate.min_teacher_forced_agreement:
        failures.append(f"teacher-forced agreement {m['teacher_forced_agreement']:.3f} below "
                        f"min_teacher_forced_agreement {gate.min_teacher_forced_agreement}")
    rise = m["repetition_candidate"] - m["repetition_reference"]
    if gate.max_repetition_increase is not None and rise > gate.max_repetition_increase:
        failures.append(f"degenerate output: repeated 4-grams {m['repetition_candidate']:.2f} vs "
                        f"{m['repetition_reference']:.2f} for the reference (rise {rise:.2f} > max_repetition_increase "
                        f"{gate.max_repetition_increase})")
    change = abs(m["length_candidate"] / max(m["length_reference"], 1) - 1)
    if gate.max_length_change is not None and change > gate.max_length_change:
        failures.append(f"degenerate output: generated {m['length_candidate']} tokens vs {m['length_reference']} for "
                        f"the reference (change {change:.0%} > max_length_change {gate.max_length_change:.0%})")
    return GateResult("generation", not failures, metrics, thresholds, failures)
