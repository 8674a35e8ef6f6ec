"""`optpipe tune`: build every candidate of a recipe's search space, hold each to the recipe's own gates, and emit
the best one that passes every gate (or nothing, exit 3, with the nearest misses).

Per candidate, cheapest first: the build (or the cached one), a screen on the first `search.screen_windows`
evaluation windows (a candidate whose ΔPPL is over the gate even at the low end of its 95% interval is dropped),
then the full gates of `build` (accuracy, coverage, generation; the paired speed gate only when those passed).
Every build and every measurement is stored by content hash (tune/cache.py), so a rerun, an extended space or
another worker reuses them. The fp32 reference's logits are computed once per run for all candidates.
"""
from __future__ import annotations

import copy
import datetime as _dt
import json
import math
import platform
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import artifact, builder, data, htmlreport, hw, models, references
from ..errors import BuildError, GateFailed, RecipeError
from ..gates import GateResult, accuracy
from ..gates.speed import ratio_interval
from ..pipeline import ModelState, PassContext, run_passes
from ..targets import get_target
from . import cache
from .prefix import Prefixes
from .space import Candidate, candidates

QUICK_SPEED_ROUNDS = 2
RUNOFF_MAX = 4  # finalists measured head to head
RUNOFF_ROUNDS = 8


@dataclass
class TuneResult:
    passed: bool
    artifact_path: Path | None
    manifest: dict
    digest: str | None
    trace: list[dict] = field(default_factory=list)
    report_path: Path | None = None


class MemoReference:
    """The accuracy reference with its logits and greedy continuations kept: every candidate is scored on the same
    windows, so the fp32 model runs on each window once per tune instead of once per candidate."""

    def __init__(self, runner, budget_bytes: int = 3 << 30):
        self.runner, self.budget, self.used = runner, budget_bytes, 0
        self._logits: dict = {}
        self._generated: dict = {}

    def logits(self, ids):
        key = (bytes(memoryview(ids)), ids.shape)
        if key in self._logits:
            return self._logits[key]
        out = self.runner.logits(ids)
        if self.used + out.nbytes <= self.budget:
            self._logits[key], self.used = out, self.used + out.nbytes
        return out

    def generate(self, prompt, new_tokens, **kw):
        key = (bytes(memoryview(prompt)), new_tokens, json.dumps(kw, sort_keys=True, default=str))
        if key not in self._generated:
            self._generated[key] = self.runner.generate(prompt, new_tokens, **kw)
        return self._generated[key]

    def __getattr__(self, name):
        return getattr(self.runner, name)


def quick_decode_tok_s(runner, prompt, new_tokens: int) -> float:
    """Unpaired decode speed (median of two runs), measured for every candidate alike: the report's x axis and the
    Pareto set, not a verdict (the paired speed gate decides)."""
    rates = []
    for _ in range(QUICK_SPEED_ROUNDS):
        rates.append(runner.generate(prompt, new_tokens, eos_token_id=None).decode_tokens_per_second)
    return round(statistics.median(rates), 2)


def screen_verdict(metrics: dict, gate) -> str | None:
    """Why the screen drops the candidate (None: it goes on to the full gates)."""
    lo = metrics["ppl_delta_pct_ci95"][0]
    if metrics.get("non_finite_logits"):
        return "NaN/inf logits on the screening windows"
    if lo > gate.max_ppl_delta_pct:
        return (f"screen: ΔPPL {metrics['ppl_delta_pct']:+.2f}% on {metrics['tokens']} tokens, 95% interval from "
                f"{lo:+.2f}%: over max_ppl_delta_pct {gate.max_ppl_delta_pct}% even at its low end")
    return None


def miss_distance(entry: dict) -> float:
    """How far a refused candidate is from passing: the sum, over the thresholds it failed, of the shortfall relative
    to the threshold (a gate that failed without a figure counts 1)."""
    if entry["status"] == "failed":  # did not build: farther than anything measured
        return 1e6
    acc, spd = entry.get("ppl_delta_pct_decided"), entry.get("decode_speedup_lower_95")
    gates, total = entry.get("gate_status") or {}, 0.0
    limit = max(entry["max_ppl_delta_pct"], 1e-6)
    if entry["status"] == "screened":
        return 10.0 + max(0.0, (entry["screen_ppl_delta_lower_95"] - limit) / limit)
    if gates.get("accuracy") == "failed":
        total += max(0.0, (acc - limit) / limit) if acc is not None else 1.0
    if gates.get("speed") in ("failed", "inconclusive"):
        need = entry.get("min_decode_speedup") or 1.0
        total += max(0.0, (need - spd) / need) if spd is not None else 1.0
    total += sum(1.0 for g in ("coverage", "generation", "tasks") if gates.get(g) == "failed")
    return total


class Tuner:
    def __init__(self, recipe, *, cache_dir=None, threads=None, allow_plugins=None, log=print, emit=None):
        """`emit`: (output, overwrite) of a tune that writes an artifact: the path is checked here, before the
        sensitivity measurement or anything else loads the model (a worker emits nothing)."""
        self.recipe, self.passes, self.facts = builder.check(recipe, allow_plugins)
        self.source = self.recipe.source_path or "<recipe>"
        self.out = builder.output_path(emit[0], self.recipe, self.source, emit[1]) if emit else None
        self.allow_plugins = allow_plugins
        self.log = log
        self.target = get_target(self.recipe.target)
        builder.check_speed_measurable(self.recipe, self.target, self.source)
        self.candidates = candidates(self.recipe, allow_plugins)  # checks the space before anything loads
        self.store = cache.Store(cache_dir or cache.default_dir())
        self.threads, self.fixed_threads = builder.thread_setting(threads, self.recipe, self.source)
        self.resolved = models.resolve(self.recipe.model.source, self.recipe.model.gguf_file)
        self.machine = hw.environment()
        self._loaded = None  # (model, tokenizer, checkpoint), on first need
        self._refs = None
        self._windows = None
        self._calibration = None
        self.sensitivity_rows = None
        if self.recipe.search.sensitivity is not None:
            self.sensitivity_rows = self.sensitivity()
            self.candidates = candidates(self.recipe, allow_plugins, [r["pattern"] for r in self.sensitivity_rows])
        for c in self.candidates:  # options against the model (a block size the width does not divide, ...)
            if c.recipe is not None:
                try:
                    builder.check(c.recipe, allow_plugins)
                except RecipeError as e:
                    c.invalid, c.recipe = str(e).removeprefix(self.source + ": "), None
        self.prefixes = Prefixes([c.recipe for c in self.candidates if c.recipe is not None],
                                 enabled=not self.recipe.model.streaming)

    def sensitivity(self) -> list[dict]:
        """The (layer, projection) groups of `search.sensitivity`'s pass, most sensitive first (tune/sensitivity.py),
        measured once per model, scheme and calibration text, and kept in the cache."""
        spec = self.recipe.search.sensitivity
        config = self.recipe._passes[spec.pass_index].config
        scheme = {"bits": config.bits, "block_size": spec.block_size or config.block_size,
                  "zero_point": spec.zero_point or config.zero_point, "scale_dtype": config.scale_dtype}
        calib = self.recipe.calibration.model_copy(update={"max_tokens": spec.tokens})
        key = cache.content_key({"sensitivity": scheme, "calibration": calib.model_dump(mode="json"),
                                 "code": cache.code_fingerprint(), "model": self.recipe.model.model_dump(mode="json"),
                                 "model_files": cache.model_fingerprint(self.resolved.location)})
        found = self.store.evaluation(key)
        if found is not None:
            return found["rows"]
        if self.recipe.model.streaming:
            raise RecipeError(f"{self.source}: search.sensitivity: needs the model in memory (model.streaming)")
        from .sensitivity import measure

        model, tokenizer, _ = self.loaded()
        windows = data.token_windows(calib, tokenizer, self.recipe.base_dir, "calibration").windows
        self.log(f"sensitivity: each (layer, projection) alone at {scheme}, {spec.tokens} calibration tokens")
        rows = measure(model, windows, clip=config.clip_search, log=self.log, **scheme)
        self.store.save_evaluation(key, {"scheme": scheme, "tokens": spec.tokens, "rows": rows})
        return rows

    # -- what is loaded once, on first need ------------------------------------------------------------------------
    def loaded(self):
        if self._loaded is None:
            self._loaded = models.open_model(self.recipe.model, self.log)[:3]
        return self._loaded

    def windows(self):
        if self._windows is None:
            self._windows = data.token_windows(self.recipe.evaluation, self.loaded()[1], self.recipe.base_dir,
                                               "evaluation")
        return self._windows

    def calibration(self):
        if self._calibration is None:
            self._calibration = data.token_windows(self.recipe.calibration, self.loaded()[1], self.recipe.base_dir,
                                                   "calibration")
        return self._calibration.windows

    def refs(self, gthreads: int):
        if self._refs is None:
            model, tokenizer, checkpoint = self.loaded()
            references.check_tokenizers(self.recipe, tokenizer, self.source)
            self._refs = references.open_references(self.recipe, model=model, checkpoint=checkpoint,
                                                    tokenizer=tokenizer, threads=gthreads,
                                                    workdir=self.store.root, log=self.log)
            self._refs.accuracy = MemoReference(self._refs.accuracy)
        return self._refs

    def close(self):
        if self._refs is not None:
            self._refs.close()

    # -- one candidate -----------------------------------------------------------------------------------------------
    def build(self, cand: Candidate) -> tuple[str, Path, dict, bool]:
        """The candidate's artifact files in the store: (key, directory, build record, taken from the cache)."""
        key = cache.build_key(cand.recipe, self.resolved.location)
        found = self.store.build_dir(key)
        if found is not None:
            return key, found, self.store.build_info(key), True
        model, tokenizer, checkpoint = self.loaded()
        passes = cand.recipe._passes
        done, state, records = self.prefixes.start(cand.recipe)
        if state is None:
            mutates = any(p.input_stage == "torch" and p.name != "export" for p in passes)
            state = ModelState("torch", torch_model=copy.deepcopy(model) if mutates and model is not None else model,
                               tokenizer=tokenizer, checkpoint=checkpoint)
        if done:
            self.log(f"    passes[0..{done - 1}] from a candidate built before (same passes, same options)")
        tmp = self.store.new_build_dir(key)
        scratch = tmp.parent / (tmp.name + "-scratch")
        t0 = time.perf_counter()
        try:
            ctx = PassContext(calibration=self.calibration, threads=self.threads, workdir=self.store.root,
                              seed=cand.recipe.seed, scratch=scratch)
            records += run_passes(passes[done:], state, ctx, log=self.log, first=done, total=len(passes),
                                  after=lambda i, s, r: self.prefixes.after_pass(cand.recipe, i, s, records + r))
            t_save = time.perf_counter()
            saved = self.target.save(state, tmp)
            info = {"passes": [r.to_json() for r in records], "saved": saved,
                    "save_seconds": round(time.perf_counter() - t_save, 1),
                    "seconds": round(time.perf_counter() - t0, 1), "passes_reused": done,
                    "calibration": self._calibration.describe() if self._calibration is not None else None,
                    "model_config": artifact.model_config_record(
                        model.config if model is not None else checkpoint.config),
                    "built_utc": _now(), "node": platform.node()}
            return key, self.store.commit_build(key, tmp, info), info, False
        except BaseException:
            self.store.discard(tmp)
            raise
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def quality(self, cand: Candidate, key: str, directory: Path, info: dict) -> tuple[dict, bool]:
        """The screen, then the output-comparing gates (coverage, accuracy, generation, tasks): cached by build,
        gates and evaluation data; the same work on any node."""
        qkey = cache.quality_key(key, cand.recipe, self.recipe.search.screen_windows)
        found = self.store.evaluation(qkey)
        if found is not None:
            return found, True
        windows = self.windows()
        refs = self.refs(self.threads)
        runner = self.target.load(directory, self.threads)
        screen = accuracy.compare(refs.accuracy, runner, windows.windows[:self.recipe.search.screen_windows])
        record = {"screen": {k: screen.get(k) for k in ("ppl_delta_pct", "ppl_delta_pct_ci95", "mean_kl", "tokens",
                                                        "non_finite_logits")},
                  "labels": refs.labels, "evaluation": windows.describe(), "measured_utc": _now(),
                  "node": platform.node(), "isa": hw.environment()["isa"], "threads": self.threads}
        dropped = screen_verdict(screen, cand.recipe.gates.accuracy)
        if dropped:
            self.log(f"    {dropped}")
            record.update(status="screened", reason=dropped)
        else:
            gates = builder.quality_gates(cand.recipe, refs, runner, windows, self.log,
                                          builder.quantize_intent(info["passes"]), self.loaded()[1])
            record.update(status="passed" if all(g.passed is not False for g in gates.values()) else "rejected",
                          gates={k: g.to_json() for k, g in gates.items()})
        self.store.save_evaluation(qkey, record)
        return record, False

    def speed(self, cand: Candidate, key: str, directory: Path, info: dict, quality: dict) -> tuple[dict, bool]:
        """The paired speed gate for a candidate whose other gates passed, else a quick unpaired decode figure (for
        the report): measured here, one candidate at a time, the reference in this process."""
        gthreads, load_note = builder.gate_threads(self.threads, self.fixed_threads, self.log)
        full = quality["status"] == "passed"
        skey = cache.speed_key(key, cand.recipe, self.machine, gthreads, full)
        found = self.store.evaluation(skey)
        if found is not None:
            return found, True
        windows = self.windows()
        runner = self.target.load(directory, gthreads)
        record = {"measured_utc": _now(), "node": platform.node(), "threads": gthreads}
        prompt = builder.speed_prompt(windows.windows, cand.recipe.gates.speed.prompt_tokens)
        # the same quick figure for every candidate: the report's x axis compares like with like
        record["quick_decode_tok_s"] = quick_decode_tok_s(runner, prompt, cand.recipe.gates.speed.new_tokens)
        if full:
            spd = builder.speed_gate(cand.recipe, self.target, self.refs(gthreads), runner, windows, gthreads,
                                     self.log, info["saved"])
            spd.metrics.update(load_note)
            record["gate"] = spd.to_json()
        self.store.save_evaluation(skey, record)
        return record, False

    def runoff(self, finals: list[tuple], objective: str) -> dict:
        """The finalists' speed head to head, here, in one run (cached by their builds, the machine and threads)."""
        gthreads, _ = builder.gate_threads(self.threads, self.fixed_threads, self.log)
        g = self.recipe.gates.speed
        phase = "prefill" if objective == "prefill_ms" else "decode"
        rkey = cache.content_key({"runoff": sorted(f[1] for f in finals), "phase": phase, "rounds": RUNOFF_ROUNDS,
                                  "speed": g.model_dump(mode="json"), "threads": gthreads,
                                  "machine": cache.machine_kind(self.machine)})
        found = self.store.evaluation(rkey)
        if found is not None:
            return {**found, "relative": {int(k): v for k, v in found["relative"].items()}}
        numbers = [f[0].number for f in finals]
        self.log(f"runoff: candidates {', '.join(map(str, numbers))} head to head, {RUNOFF_ROUNDS} interleaved "
                 f"rounds of {g.new_tokens} tokens ({phase}), {gthreads} thread(s)")
        runners = {f[0].number: self.target.load(f[2], gthreads) for f in finals}
        prompt = builder.speed_prompt(self.windows().windows, g.prompt_tokens)
        rates = runoff_rounds(runners, prompt, g.new_tokens, RUNOFF_ROUNDS, phase)
        record = {"phase": phase, "rounds": RUNOFF_ROUNDS, "threads": gthreads, "node": platform.node(),
                  "measured_utc": _now(), "rates": {n: [round(x, 3) for x in xs] for n, xs in rates.items()},
                  "relative": runoff_intervals(rates)}
        self.store.save_evaluation(rkey, record)
        for n, (point, lo, hi) in record["relative"].items():
            self.log(f"    candidate {n}: x{point} of the leader [{lo}, {hi}]")
        return record

    def evaluate(self, cand: Candidate, key: str, directory: Path, info: dict) -> tuple[dict, dict]:
        """Everything measured of one candidate, as one record: status (screened | rejected | passed), the screen,
        the verdict of every gate (speed skipped after another gate failed), where and when it was measured."""
        quality, q_cached = self.quality(cand, key, directory, info)
        spd, s_cached = self.speed(cand, key, directory, info, quality)
        record = {**quality, "speed_measured": {k: spd[k] for k in ("measured_utc", "node", "threads")}}
        if "quick_decode_tok_s" in spd:
            record["quick_decode_tok_s"] = spd["quick_decode_tok_s"]
        if quality["status"] != "screened":
            gates = {k: GateResult.from_json(k, v) for k, v in quality["gates"].items()}
            speed_result = (GateResult.from_json("speed", spd["gate"]) if "gate" in spd else
                            GateResult("speed", None, {"reason": "skipped: another gate failed"},
                                       cand.recipe.gates.speed.model_dump(), []))
            verdict = artifact.gate_record({"accuracy": gates.pop("accuracy"), "speed": speed_result, **gates})
            record.update(status=verdict["status"], verdict=verdict)
        return record, {"quality": q_cached, "speed": s_cached}


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def trace_entry(cand: Candidate, key: str | None, info: dict | None, record: dict | None, cached: dict,
                seconds: float, failed: str | None = None) -> dict:
    """One candidate in the search trace (manifest and report): its settings and the figures it was judged on."""
    e = {"candidate": cand.number, "settings": cand.settings, "seconds": round(seconds, 1), "cached": cached}
    if cand.recipe is None:
        return {**e, "status": "invalid", "reason": cand.invalid}
    if failed is not None:
        return {**e, "status": "failed", "reason": failed}
    acc_gate = cand.recipe.gates.accuracy
    e.update(build_key=key, max_ppl_delta_pct=acc_gate.max_ppl_delta_pct,
             min_decode_speedup=cand.recipe.gates.speed.min_decode_speedup,
             artifact_bytes=sum(f.stat().st_size for f in Path(info["directory"]).iterdir()
                                if f.is_file() and f.name != "build.json"),
             build_seconds=info.get("seconds"), passes_reused=info.get("passes_reused", 0),
             built_on=info.get("node"), measured_on={"quality": record["node"],
                                                     "speed": record["speed_measured"]["node"]})
    e["status"] = record["status"]
    scr = record["screen"]
    e["screen_ppl_delta_pct"], e["screen_ppl_delta_lower_95"] = scr["ppl_delta_pct"], scr["ppl_delta_pct_ci95"][0]
    e["screen_tokens"] = scr["tokens"]
    if record["status"] == "screened":
        e.update(ppl_delta_pct=scr["ppl_delta_pct"], ppl_delta_pct_ci95=scr["ppl_delta_pct_ci95"],
                 reason=record["reason"])
    else:
        g = record["verdict"]["gates"]
        e.update(ppl_delta_pct=g["accuracy"]["ppl_delta_pct"], ppl_delta_pct_ci95=g["accuracy"]["ppl_delta_pct_ci95"],
                 ppl_delta_pct_decided=g["accuracy"].get("ppl_delta_pct_decided"), mean_kl=g["accuracy"]["mean_kl"],
                 gate_status={k: v["status"] for k, v in g.items()}, failures=record["verdict"]["failures"])
        spd = g["speed"]
        if spd.get("decode_speedup") is not None:
            e.update(decode_speedup=spd["decode_speedup"], decode_speedup_ci95=spd["decode_speedup_ci95"],
                     decode_speedup_lower_95=spd["decode_speedup_ci95"][0],
                     prefill_speedup=spd.get("prefill_speedup"), prefill_speedup_ci95=spd.get("prefill_speedup_ci95"),
                     gate_decode_tok_s=spd.get("candidate_decode_tok_s"), prefill_ms=spd.get("candidate_prefill_ms"),
                     reference_decode_tok_s=spd.get("reference_decode_tok_s"))
    e["decode_tok_s"] = record.get("quick_decode_tok_s")
    return e


# objective -> (point, 95% interval) of a passed candidate; bigger is better
OBJECTIVES = {"decode_tok_s": lambda e: (e["decode_speedup"], e["decode_speedup_ci95"]),
              "prefill_ms": lambda e: (e.get("prefill_speedup") or 0.0, e.get("prefill_speedup_ci95")),
              "size": lambda e: (-e["artifact_bytes"], None)}


def finalists(passed: list[dict], objective: str, most: int = RUNOFF_MAX) -> list[dict]:
    """Candidates the speed gate's figures cannot tell from the best: their 95% interval reaches its lower end.
    (The gate stops once its own threshold is decided, so its intervals are wide; they bound who is in the
    runoff, not who wins.)"""
    key = OBJECTIVES[objective]
    ranked = sorted(passed, key=lambda e: -key(e)[0])
    lo = (key(ranked[0])[1] or [None])[0]
    if lo is None:
        return ranked[:1]
    return [e for e in ranked if key(e)[1] and key(e)[1][1] is not None and key(e)[1][1] >= lo][:most]


def choose(passed: list[dict], objective: str, runoff: dict | None = None) -> tuple[dict, list[int]]:
    """The winner among candidates that passed every gate, and those tied with it on the objective. With a
    `runoff` (finalists measured head to head: candidate -> [point, low, high] of its speed over the leader's),
    a finalist is tied when its interval reaches 1; otherwise the objective's point decides. Among tied
    candidates the most accurate (lowest decided ΔPPL), then the smallest, wins: a choice a rerun repeats."""
    key = OBJECTIVES[objective]
    if runoff:
        tied = [e for e in passed if e["candidate"] in runoff and runoff[e["candidate"]][2] >= 1.0]
    else:
        tied = [max(passed, key=lambda e: key(e)[0])]
    winner = min(tied, key=lambda e: (e.get("ppl_delta_pct_decided", e["ppl_delta_pct"]), e["artifact_bytes"]))
    return winner, sorted(e["candidate"] for e in tied)


def runoff_rounds(runners: dict, prompt, new_tokens: int, rounds: int, phase: str) -> dict[int, list[float]]:
    """Interleaved rounds, each finalist once per round in a rotating order: candidate -> its times (decode
    tokens/s, or 1/prefill seconds), so per-round ratios compare runs made moments apart."""
    out: dict[int, list[float]] = {n: [] for n in runners}
    order = list(runners)
    for r in range(rounds):
        for n in order[r % len(order):] + order[:r % len(order)]:
            g = runners[n].generate(prompt, new_tokens, eos_token_id=None)
            out[n].append(g.decode_tokens_per_second if phase == "decode" else 1.0 / max(g.prefill_seconds, 1e-9))
    return out


def runoff_intervals(rates: dict[int, list[float]]) -> dict[int, list[float]]:
    """Each finalist's speed over the leader's (the finalist with the highest geometric mean), per round, as
    [point, low, high] of the 95% interval."""
    leader = max(rates, key=lambda n: statistics.geometric_mean(rates[n]))
    out = {}
    for n, xs in rates.items():
        point, lo, hi = ratio_interval([x / y for x, y in zip(xs, rates[leader])]) if n != leader else (1.0, 1.0, 1.0)
        out[n] = [round(point, 4), round(lo, 4), round(hi, 4) if math.isfinite(hi) else 1e9]
    return out


def pareto(entries: list[dict]) -> list[int]:
    """Candidates no other beats on all of ΔPPL (lower), decode speed (higher) and size (smaller)."""
    pts = [e for e in entries if e.get("ppl_delta_pct") is not None and e.get("decode_tok_s") is not None]

    def dominates(a, b):
        ge = (a["ppl_delta_pct"] <= b["ppl_delta_pct"] and a["decode_tok_s"] >= b["decode_tok_s"]
              and a["artifact_bytes"] <= b["artifact_bytes"])
        gt = (a["ppl_delta_pct"] < b["ppl_delta_pct"] or a["decode_tok_s"] > b["decode_tok_s"]
              or a["artifact_bytes"] < b["artifact_bytes"])
        return ge and gt

    return [b["candidate"] for b in pts if not any(dominates(a, b) for a in pts if a is not b)]


def tune(recipe, output=None, *, cache_dir=None, budget_minutes: float | None = None,
         budget_candidates: int | None = None, overwrite: bool = False, threads: int | None = None,
         allow_plugins: bool | None = None, ray: bool = False, ray_address: str | None = None,
         ray_workers: int | None = None, log=print) -> TuneResult:
    """Search the recipe's space; emit the candidate best at `search.objective` among those passing every gate,
    atomically at `output` (manifest with the search trace, report.html). Raises GateFailed (exit 3, nothing
    emitted) when none passes; the report (with the nearest misses) is then written to the cache's reports/.
    `ray`: builds and output-comparing gates run on Ray workers first (tune/distributed.py; a local Ray unless
    `ray_address`); speed is then measured here, one candidate at a time."""
    t_start = time.perf_counter()
    if ray_workers is not None and (isinstance(ray_workers, bool) or not isinstance(ray_workers, int)
                                    or ray_workers < 1):
        raise RecipeError(f"--ray-workers: must be a whole number >= 1, got {ray_workers!r}")
    tuner = Tuner(recipe, cache_dir=cache_dir, threads=threads, allow_plugins=allow_plugins, log=log,
                  emit=(output, overwrite))
    r, source, out = tuner.recipe, tuner.source, tuner.out
    spec = r.search
    minutes = budget_minutes if budget_minutes is not None else spec.budget_minutes
    most = budget_candidates if budget_candidates is not None else spec.budget_candidates
    valid = [c for c in tuner.candidates if c.recipe is not None]
    log(f"tune: {len(tuner.candidates)} candidates ({len(valid)} valid), objective {spec.objective}, cache "
        f"{tuner.store.root}" + (f", budget {minutes} min" if minutes else "") + (f", at most {most}" if most else ""))
    trace, infos, stopped = [], {}, None
    if ray or ray_address:
        from .distributed import prewarm

        numbers = [c.number for c in valid][:most]
        prewarm(tuner, numbers, address=ray_address, workers=ray_workers or hw.physical_cores(), log=log)
    try:
        for cand in tuner.candidates:
            if cand.recipe is None:
                trace.append(trace_entry(cand, None, None, None, {}, 0.0))
                continue
            if most is not None and sum(1 for e in trace if e["status"] != "invalid") >= most:
                stopped = f"budget: {most} candidates"
                break
            key = cache.build_key(cand.recipe, tuner.resolved.location)
            elapsed = (time.perf_counter() - t_start) / 60
            if minutes is not None and elapsed >= minutes and tuner.store.build_dir(key) is None:
                stopped = f"budget: {minutes} minutes"
                break
            log(f"candidate {cand.number}/{len(tuner.candidates)}: {cand.label()}")
            t0 = time.perf_counter()
            try:
                key, directory, info, build_cached = tuner.build(cand)
            except BuildError as e:  # one combination a pass cannot build does not end the search
                log(f"    build failed: {e}")
                trace.append(trace_entry(cand, None, None, None, {}, time.perf_counter() - t0, failed=str(e)))
                continue
            record, eval_cached = tuner.evaluate(cand, key, directory, info)
            info = {**info, "directory": str(directory)}
            infos[cand.number] = (cand, key, directory, info, record)
            entry = trace_entry(cand, key, info, record, {"build": build_cached, **eval_cached},
                                time.perf_counter() - t0)
            trace.append(entry)
            log(f"    {entry['status']}: ΔPPL {entry['ppl_delta_pct']:+.2f}%"
                + (f", decode x{entry['decode_speedup']}" if entry.get("decode_speedup") else "")
                + f", {entry['artifact_bytes'] / 1e6:.1f} MB" + (" (cached)" if all(entry["cached"].values()) else ""))
    finally:
        tuner.close()
    front = set(pareto(trace))
    for e in trace:
        e["pareto"] = e["candidate"] in front
    passed = [e for e in trace if e["status"] == "passed"]
    search = {"space": spec.space, "objective": spec.objective, "candidates": len(tuner.candidates),
              **({"sensitivity": {**spec.sensitivity.model_dump(mode="json", by_alias=True),
                                  "rows": tuner.sensitivity_rows}} if tuner.sensitivity_rows is not None else {}),
              "evaluated": sum(1 for e in trace if e["status"] not in ("invalid", "failed")), "stopped": stopped,
              "cache": str(tuner.store.root), "seconds": round(time.perf_counter() - t_start, 1),
              "recipe_file": None if source == "<recipe>" else source, "trace": trace}
    if not passed:
        misses = sorted((e for e in trace if e["status"] not in ("invalid", "passed")), key=miss_distance)[:3]
        search["nearest_misses"] = [e["candidate"] for e in misses]
        path = tuner.store.report_path(f"{r.name}-{_dt.datetime.now():%Y%m%d-%H%M%S}.html")
        path.write_text(htmlreport.render_tune(search, None, tuner.machine), encoding="utf-8")
        lines = [f"candidate {e['candidate']} ({', '.join(f'{k}={v}' for k, v in e['settings'].items())}): "
                 + "; ".join(e.get("failures") or [e.get("reason", e["status"])]) for e in misses]
        raise GateFailed(f"no candidate passed every gate ({search['evaluated']} evaluated"
                         + (f", {stopped}" if stopped else "") + f"); nothing written to {out}.\nnearest misses:\n  - "
                         + "\n  - ".join(lines) + f"\nreport: {path}", report={"search": search, "report": str(path)})
    finals = finalists(passed, spec.objective) if spec.objective != "size" else []
    runoff = tuner.runoff([infos[e["candidate"]] for e in finals], spec.objective) if len(finals) > 1 else None
    if runoff:
        search["runoff"] = runoff
    best, tied = choose(passed, spec.objective, runoff and runoff["relative"])
    search["winner"], search["tied_on_objective"] = best["candidate"], tied
    best["winner"] = True
    cand, key, directory, info, record = infos[best["candidate"]]
    log(f"tune: candidate {cand.number} wins ({cand.label()}); emitting to {out}")
    return _emit(tuner, cand, directory, info, record, search, out, overwrite, t_start)


def _emit(tuner: Tuner, cand: Candidate, directory: Path, info: dict, record: dict, search: dict, out: Path,
          overwrite: bool, t_start: float) -> TuneResult:
    staging = artifact.Staging(out)
    try:
        for f in directory.iterdir():
            if f.name != "build.json":
                (shutil.copytree if f.is_dir() else shutil.copy2)(f, staging.path / f.name)
        manifest = artifact.compose_manifest(
            record["verdict"], cand.recipe, tuner.source, tuner.facts, tuner.resolved, info["model_config"],
            record["labels"], info["saved"], info["passes"],
            {"calibration": info.get("calibration"), "evaluation": record["evaluation"]},
            build_seconds=sum(p["seconds"] for p in info["passes"]) + info.get("save_seconds", 0.0),
            stages={"passes": round(sum(p["seconds"] for p in info["passes"]), 1),
                    "save": info.get("save_seconds"), "tune": round(time.perf_counter() - t_start, 1)},
            peak_rss_mib={"tune": hw.peak_rss_mib()},
            extra={"gates_measured": {"quality": {k: record[k] for k in ("measured_utc", "node", "threads")},
                                      "speed": record["speed_measured"]},
                   "search": search})
        html = htmlreport.render_tune(search, manifest, tuner.machine)
        res = builder.finish(staging, manifest, out, keep_rejected=False, overwrite=overwrite, html=html)
    except BaseException:
        staging.discard()
        raise
    return TuneResult(True, res.artifact_path, res.manifest, res.digest, search["trace"], res.artifact_path / artifact.HTML_REPORT)
