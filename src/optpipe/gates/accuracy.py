"""Accuracy gate: perplexity delta, mean KL of next-token distributions and top-1 agreement vs the fp32 reference."""
from __future__ import annotations

import numpy as np

from ..progress import track
from . import GateResult


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def compare(reference, candidate, windows: list[np.ndarray]) -> dict:
    nll_ref = nll_cand = kl = agree = 0.0
    n = 0
    for ids in track(windows, desc="accuracy gate", unit="window"):
        lr = _log_softmax(reference.logits(ids))[:-1]
        lc = _log_softmax(candidate.logits(ids))[:-1]
        if not np.isfinite(lc).all():
            return {"ppl_reference": None, "ppl_candidate": float("inf"), "ppl_delta_pct": float("inf"),
                    "mean_kl": float("inf"), "top1_agreement": 0.0, "tokens": n, "non_finite_logits": True}
        tgt = ids[1:]
        rows = np.arange(tgt.size)
        nll_ref -= lr[rows, tgt].sum()
        nll_cand -= lc[rows, tgt].sum()
        kl += (np.exp(lr) * (lr - lc)).sum()
        agree += (lr.argmax(-1) == lc.argmax(-1)).sum()
        n += tgt.size
    ppl_ref, ppl_cand = float(np.exp(nll_ref / n)), float(np.exp(nll_cand / n))
    return {"ppl_reference": round(ppl_ref, 4), "ppl_candidate": round(ppl_cand, 4),
            "ppl_delta_pct": round(100.0 * (ppl_cand / ppl_ref - 1.0), 4), "mean_kl": round(float(kl / n), 6),
            "top1_agreement": round(float(agree / n), 4), "tokens": n}


def check(metrics: dict, gate) -> GateResult:
    thresholds = gate.model_dump()
    failures = []
    if metrics.get("non_finite_logits"):
        failures.append("candidate produced NaN/inf logits")
    d = metrics["ppl_delta_pct"]
    if d > gate.max_ppl_delta_pct:
        failures.append(f"perplexity delta {d:+.2f}% exceeds max_ppl_delta_pct {gate.max_ppl_delta_pct}% "
                        f"(over by {d - gate.max_ppl_delta_pct:.2f} points)")
    if gate.max_mean_kl is not None and metrics["mean_kl"] > gate.max_mean_kl:
        failures.append(f"mean KL {metrics['mean_kl']:.4f} exceeds max_mean_kl {gate.max_mean_kl}")
    if gate.min_top1_agreement is not None and metrics["top1_agreement"] < gate.min_top1_agreement:
        failures.append(f"top-1 agreement {metrics['top1_agreement']:.3f} below min_top1_agreement {gate.min_top1_agreement}")
    return GateResult("accuracy", not failures, metrics, thresholds, failures)
