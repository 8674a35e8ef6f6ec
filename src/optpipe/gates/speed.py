"""Speed gate: decode (and prefill) speed of the artifact vs the fp32 reference, in one process, same prompt,
same threads. A verdict is a statistic, so:

- rounds are paired (reference and candidate back to back, order alternating) and each round gives a ratio;
  the speedup is their geometric mean with a 95% t-interval on the log ratios;
- rounds are added (up to `max_repeats`) until the interval clears or misses the threshold; when the bound
  runs out first the gate says "inconclusive" (the build is refused, exit 3) instead of flipping a coin;
- a round during which other processes kept the CPUs busy is not a measurement of the artifact: it is
  discarded and recorded (`rounds_busy`); the load is also sampled for half a second before each round, so a
  machine busy throughout is declared inconclusive in seconds. CPU time is recorded beside wall time, but it does not remove load:
  OpenMP/ORT threads spin at barriers while a sibling is descheduled, so under a CPU hog the CPU-time ratio
  fell (1.27x to 0.84x for cpu-torch INT8 on an AVX2 EPYC) as much as the wall ratio (1.44x to 0.89x). What
  makes a verdict beside another job possible is fewer threads (the builder's `gate_threads`), not CPU time.
"""
from __future__ import annotations

import math
import statistics
import time

import numpy as np

from ..hw import BackgroundLoad, ratio_interval
from ..progress import bar as progress_bar
from . import GateResult

IDLE_WAIT_SECONDS = 2.0  # pause after a busy round before measuring again
PROBE_SECONDS = 0.5  # how long the machine's load is sampled before each round


def verdict(interval: tuple[float, float, float], threshold: float, decide_on: str) -> str:
    """'pass', 'fail' or 'open' (more rounds could still decide it)."""
    point, lo, hi = interval
    if decide_on == "point":
        return "pass" if point >= threshold else "fail"
    return "pass" if lo >= threshold else ("fail" if hi < threshold else "open")


def _run(runner, prompt, new_tokens) -> dict:
    g = runner.generate(prompt, new_tokens, eos_token_id=None)
    return {"prefill_s": g.prefill_seconds, "decode_s": g.decode_seconds, "steps": max(len(g.tokens) - 1, 1),
            "prefill_cpu_s": g.prefill_cpu_seconds, "decode_cpu_s": g.decode_cpu_seconds, "tokens": g.tokens}


def _ratios(rounds: list[dict], key: str) -> list[float]:
    return [r["reference"][key] / r["candidate"][key] for r in rounds
            if r["reference"][key] and r["candidate"][key]]


def at_threads(runner, threads: int):
    """`runner` at another thread count, or None when it cannot change it."""
    change = getattr(runner, "with_threads", None)
    if change is None:
        return None
    try:
        return change(threads)
    except ValueError:
        return None


def measure(reference, candidate, prompt: np.ndarray, new_tokens: int, gate, threads: int, cpus: int,
            sleep=time.sleep, adapt_threads: bool = False) -> dict:
    """Paired rounds until every threshold is decided (or `gate.max_repeats` rounds were tried). With
    `adapt_threads` (the thread count is the default, not the user's), a load that starts mid-gate is met at
    the CPUs it leaves free: both runners move to fewer threads, the rounds at the old count are set aside (a
    ratio at one count does not pair with one at another) and measuring starts again, so a verdict is reached
    whenever one CPU is free."""
    tokens = {n: r.generate(prompt, new_tokens).tokens for n, r in (("reference", reference), ("candidate", candidate))}
    thresholds = {"decode_s": gate.min_decode_speedup, "prefill_s": gate.min_prefill_speedup}
    rounds, busy, shrunk = [], [], []
    allowed = max(cpus - threads, 0) + gate.max_background_cpus  # others may use the CPUs the gate leaves idle

    def too_busy(others: float | None) -> bool:
        """Record and wait out a load above what the gate allows (None: the load cannot be measured here)."""
        if others is None or others <= allowed:
            return False
        busy.append(round(others, 2))
        return True

    def fewer_threads(others: float) -> int | None:
        """The thread count the load leaves room for, when it is fewer and both runners can move to it."""
        from ..hw import threads_beside_load

        n = threads_beside_load(threads, others, cpus)
        if not adapt_threads or n >= threads:
            return None
        return n

    attempts = 0
    with progress_bar(gate.max_repeats, "speed gate", "round") as bar:
        while attempts < gate.max_repeats:
            attempts += 1
            bar.update(1)
            probe = BackgroundLoad()  # a short look before measuring: a busy machine costs seconds, not rounds
            sleep(PROBE_SECONDS)
            others = probe.cpus()
            if not too_busy(others):
                load = BackgroundLoad()
                order = (("reference", reference), ("candidate", candidate))
                pair = {n: _run(r, prompt, new_tokens) for n, r in (order if attempts % 2 else order[::-1])}
                others = load.cpus()
                if not too_busy(others):
                    rounds.append({**pair, "background_cpus": others})
                    if len(rounds) >= gate.repeats and all(
                            verdict(ratio_interval(_ratios(rounds, k)), t, gate.decide_on) != "open"
                            for k, t in thresholds.items() if t is not None):
                        break
                    continue
            n = fewer_threads(others)
            moved = (at_threads(reference, n), at_threads(candidate, n)) if n is not None else (None, None)
            if None in moved:
                sleep(IDLE_WAIT_SECONDS)
                continue
            shrunk.append({"from": threads, "to": n, "background_cpus": round(others, 2),
                           "rounds_set_aside": len(rounds)})
            reference, candidate = moved
            threads, rounds, attempts = n, [], 0  # a fresh budget of rounds at the new count
            allowed = max(cpus - threads, 0) + gate.max_background_cpus
            bar.reset(total=gate.max_repeats)
    out = {"prompt_ids": [int(t) for t in prompt], "candidate_tokens": [int(t) for t in tokens["candidate"]],
           "prompt_tokens": int(prompt.size), "new_tokens": new_tokens, "threads": threads,
           "rounds": len(rounds), "rounds_busy": len(busy), "busy_background_cpus": busy,
           "allowed_background_cpus": round(allowed, 2), "decided_on": gate.decide_on}
    if shrunk:
        out["threads_lowered"] = shrunk
    if not rounds:
        return out
    for phase, key in (("decode", "decode_s"), ("prefill", "prefill_s")):
        point, lo, hi = ratio_interval(_ratios(rounds, key))
        out[f"{phase}_speedup"] = round(point, 3)
        out[f"{phase}_speedup_ci95"] = [round(lo, 3), round(hi, 3) if math.isfinite(hi) else None]
        cpu = _ratios(rounds, f"{phase}_cpu_s")
        out[f"{phase}_speedup_cpu_time"] = round(ratio_interval(cpu)[0], 3) if cpu else None
    for name in ("reference", "candidate"):
        out[f"{name}_decode_tok_s"] = round(statistics.median(r[name]["steps"] / r[name]["decode_s"] for r in rounds), 2)
        out[f"{name}_prefill_ms"] = round(statistics.median(r[name]["prefill_s"] for r in rounds) * 1e3, 2)
    out["runs_columns"] = ["prefill_ms", "decode_tok_s", "prefill_cpu_s", "decode_cpu_s"]
    out["runs"] = {n: [[round(r[n]["prefill_s"] * 1e3, 2), round(r[n]["steps"] / r[n]["decode_s"], 2),
                        _r3(r[n]["prefill_cpu_s"]), _r3(r[n]["decode_cpu_s"])] for r in rounds]
                   for n in ("reference", "candidate")}
    return out


def _r3(x):
    return None if x is None else round(x, 3)


def check(metrics: dict, gate, threads: int) -> GateResult:
    thresholds = {**gate.model_dump(), "threads": metrics.get("threads", threads)}  # as measured (maybe lowered)
    failures, inconclusive = [], False
    if not metrics.get("rounds"):
        return GateResult("speed", False, metrics, thresholds, [
            f"inconclusive: all {metrics['rounds_busy']} rounds ran while other processes kept "
            f"{max(metrics['busy_background_cpus'])} CPU(s) busy (allowed {metrics['allowed_background_cpus']}): "
            "rerun on a quiet machine, or lower gates.speed.threads"], inconclusive=True)
    for phase, field in (("decode", "min_decode_speedup"), ("prefill", "min_prefill_speedup")):
        threshold = getattr(gate, field)
        if threshold is None:
            continue
        point, (lo, hi) = metrics[f"{phase}_speedup"], metrics[f"{phase}_speedup_ci95"]
        hi = math.inf if hi is None else hi
        said = (f"{phase} speedup {point:.2f}x (95% interval {lo:.2f}-{hi:.2f}x over {metrics['rounds']} rounds, "
                f"{metrics['candidate_decode_tok_s'] if phase == 'decode' else metrics['candidate_prefill_ms']} vs "
                f"{metrics['reference_decode_tok_s'] if phase == 'decode' else metrics['reference_prefill_ms']} "
                f"{'tok/s' if phase == 'decode' else 'ms'} reference)")
        v = verdict((point, lo, hi), threshold, gate.decide_on)
        if v == "fail":
            failures.append(f"{said} below {field} {threshold}x (decided on {gate.decide_on}; short by "
                            f"{100 * (1 - (point if gate.decide_on == 'point' else hi) / threshold):.0f}%)")
        elif v == "open":
            inconclusive = True
            failures.append(f"inconclusive: {said} straddles {field} {threshold}x after {gate.max_repeats} rounds "
                            f"({metrics['rounds_busy']} discarded as busy): rerun on a quiet machine, raise "
                            "gates.speed.max_repeats, or decide_on: point")
    return GateResult("speed", not failures, metrics, thresholds, failures, inconclusive=inconclusive)
