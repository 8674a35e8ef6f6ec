"""Accuracy gate: the candidate's next-token distributions against the fp32 reference's, token by token.

A verdict is a statistic, so the gate keeps the per-token figures and reports, beside each point value, how
uncertain it is:
- ΔPPL (percent) with a 95% interval from a paired block bootstrap: the evaluation tokens are cut into blocks of
  `BLOCK` consecutive positions (neighbouring tokens are correlated, blocks much less so), blocks are resampled
  with replacement `RESAMPLES` times, and each resample's ΔPPL is computed from the same positions for reference
  and candidate. The 2.5th/97.5th percentiles are the interval; the RNG is seeded, so a rerun gives the same one.
- KL(ref ‖ candidate) per position: mean, p99 and p99.9 (llama.cpp's `--kl-divergence` figures), the fraction of
  positions whose top-1 token is the same, and the RMS of Δp, the change in the probability of the actual next
  token (percentage points).
`max_ppl_delta_pct` applies to the statistic `decide_on` names: `upper_95` (default: a pass must hold at the
upper end of the interval, not by luck) or `point`.
"""
from __future__ import annotations

import numpy as np
import torch

from ..progress import track
from . import GateResult

BLOCK = 32
RESAMPLES = 2000
SEED = 0


def log_softmax(x: np.ndarray) -> np.ndarray:
    """Log-probabilities in float32 (per-token NLL within ~1e-6 relative of float64; the sums below are float64),
    by torch: over a 512 x 49k-vocabulary window it is 4x faster than numpy, and the gate's time is a budget."""
    return torch.log_softmax(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), -1).numpy()


def token_stats(lr: np.ndarray, lc: np.ndarray, targets: np.ndarray) -> dict[str, np.ndarray]:
    """Per position: NLL of the actual next token (reference, candidate), KL(ref ‖ cand), same top-1, Δp.
    `lr`, `lc`: [S, V] log-probabilities; `targets`: [S] next tokens."""
    lr, lc = torch.from_numpy(np.ascontiguousarray(lr)), torch.from_numpy(np.ascontiguousarray(lc))
    rows, t = torch.arange(len(targets)), torch.as_tensor(np.asarray(targets), dtype=torch.long)
    pr = lr.exp()
    picked_r, picked_c = lr[rows, t].double(), lc[rows, t].double()
    return {"nll_ref": (-picked_r).numpy(), "nll_cand": (-picked_c).numpy(),
            "kl": (pr * (lr - lc)).sum(-1, dtype=torch.float64).clamp_min(0.0).numpy(),
            "same_top1": (lr.argmax(-1) == lc.argmax(-1)).numpy(),
            "dp": (picked_c.exp() - picked_r.exp()).numpy()}


def ppl_delta_pct(nll_ref: np.ndarray, nll_cand: np.ndarray) -> float:
    return float(100.0 * np.expm1(nll_cand.mean() - nll_ref.mean()))


def bootstrap_interval(nll_ref: np.ndarray, nll_cand: np.ndarray, block: int = BLOCK, resamples: int = RESAMPLES,
                       seed: int = SEED) -> tuple[float, float]:
    """95% interval of ΔPPL (percent), paired block bootstrap over blocks of `block` consecutive positions."""
    n = nll_ref.size
    nb = max(1, n // block)
    # ΔPPL = exp(mean NLL_c - mean NLL_r) - 1 depends only on the per-position NLL difference
    diff_sums = np.add.reduceat(nll_cand[: nb * block] - nll_ref[: nb * block], np.arange(0, nb * block, block))
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, nb, size=(resamples, nb))
    d = diff_sums[picks].sum(1) / (nb * block)  # each resample's mean NLL difference
    lo, hi = np.percentile(100.0 * np.expm1(d), [2.5, 97.5])
    return float(lo), float(hi)


def summarize(stats: dict[str, np.ndarray]) -> dict:
    nr, nc, kl = stats["nll_ref"], stats["nll_cand"], stats["kl"]
    lo, hi = bootstrap_interval(nr, nc)
    return {"ppl_reference": round(float(np.exp(nr.mean())), 4), "ppl_candidate": round(float(np.exp(nc.mean())), 4),
            "ppl_delta_pct": round(ppl_delta_pct(nr, nc), 4),
            "ppl_delta_pct_ci95": [round(lo, 4), round(hi, 4)],
            "ppl_delta_ci_method": f"paired block bootstrap, blocks of {BLOCK} tokens, {RESAMPLES} resamples, seed {SEED}",
            "mean_kl": round(float(kl.mean()), 6), "kl_p99": round(float(np.percentile(kl, 99)), 6),
            "kl_p999": round(float(np.percentile(kl, 99.9)), 6),
            "top1_agreement": round(float(stats["same_top1"].mean()), 4),
            "rms_dp_pct": round(float(100.0 * np.sqrt(np.mean(stats["dp"] ** 2))), 4),
            "tokens": int(nr.size)}


def compare(reference, candidate, windows: list[np.ndarray]) -> dict:
    parts: dict[str, list[np.ndarray]] = {}
    for ids in track(windows, desc="accuracy gate", unit="window"):
        lr = log_softmax(reference.logits(ids))[:-1]
        lc = log_softmax(candidate.logits(ids))[:-1]
        if not np.isfinite(lc).all():
            n = sum(p.size for p in parts.get("kl", []))
            return {"ppl_reference": None, "ppl_candidate": float("inf"), "ppl_delta_pct": float("inf"),
                    "ppl_delta_pct_ci95": [float("inf"), float("inf")], "mean_kl": float("inf"),
                    "top1_agreement": 0.0, "tokens": n, "non_finite_logits": True}
        for k, v in token_stats(lr, lc, np.asarray(ids[1:])).items():
            parts.setdefault(k, []).append(v)
    return summarize({k: np.concatenate(v) for k, v in parts.items()})


def check(metrics: dict, gate) -> GateResult:
    thresholds = gate.model_dump()
    failures = []
    if metrics.get("non_finite_logits"):
        failures.append("candidate produced NaN/inf logits")
    point = metrics["ppl_delta_pct"]
    lo, hi = metrics["ppl_delta_pct_ci95"]
    decided = hi if gate.decide_on == "upper_95" else point
    metrics = {**metrics, "decided_on": gate.decide_on, "ppl_delta_pct_decided": round(decided, 4)}
    if decided > gate.max_ppl_delta_pct:
        what = "upper 95% bound" if gate.decide_on == "upper_95" else "point estimate"
        failures.append(f"perplexity delta {decided:+.2f}% ({what}) exceeds max_ppl_delta_pct {gate.max_ppl_delta_pct}% "
                        f"(point {point:+.2f}%, 95% interval {lo:+.2f} to {hi:+.2f}; over by "
                        f"{decided - gate.max_ppl_delta_pct:.2f} points)")
    if gate.max_mean_kl is not None and metrics["mean_kl"] > gate.max_mean_kl:
        failures.append(f"mean KL {metrics['mean_kl']:.4f} exceeds max_mean_kl {gate.max_mean_kl}")
    if gate.max_kl_p99 is not None and metrics.get("kl_p99", float("inf")) > gate.max_kl_p99:
        failures.append(f"KL p99 {metrics.get('kl_p99')} exceeds max_kl_p99 {gate.max_kl_p99}")
    if gate.min_top1_agreement is not None and metrics["top1_agreement"] < gate.min_top1_agreement:
        failures.append(f"top-1 agreement {metrics['top1_agreement']:.3f} below min_top1_agreement {gate.min_top1_agreement}")
    return GateResult("accuracy", not failures, metrics, thresholds, failures)
