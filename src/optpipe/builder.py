"""`build` and `gate`: recipe -> load -> passes -> target save (staging) -> gates -> atomic emit."""
from __future__ import annotations

import copy
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydantic import ValidationError

from . import artifact, data, htmlreport, hw, models, preflight, references, safeio
from .errors import ArtifactError, GateFailed, OptpipeError, RecipeError
from .gates import GateResult, accuracy, coverage, generation, speed
from .gates import tasks as task_gate
from .pipeline import (
    PLUGIN_ENV,
    ModelState,
    PassContext,
    check_machine,
    check_remote_code,
    instantiate,
    plugins_allowed,
    run_passes,
    validate_pass_chain,
)
from .recipe import AccuracyGate, DataSpec, Recipe, RegressionGate, errors_to_message, load_recipe, recipe_from_dict
from .targets import get_target


@dataclass
class BuildResult:
    passed: bool
    metrics: dict
    artifact_path: Path | None
    manifest: dict = field(default_factory=dict)
    rejected_path: Path | None = None
    report: str = ""
    digest: str | None = None  # sha256 of manifest.json: pins every byte of the artifact


def _as_recipe(recipe, allow_plugins: bool | None = None) -> tuple[Recipe, str]:
    if isinstance(recipe, Recipe):
        return recipe, recipe.source_path or "<recipe>"
    if isinstance(recipe, dict):
        return recipe_from_dict(recipe, allow_plugins=allow_plugins), "<recipe>"
    return load_recipe(recipe, allow_plugins=allow_plugins), str(recipe)


def thread_setting(given: int | None, recipe: Recipe, source: str) -> tuple[int, bool]:
    """The thread count, and whether the user fixed it (--threads, gates.speed.threads) or it is the default."""
    try:
        if given is not None:
            return hw.threads(given, "--threads"), True
        return hw.threads(recipe.gates.speed.threads, "gates.speed.threads"), recipe.gates.speed.threads is not None
    except ValueError as e:
        raise RecipeError(f"{source}: {e}") from None


def gate_threads(threads: int, fixed: bool, log=print) -> tuple[int, dict]:
    """The gates' thread count and what to record about it. A count the user fixed (--threads,
    gates.speed.threads) is kept: on a loaded machine the speed gate then discards busy rounds and may say
    inconclusive. The default (physical cores) shrinks to the CPUs other processes leave free, so a build beside
    another job measures the artifact at fewer threads instead of measuring the contention."""
    if fixed:
        return threads, {}
    others = hw.probe_load()
    use = hw.threads_beside_load(threads, others)
    if use == threads:
        return threads, {}
    log(f"gates: other processes keep {others:.1f} CPU(s) busy: measuring at {use} thread(s), not {threads} "
        "(set gates.speed.threads or --threads to insist)")
    return use, {"threads_default": threads, "background_cpus_at_start": round(others, 2)}


def check(recipe, allow_plugins: bool | None = None) -> tuple[Recipe, list, preflight.ModelFacts]:
    """Everything checked before a build loads weights (what `optpipe validate` runs): the recipe's schema and
    pass order, this CPU, the model's config/header, data files, pass options against the model and recipe."""
    recipe, source = _as_recipe(recipe, allow_plugins)
    passes = validate_pass_chain(recipe, source, allow_plugins)
    check_remote_code(recipe, source, allow_plugins)
    thread_setting(None, recipe, source)  # gates.speed.threads beyond this machine's CPUs: refused now, not at build
    get_target(recipe.target).preflight()  # e.g. cpu-ipex without IPEX: certain, so before any CPU measurement
    facts = preflight.check(recipe, source, passes)
    check_machine(passes, source, facts)  # may time the model's own matmul shapes, so after the facts
    references.check(recipe, source, facts.config.get("vocab_size"))
    check_tasks(recipe, source, allow_plugins)
    return recipe, passes, facts


def cpu_refusal(recipe) -> str | None:
    """Why this CPU cannot build `recipe` (None: it can). For `doctor` and for tests that skip such recipes; a
    model whose config cannot be read here is judged on a stand-in shape."""
    source = recipe.source_path or "<recipe>"
    try:
        facts = preflight.model_facts(recipe.model)
    except OptpipeError:
        facts = None
    try:
        check_machine(instantiate(recipe, source), source, facts)
    except RecipeError as e:
        return str(e)
    return None


def task_paths(recipe: Recipe, source: str = "<recipe>") -> list[str]:
    paths = []
    for i, p in enumerate(recipe.gates.accuracy.task_paths):
        path = recipe.resolve_path(p)
        if not path.is_dir():
            raise RecipeError(f"{source}: gates.accuracy.task_paths[{i}]: {path} is not a directory")
        paths.append(str(path))
    return paths


def output_path(given, recipe: Recipe, source: str, overwrite: bool) -> Path:
    """Where the artifact goes (`given`, else the recipe's `output`), refused before anything loads when it is
    unset, taken (unless `overwrite`), or somewhere no directory can be written (tried, then removed)."""
    if not (given or recipe.output):
        raise RecipeError(f"{source}: output: no output path (give -o/--output or set `output:` in the recipe)")
    field = "-o/--output" if given else f"{source}: output"
    out = safeio.check_path_text(str(given or recipe.output), field)
    if os.path.lexists(out):
        if not overwrite:
            raise RecipeError(f"{out} already exists (use --overwrite to replace it)")
        why = artifact.overwrite_refusal(out, protected_paths(recipe))
        if why:
            raise RecipeError(f"{field}: --overwrite refused for {out}: {why}; nothing was deleted")
    artifact.Staging(out).discard()
    return out


def protected_paths(recipe: Recipe) -> dict[str, Path]:
    """What an output path may never be nor hold, whatever --overwrite says."""
    out = {"the working directory": Path.cwd(), "your home directory": Path.home()}
    if recipe.source_path:
        out["the recipe's folder"] = Path(recipe.source_path).parent
    src = recipe.model.source
    if not src.startswith("builtin:") and os.path.lexists(Path(src).expanduser()):
        out["the model source"] = Path(src).expanduser()
    for name, spec in (("evaluation data", recipe.evaluation), ("calibration data", recipe.calibration)):
        if not spec.source.startswith("builtin:") and os.path.lexists(recipe.resolve_path(spec.source)):
            out[name] = recipe.resolve_path(spec.source)
    return out


def check_task_code(paths: list[str], source: str, allow_plugins: bool | None) -> None:
    """lm-eval task YAML files may name Python (`!function module.name`), which lm-eval imports from beside the
    file: plugin code, so it takes the plugins' opt-in."""
    if plugins_allowed(allow_plugins):
        return
    for i, directory in enumerate(paths):
        for path in sorted(Path(directory).rglob("*.y*ml")):
            if not safeio.is_regular_file(path):
                continue
            text = safeio.read_head(path, 1 << 20, f"{source}: gates.accuracy.task_paths[{i}]")
            if b"!function" in text:
                raise RecipeError(f"{source}: gates.accuracy.task_paths[{i}]: {path} names Python code (`!function`), "
                                  "which is not run unless allowed: pass --allow-plugins (API: allow_plugins=True) "
                                  f"or set {PLUGIN_ENV}=1")


def check_tasks(recipe: Recipe, source: str, allow_plugins: bool | None = None) -> None:
    """lm-eval is installed and knows every task the recipe gates on (before any weight is loaded); task files that
    name code need the plugins' opt-in."""
    gate = recipe.gates.accuracy
    if not gate.tasks:
        return
    if not task_gate.available():
        raise RecipeError(f"{source}: gates.accuracy.tasks: needs lm-eval ({task_gate.INSTALL_HINT})")
    paths = task_paths(recipe, source)
    check_task_code(paths, source, allow_plugins)
    known = set(task_gate.task_manager(paths).all_tasks)
    for i, t in enumerate(gate.tasks):
        if t.name not in known:
            hint = f" (tasks in task_paths: {', '.join(sorted(known)) or 'none'})" if paths else ""
            raise RecipeError(f"{source}: gates.accuracy.tasks[{i}].name: unknown lm-eval task {t.name!r}{hint}")


def speed_prompt(windows: list[np.ndarray], n: int) -> np.ndarray:
    ids = np.concatenate(windows)
    return np.resize(ids, n) if ids.size < n else ids[:n]


def check_speed_measurable(recipe: Recipe, target, source: str) -> None:
    why = target.speed_unmeasurable()
    if why and recipe.gates.speed.unmeasured != "allow":
        raise RecipeError(f"{source}: gates.speed: the {recipe.target} speed gate cannot run here ({why}); "
                          "set gates.speed.unmeasured: allow to build anyway and record it as not measured")


def quantize_intent(pass_records: list[dict]) -> list[tuple[str, int | None]]:
    """(label, layers quantized) of every pass that quantizes, from the manifest's pass records (a quantize-int4
    pass's `int8` part counts: on a model of few layers, `int8.edge_layers` may take every one)."""
    return [(f"passes[{i}] ({r['name']})", (r["changes"]["layers_quantized"] or 0) + r["changes"].get(
        "int8", {}).get("layers_quantized", 0)) for i, r in enumerate(pass_records) if "layers_quantized" in r["changes"]]


def quality_gates(recipe: Recipe, refs: references.References, candidate, eval_windows, log=print,
                  intent: list | None = None, tokenizer=None) -> dict[str, GateResult]:
    """The gates that compare outputs (coverage, accuracy, generation, tasks): machine-independent work, which tune
    may spread over workers."""
    reference = refs.accuracy
    log("coverage gate: the precision every linear of the artifact runs in")
    cov = coverage.check(coverage.measure(candidate.precisions(), coverage.storage_of(candidate)),
                         recipe.gates.coverage, intent or [])
    log(f"accuracy gate: candidate vs {refs.labels['accuracy']} on the evaluation text")
    acc = accuracy.check(accuracy.compare(reference, candidate, eval_windows.windows), recipe.gates.accuracy)
    gen_gate = recipe.gates.generation
    log(f"generation gate: {gen_gate.prompts} prompts, {gen_gate.new_tokens} greedy tokens each")
    gen = generation.check(generation.measure(
        reference, candidate, generation.prompts(eval_windows.windows, gen_gate.prompts, gen_gate.prompt_tokens),
        gen_gate.new_tokens, eval_windows.eos_token_id), gen_gate)
    out = {"accuracy": acc, "coverage": cov, "generation": gen}
    acc_gate = recipe.gates.accuracy
    if acc_gate.tasks:
        log(f"task gate: {', '.join(t.name for t in acc_gate.tasks)} (lm-eval) on the reference and the candidate")
        try:
            measured = task_gate.measure(reference, candidate, tokenizer, acc_gate.tasks, task_paths(recipe),
                                         recipe.evaluation.window)
        except ValueError as e:  # a metric the task does not report
            raise RecipeError(f"gates.accuracy.tasks: {e}") from None
        out["tasks"] = task_gate.check(measured, acc_gate.tasks, acc_gate.decide_on)
    return out


def speed_gate(recipe: Recipe, target, refs: references.References, candidate, eval_windows, threads: int,
               log=print, saved: dict | None = None, skip: str | None = None,
               adapt_threads: bool = False) -> GateResult:
    """The paired speed gate against refs.speed (not measured when the target cannot be timed here, or `skip`)."""
    g = recipe.gates.speed
    why = target.speed_unmeasurable() or skip
    if why:  # check_speed_measurable already refused an unmeasurable target unless the recipe allows it
        log(f"speed gate: not measured ({why})")
        return GateResult("speed", None, {"reason": why}, g.model_dump(), [])
    log(f"speed gate: {g.prompt_tokens}-token prompt, {g.new_tokens} new tokens, {g.repeats}-{g.max_repeats} paired "
        f"rounds (until the {g.decide_on} speedup decides), {threads} thread(s)")
    spd = speed.check(speed.measure(refs.speed, candidate, speed_prompt(eval_windows.windows, g.prompt_tokens),
                                    g.new_tokens, g, threads, hw.usable_cpus(), adapt_threads=adapt_threads),
                      g, threads)
    if spd.metrics.get("threads_lowered"):
        log(f"speed gate: other processes took CPUs mid-gate: measured at {spd.metrics['threads']} thread(s)")
    hint = target.speed_failure_hint(saved) if spd.failures else None
    if hint:
        spd.failures.append(hint)
    return spd


def run_gates(recipe: Recipe, target, refs: references.References, candidate, eval_windows, threads: int,
              log=print, saved: dict | None = None, intent: list | None = None,
              tokenizer=None, adapt_threads: bool = False) -> dict[str, GateResult]:
    """Every gate, candidate against `refs` (accuracy and generation against refs.accuracy, speed against
    refs.speed). `adapt_threads`: the thread count is the default, so the speed gate may lower it to the CPUs a
    load that starts mid-gate leaves free."""
    quality = quality_gates(recipe, refs, candidate, eval_windows, log, intent, tokenizer)
    spd = speed_gate(recipe, target, refs, candidate, eval_windows, threads, log, saved, adapt_threads=adapt_threads)
    return {"accuracy": quality["accuracy"], "speed": spd, **{k: v for k, v in quality.items() if k != "accuracy"}}


def finish(staging: artifact.Staging, manifest: dict, out: Path, keep_rejected: bool, overwrite: bool,
           html: str | None = None) -> BuildResult:
    """Write the reports and the manifest into staging, then emit it (every gate passed) or refuse it (GateFailed,
    nothing at `out`; with keep_rejected the candidate is moved beside it)."""
    manifest["report"] = artifact.REPORT
    report = artifact.render_report(manifest)
    (staging.path / artifact.REPORT).write_text(report, encoding="utf-8")
    if html is not None:
        (staging.path / artifact.HTML_REPORT).write_text(html, encoding="utf-8")
    manifest = artifact.write_manifest(staging.path, manifest)
    if manifest["status"] != "passed":
        kept = staging.reject(keep_rejected)
        failures = artifact.failures(manifest["gates"])
        msg = "artifact refused, nothing written to {}:\n  - {}".format(out, "\n  - ".join(failures))
        if kept:
            msg += f"\nrejected candidate kept at {kept}"
        raise GateFailed(msg, report={"manifest": manifest, "rejected_path": str(kept) if kept else None})
    ident = artifact.digest(staging.path)
    path = staging.emit(overwrite)
    return BuildResult(True, manifest["summary"], path, manifest, None, report, ident)


def build(recipe, output: str | Path | None = None, *, keep_rejected: bool = False, overwrite: bool = False,
          threads: int | None = None, allow_plugins: bool | None = None, log=print) -> BuildResult:
    """Build, gate, and emit an artifact. Raises GateFailed (nothing at `output`) when a gate fails.
    Plugin passes given by `path:` run only with `allow_plugins=True` (or OPTPIPE_ALLOW_PLUGINS=1)."""
    t_start = time.perf_counter()
    recipe, passes, facts = check(recipe, allow_plugins)
    source = recipe.source_path or "<recipe>"
    target = get_target(recipe.target)
    check_speed_measurable(recipe, target, source)
    out = output_path(output, recipe, source, overwrite)
    threads, fixed_threads = thread_setting(threads, recipe, source)

    model, tokenizer, checkpoint, resolved = models.open_model(recipe.model, log)
    references.check_tokenizers(recipe, tokenizer, source)  # before minutes of passes
    config = model.config if model is not None else checkpoint.config
    reference_model = (copy.deepcopy(model) if model is not None and any(
        p.input_stage == "torch" and p.name != "export" for p in passes) else model)
    calib_cache: dict = {}

    def calibration():
        if "w" not in calib_cache:
            calib_cache["w"] = data.token_windows(recipe.calibration, tokenizer, recipe.base_dir, "calibration")
        return calib_cache["w"].windows

    eval_windows = data.token_windows(recipe.evaluation, tokenizer, recipe.base_dir, "evaluation")
    if any("calibration" in p.needs for p in passes):
        calibration()  # a bad calibration source fails now, before minutes of passes
    staging = artifact.Staging(out)
    scratch = staging.path.parent / staging.path.name.replace(".optpipe-staging-", ".optpipe-scratch-")
    try:
        state = ModelState("torch", torch_model=model, tokenizer=tokenizer, checkpoint=checkpoint)
        del model
        ctx = PassContext(calibration=calibration, threads=threads, workdir=staging.path.parent, seed=recipe.seed,
                          scratch=scratch)
        stages = {"load": round(time.perf_counter() - t_start, 1)}
        t = time.perf_counter()
        records = run_passes(passes, state, ctx, log=log)
        stages["passes"] = round(time.perf_counter() - t, 1)
        log(f"saving {recipe.target} artifact to staging")
        t = time.perf_counter()
        saved = target.save(state, staging.path)
        shutil.rmtree(scratch, ignore_errors=True)
        stages["save"] = round(time.perf_counter() - t, 1)
        build_peak = hw.peak_rss_mib()  # load + passes + save, before the artifact is run
        del state
        t = time.perf_counter()
        gthreads, load_note = gate_threads(threads, fixed_threads, log)
        candidate = target.load(staging.path, gthreads)
        refs = references.open_references(recipe, model=reference_model, checkpoint=checkpoint,
                                          tokenizer=tokenizer, threads=gthreads, workdir=staging.path.parent, log=log)
        try:
            gates = run_gates(recipe, target, refs, candidate, eval_windows, gthreads, log, saved,
                              quantize_intent([r.to_json() for r in records]), tokenizer,
                              adapt_threads=not fixed_threads)
        finally:
            refs.close()
        gates["speed"].metrics.update(load_note)
        stages["gates"] = round(time.perf_counter() - t, 1)
        del candidate
        verdict = artifact.gate_record(gates)
        manifest = artifact.compose_manifest(
            verdict, recipe, source, facts, resolved, artifact.model_config_record(config), refs.labels, saved,
            [r.to_json() for r in records],
            {"calibration": calib_cache["w"].describe() if "w" in calib_cache else None,
             "evaluation": eval_windows.describe()},
            build_seconds=time.perf_counter() - t_start, stages=stages,
            peak_rss_mib={"build": build_peak, "with_gates": hw.peak_rss_mib()})
        return finish(staging, manifest, out, keep_rejected, overwrite, htmlreport.render_build(manifest))
    except BaseException:
        staging.discard()
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def manifest_recipe(manifest: dict, where: str) -> Recipe:
    """The recipe an artifact was built from, as its manifest records it (ArtifactError, exit 4, when absent or
    not a recipe: a manifest is the artifact's, not the user's input)."""
    data = manifest.get("recipe")
    if not isinstance(data, dict):
        raise ArtifactError(f"{where}: the manifest records no `recipe` (the gates it re-runs are the recipe's)")
    try:
        return Recipe.model_validate({**data, "source_path": manifest.get("recipe_file")})
    except ValidationError as e:
        raise ArtifactError(errors_to_message(f"{where}: recipe", e)) from None


def regression_gates(recipe: Recipe, against: str, max_ppl_delta_pct: float | None = None,
                     max_decode_slowdown_pct: float | None = None) -> Recipe:
    """The recipe's gates turned into a regression check against the deployed artifact `against`: the accuracy gate's
    ΔPPL and the speed gate's decode ratio are taken against it, bounded by `gates.regression` (or the overrides),
    decided on the same statistics. KL and top-1 limits describe distance from fp32 and are not applied."""
    overrides = {"max_ppl_delta_pct": max_ppl_delta_pct, "max_decode_slowdown_pct": max_decode_slowdown_pct}
    reg = RegressionGate.model_validate({**recipe.gates.regression.model_dump(),  # same bounds as the recipe field
                                         **{k: v for k, v in overrides.items() if v is not None}})
    out = recipe.model_copy(deep=True)
    out.gates.regression = reg
    out.gates.accuracy = AccuracyGate(reference=against, max_ppl_delta_pct=reg.max_ppl_delta_pct,
                                      decide_on=recipe.gates.accuracy.decide_on)
    out.gates.speed = recipe.gates.speed.model_copy(update={
        "baseline": against, "min_decode_speedup": round(1 - reg.max_decode_slowdown_pct / 100, 6),
        "min_prefill_speedup": None})
    return out


def gate(artifact_dir: str | Path, eval_data: str | None = None, threads: int | None = None, *,
         against: str | Path | None = None, max_ppl_delta_pct: float | None = None,
         max_decode_slowdown_pct: float | None = None, log=print) -> BuildResult:
    """Re-run the gates on an existing artifact (optionally on other evaluation text); never modifies it.
    With `against` (a deployed artifact), a regression check: not less accurate nor slower than it beyond
    `gates.regression` (or the given tolerances)."""
    artifact_dir = Path(artifact_dir)
    where = str(artifact_dir / artifact.MANIFEST)
    manifest = artifact.read_manifest(artifact_dir)
    problems = artifact.verify(artifact_dir)  # a pre-deploy check measures the bytes the manifest lists, or none
    if problems:
        raise ArtifactError(f"{artifact_dir}: refused before measuring: {len(problems)} problem(s):\n  "
                            + "\n  ".join(problems))
    recipe = manifest_recipe(manifest, where)
    check_remote_code(recipe, where, None)  # the recorded recipe is code's word too: the same opt-ins apply
    if recipe.gates.accuracy.tasks:
        check_task_code(task_paths(recipe, where), where, None)
    if eval_data:
        try:
            recipe.evaluation = DataSpec(**{**recipe.evaluation.model_dump(), "source": eval_data})
        except ValidationError as e:
            raise RecipeError(errors_to_message("--eval-data", e)) from None
        preflight.check_data(recipe.evaluation, Path.cwd(), "--eval-data")  # a FIFO or binary: refused before loading
    if against is not None:
        against = str(Path(against).expanduser().resolve())
        try:
            recipe = regression_gates(recipe, against, max_ppl_delta_pct, max_decode_slowdown_pct)
        except ValueError as e:  # pydantic: a tolerance out of bounds
            raise RecipeError(f"--against: {e}") from None
    threads, fixed_threads = thread_setting(threads, recipe, where)
    target = get_target(recipe.target)
    target.preflight()
    check_speed_measurable(recipe, target, where)
    needs_model = any(not references.is_artifact_reference(v)
                      for v in (recipe.gates.accuracy.reference, recipe.gates.speed.baseline))
    model = checkpoint = None
    if needs_model:
        model, tokenizer, checkpoint, _ = models.open_model(recipe.model, log, "reference model")
    else:
        from .runtime.loaded import load_tokenizer

        tokenizer = load_tokenizer(artifact_dir, manifest)
        if tokenizer is None:
            _, tokenizer, _ = models.load(recipe.model)
    windows = data.token_windows(recipe.evaluation, tokenizer, Path.cwd(), "--eval-data" if eval_data else "evaluation")
    references.check_tokenizers(recipe, tokenizer, where, "--against" if against is not None else None)
    threads, load_note = gate_threads(threads, fixed_threads, log)
    candidate = target.load(artifact_dir, threads)
    refs = references.open_references(recipe, model=model, checkpoint=checkpoint, tokenizer=tokenizer, threads=threads,
                                      workdir=artifact_dir.parent, log=log,
                                      vocab_size=(manifest.get("model") or {}).get("vocab_size"),
                                      where="--against" if against is not None else None)
    try:
        gates = run_gates(recipe, target, refs, candidate, windows, threads, log, manifest.get("target"),
                          quantize_intent(manifest.get("passes") or []), tokenizer, adapt_threads=not fixed_threads)
    finally:
        refs.close()
    gates["speed"].metrics.update(load_note)
    result = artifact.gate_record(gates, windows.describe())
    result["reference"], result["speed_baseline"] = refs.labels["accuracy"], refs.labels["speed"]
    if against is not None:
        result["against"] = {"artifact": against, **recipe.gates.regression.model_dump()}
    if result["status"] != "passed":
        what = f"regression check against {against}" if against is not None else "gate"
        raise GateFailed("{} failed for {}:\n  - {}".format(what, artifact_dir, "\n  - ".join(result["failures"])),
                         report=result)
    return BuildResult(True, result["summary"], artifact_dir, result)
