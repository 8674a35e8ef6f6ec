"""`optpipe` command line: build, tune, gate, validate, inspect, verify, doctor, passes, targets."""
from __future__ import annotations

import argparse
import contextlib
import errno
import io
import json
import math
import os
import signal
import sys
import threading
import traceback
from pathlib import Path

from .errors import ArtifactError, GateFailed, OptpipeError, RecipeError
from .safeio import check_path_text, parse_digest

EXIT_CODES = """exit codes:
  0  ok
  1  the build failed (the message names the pass)
  2  bad recipe, argument or model (the message names the file and field)
  3  a gate refused the artifact: nothing is written at the output path
  4  the artifact is missing, malformed, modified, or not a passed artifact
  130 interrupted (Ctrl-C / SIGTERM): nothing is written
  141 the output pipe was closed (e.g. `| head`): the command stopped there"""

EXAMPLES = """examples:
  optpipe build recipes/smollm2-135m-cpu-int4.yaml -o artifacts/smollm2-int4
  optpipe tune recipes/smollm2-135m-cpu-tune.yaml -o artifacts/smollm2-tuned
  optpipe validate recipes/llama2-13b-cpu.yaml
  optpipe gate artifacts/smollm2-int4 --eval-data my.txt
  optpipe verify artifacts/smollm2-int4 --digest sha256:...
  optpipe inspect artifacts/smollm2-int4 --json
  optpipe passes quantize-int4
  optpipe doctor"""


class _Out:
    """Where messages go: logs to stderr (silenced by -q), results to stdout (JSON with --json)."""

    quiet = False
    verbose = False

    @classmethod
    def log(cls, msg: str) -> None:
        if not cls.quiet:
            print(msg, file=sys.stderr, flush=True)


def _emit_json(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


def _print_gates(gates: dict) -> None:
    for name, g in gates.items():
        keys = [k for k in g if k not in ("thresholds", "failures", "runs", "runs_columns", "passed")
                and (not isinstance(g[k], (list, dict)) or k.endswith("_ci95"))]
        print(f"{name}: " + ", ".join(f"{k}={g[k]}" for k in keys))
        for f in g.get("failures", []):
            print(f"  FAILED: {f}")


def _print_storage(storage: dict | None) -> None:
    if not storage:
        return
    from .runtime.storage import storage_rows

    print(f"storage: {storage['bits_per_weight']} bits per weight ({storage['bytes'] / 1e6:.1f} MB over "
          f"{storage['parameters']} parameters; {storage['bits_per_weight_layers']} in the weight layers)")
    for name, layers, params, mb, bpw in storage_rows(storage)[:-1]:
        print(f"  {name:<46} {layers!s:>5} {params!s:>12} {mb!s:>9} MB  {bpw!s:>7} bits/weight")


MODEL_HELP = ("build this model instead of the recipe's `model.source`: a directory, a .gguf file, a hub id in the local "
              "cache, or builtin:NAME (the recipe's passes and gates unchanged)")


SHARED_OPTIONS = {
    "model": (("--model",), {"help": MODEL_HELP}),
    "output": (("-o", "--output"), {"help": "artifact directory (default: the recipe's `output`)"}),
    "overwrite": (("--overwrite",), {"action": "store_true", "help": "replace an existing artifact at OUTPUT"}),
    "threads": (("--threads",), {"type": int, "help": "threads for the gates (default: the recipe's, else physical "
                                                      "cores; on a busy machine, those the load leaves free)"}),
    "allow_plugins": (("--allow-plugins",), {"action": "store_true", "help": "run (validate: import) plugin passes "
                                             "named by `path:` in the recipe (or set OPTPIPE_ALLOW_PLUGINS=1)"}),
    "json": (("--json",), {"action": "store_true", "help": "print the result as JSON on stdout"}),
}


def _recipe(a):
    """The recipe file, with `--model` in place of its `model.source` when given (same recipe, another model)."""
    if getattr(a, "model", None) is None:
        return a.recipe

    from .recipe import load_recipe

    recipe = load_recipe(a.recipe, allow_plugins=a.allow_plugins or None)
    path = check_path_text(a.model, "--model").expanduser()
    recipe.model.source = str(path.resolve()) if os.path.lexists(path) else a.model
    return recipe


def cmd_build(a) -> int:
    from .builder import build

    res = build(_recipe(a), a.output, keep_rejected=a.keep_rejected, overwrite=a.overwrite, threads=a.threads,
                allow_plugins=a.allow_plugins or None, log=_Out.log)
    if a.json:
        _emit_json({"status": "passed", "artifact": str(res.artifact_path), "digest": res.digest,
                    "summary": res.metrics, "gates": res.manifest["gates"]})
        return 0
    _print_gates(res.manifest["gates"])
    print(f"artifact: {res.artifact_path}")
    print(f"digest: {res.digest}  (optpipe verify {res.artifact_path} --digest {res.digest})")
    return 0


def cmd_gate(a) -> int:
    from .builder import gate

    if a.against is None and (a.max_ppl_increase is not None or a.max_slowdown is not None):
        raise RecipeError("--max-ppl-increase and --max-slowdown are tolerances of --against: give --against DEPLOYED")
    res = gate(a.artifact, eval_data=a.eval_data, threads=a.threads, against=a.against,
               max_ppl_delta_pct=a.max_ppl_increase, max_decode_slowdown_pct=a.max_slowdown, log=_Out.log)
    if a.json:
        _emit_json({"status": "passed", "artifact": str(a.artifact), "summary": res.metrics, **res.manifest})
        return 0
    _print_gates(res.manifest["gates"])
    print(f"no regression against {a.against}" if a.against else "gates passed")
    return 0


def cmd_validate(a) -> int:
    from .builder import check

    r, passes, facts = check(_recipe(a), allow_plugins=a.allow_plugins or None)
    export = next((p for p in passes if hasattr(p, "route_for")), None)
    route = export.route_for(facts) if export is not None else None
    search = None
    if r.search is not None:  # every path and every value, as `optpipe tune` would enumerate them
        from .tune.space import candidates

        cands = candidates(r, allow_plugins=a.allow_plugins or None)
        search = {"candidates": len(cands), "invalid": {c.number: c.invalid for c in cands if c.invalid}}
    if a.json:
        _emit_json({"status": "ok", "recipe": str(a.recipe), "target": r.target, "model": facts.describe(),
                    "model_type": facts.model_type, "family": facts.family, "export_route": route,
                    "passes": [p.name for p in passes], "search": search})
        return 0
    via = f"; export route: {route}" if route else ""
    print(f"{a.recipe}: ok ({r.target}; model {facts.describe()}; passes: {', '.join(p.name for p in passes)}{via})")
    if search is not None:
        print(f"search: {search['candidates']} candidates, {len(search['invalid'])} of them combinations the pass "
              "chain refuses" + "".join(f"\n  candidate {n}: {why}" for n, why in search["invalid"].items()))
    return 0


def parse_budget(text: str | None) -> tuple[float | None, int | None]:
    """`--budget`: minutes (`30m`, `1.5h`) or a number of candidates (`24`)."""
    if text is None:
        return None, None
    t = text.strip().lower()
    try:
        if t.endswith(("m", "min")):
            value, unit = float(t.rstrip("min")), 1
        elif t.endswith("h"):
            value, unit = float(t[:-1]), 60
        else:
            value = None
        if value is not None and not math.isfinite(value):
            raise ValueError
        if value is None:
            n = int(t)
            if n < 1:
                raise ValueError
            return None, n
    except ValueError:
        raise RecipeError(f"--budget: {text!r} is neither minutes (30m, 1.5h) nor a number of candidates (24)") from None
    if value <= 0:
        raise RecipeError(f"--budget: {text!r} must be more than zero")
    return value * unit, None


def cmd_tune(a) -> int:
    from .tune import tune

    minutes, most = parse_budget(a.budget)
    res = tune(_recipe(a), a.output, cache_dir=a.cache, budget_minutes=minutes, budget_candidates=most,
               overwrite=a.overwrite, threads=a.threads, allow_plugins=a.allow_plugins or None, ray=a.ray,
               ray_address=a.ray_address, ray_workers=a.ray_workers, log=_Out.log)
    search = res.manifest["search"]
    if a.json:
        _emit_json({"status": "passed", "artifact": str(res.artifact_path), "digest": res.digest,
                    "winner": search["winner"], "summary": res.manifest["summary"], "search": {k: v for k, v in search.items() if k != "trace"},
                    "report": str(res.report_path)})
        return 0
    _print_gates(res.manifest["gates"])
    print(f"winner: candidate {search['winner']} of {search['candidates']} ({search['evaluated']} evaluated)")
    print(f"artifact: {res.artifact_path}")
    print(f"report: {res.report_path}")
    print(f"digest: {res.digest}  (optpipe verify {res.artifact_path} --digest {res.digest})")
    return 0


def cmd_inspect(a) -> int:
    from .artifact import digest, read_manifest

    m = read_manifest(Path(a.artifact))
    ident = digest(Path(a.artifact))
    if a.json:
        _emit_json({"digest": ident, **m})
        return 0
    try:
        print(f"{m['recipe']['name']}  [{m['status']}]  target={m['recipe']['target']}  model={m['recipe']['model']['source']}")
        print(f"built {m['created_utc']} in {m['build_seconds']} s; {m['artifact_bytes'] / 1e6:.1f} MB in {len(m['files'])} files")
        print(f"digest {ident}")
        for p in m["passes"]:
            ch = ", ".join(f"{k}={v}" for k, v in p["changes"].items() if not isinstance(v, (dict, list)))
            print(f"  pass {p['name']:<16} {p['seconds']:>7.1f}s  {ch}")
        _print_gates(m["gates"])
        _print_storage((m["gates"].get("coverage") or {}).get("storage"))
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise ArtifactError(f"{a.artifact}: manifest lacks a field inspect needs ({type(e).__name__}: {e})") from None
    return 0


def cmd_verify(a) -> int:
    from .artifact import digest, read_manifest, verify

    if a.digest is not None:
        parse_digest(a.digest, "--digest")  # malformed: exit 2 before the artifact is read
    problems = verify(Path(a.artifact), a.digest)
    n = len(read_manifest(Path(a.artifact))["files"])
    if a.json:
        _emit_json({"status": "failed" if problems else "ok", "artifact": str(a.artifact), "files": n,
                    "digest": digest(Path(a.artifact)), "problems": problems})
        return 4 if problems else 0
    if problems:
        raise ArtifactError(f"{a.artifact}: {len(problems)} problem(s):\n  " + "\n  ".join(problems))
    checked = " and the digest" if a.digest else " (give --digest to pin the manifest itself)"
    print(f"{a.artifact}: {n} files match the manifest{checked}")
    return 0


def _shipped_recipes(directory: Path) -> dict[str, str | None]:
    """Recipe file -> why this CPU/environment cannot build it (None: it can)."""
    from .builder import cpu_refusal
    from .recipe import load_recipe
    from .targets import get_target

    out = {}
    for path in sorted(directory.glob("*.yaml")):
        try:
            recipe = load_recipe(path)
            get_target(recipe.target).preflight()
            why = cpu_refusal(recipe)
        except OptpipeError as e:
            why = str(e).splitlines()[0]
        except Exception as e:  # noqa: BLE001 - one broken recipe is one line of the report, not the end of it
            why = f"cannot be checked: {type(e).__name__}: {e}"
        out[str(path)] = why
    return out


def cmd_doctor(a) -> int:
    from . import hw

    env = hw.environment()
    recipes_dir = check_path_text(a.recipes or "recipes", "--recipes")
    if a.recipes is not None and not recipes_dir.is_dir():
        raise RecipeError(f"--recipes: {recipes_dir} is not a directory of recipes")
    recipes = _shipped_recipes(recipes_dir) if recipes_dir.is_dir() else {}
    if a.json:
        _emit_json({**env, "recipes": {k: {"buildable": v is None, "reason": v} for k, v in recipes.items()}})
        return 0
    print(f"cpu: {env['cpu']} ({env['machine']}), {env['physical_cores']} physical cores, {env['logical_cpus']} logical")
    print("isa: " + ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in env["isa"].items()))
    print("versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()))
    if recipes:
        print(f"recipes in {recipes_dir}/ this machine can build:")
        for path, why in recipes.items():
            print(f"  {'yes' if why is None else 'no '}  {Path(path).name}" + (f"  ({why})" if why else ""))
    return 0


def cmd_passes(a) -> int:
    from .pipeline import describe_passes

    table = describe_passes()
    if a.name:
        if a.name not in table:
            raise RecipeError(f"unknown pass {a.name!r}; known: {', '.join(sorted(table))}")
        table = {a.name: table[a.name]}
    if a.json:
        _emit_json(table)
        return 0
    for name, impls in table.items():
        for impl in impls:
            print(f"{name}  [{', '.join(impl['targets'])}]  {impl['stage']}")
            if impl["summary"]:
                print(f"    {impl['summary']}")
            if a.name:
                for opt in impl["options"]:
                    print(f"    {opt['name']}: {opt['type']} = {opt['default']}"
                          + (f"  -- {opt['description']}" if opt["description"] else ""))
    if not a.name:
        print("(optpipe passes NAME lists a pass's options)")
    return 0


def cmd_targets(a) -> int:
    from .targets import describe_targets

    table = describe_targets()
    if a.json:
        _emit_json(table)
        return 0
    for name, t in table.items():
        print(f"{name}  (final stage: {t['final_stage']})  {t['summary']}")
    return 0


def parser() -> argparse.ArgumentParser:
    from . import __version__

    fmt = argparse.RawDescriptionHelpFormatter
    p = _Parser(prog="optpipe", formatter_class=fmt,
                                description="Build, measure and refuse optimized model artifacts.",
                                epilog=EXIT_CODES + "\n\n" + EXAMPLES)
    p.add_argument("--version", action="version", version=f"optpipe {__version__}")
    p.add_argument("-q", "--quiet", action="store_true", help="only results and errors (no progress, no step log)")
    p.add_argument("-v", "--verbose", action="store_true", help="show the chained cause (traceback) of an error")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name, func, help_, epilog=""):
        s = sub.add_parser(name, help=help_, description=help_, formatter_class=fmt, epilog=epilog + EXIT_CODES)
        s.set_defaults(func=func)
        return s

    def shared(s, *names):
        """Options several commands take, spelled and explained once."""
        for name in names:
            flags, kwargs = SHARED_OPTIONS[name]
            s.add_argument(*flags, **kwargs)

    b = add("build", cmd_build, "build a recipe into a gated artifact",
            "example:\n  optpipe build recipes/smollm2-135m-cpu-int4.yaml -o artifacts/smollm2-int4\n\n")
    b.add_argument("recipe", help="recipe YAML file")
    b.add_argument("--keep-rejected", action="store_true", help="keep a refused candidate at OUTPUT.rejected")
    shared(b, "model", "output", "overwrite", "threads", "allow_plugins", "json")
    tu = add("tune", cmd_tune, "search the recipe's `search:` space; emit the best candidate that passes every gate",
             "examples:\n  optpipe tune recipes/smollm2-135m-cpu-tune.yaml -o artifacts/smollm2-tuned\n"
             "  optpipe tune recipes/smollm2-135m-cpu-tune.yaml --budget 20m   # stop starting candidates after 20 min\n\n")
    tu.add_argument("recipe", help="recipe YAML file with a `search:` section")
    tu.add_argument("--budget", help="minutes (30m, 1.5h) or number of candidates (24); default: the recipe's "
                                     "search.budget_*, else the whole space")
    tu.add_argument("--cache", help="directory of cached builds and measurements (default: $OPTPIPE_TUNE_CACHE "
                                    "or ~/.cache/optpipe/tune); share it between runs and workers")
    tu.add_argument("--ray", action="store_true", help="build and accuracy-gate candidates on Ray workers (a local "
                                                       "Ray unless --ray-address); speed is measured here (needs "
                                                       "optpipe[distributed])")
    tu.add_argument("--ray-address", help="join this Ray cluster (e.g. ray://head:10001 or auto); implies --ray")
    tu.add_argument("--ray-workers", type=int, help="Ray workers (default: physical cores)")
    shared(tu, "model", "output", "overwrite", "threads", "allow_plugins", "json")
    g = add("gate", cmd_gate, "re-run the accuracy and speed gates on an artifact (pre-deploy check)",
            "examples:\n  optpipe gate artifacts/smollm2-int4 --eval-data my.txt\n"
            "  optpipe gate artifacts/new --against /srv/deployed   # regression check against what is deployed\n\n")
    g.add_argument("artifact", help="artifact directory")
    g.add_argument("--eval-data", help="evaluation text (.txt/.md/.jsonl/.parquet or a dataset name)")
    g.add_argument("--against", metavar="DEPLOYED",
                   help="compare with this artifact instead of fp32: refuse if less accurate or slower than it beyond "
                        "the recipe's gates.regression tolerances")
    g.add_argument("--max-ppl-increase", type=float, metavar="PCT",
                   help="with --against: perplexity increase allowed, percent (default gates.regression.max_ppl_delta_pct)")
    g.add_argument("--max-slowdown", type=float, metavar="PCT",
                   help="with --against: decode slowdown allowed, percent (default gates.regression.max_decode_slowdown_pct)")
    shared(g, "threads", "json")
    v = add("validate", cmd_validate, "check a recipe without building (no weights are loaded)",
            "example:\n  optpipe validate recipes/llama2-13b-cpu.yaml\n\n")
    v.add_argument("recipe", help="recipe YAML file")
    shared(v, "model", "allow_plugins", "json")
    i = add("inspect", cmd_inspect, "what was built, by which passes, with which gate figures, and its digest")
    i.add_argument("artifact", help="artifact directory")
    i.add_argument("--json", action="store_true", help="the whole manifest (and digest) as JSON")
    ve = add("verify", cmd_verify, "check every file against the manifest (and the manifest against --digest)",
             "example:\n  optpipe verify artifacts/smollm2-int4 --digest sha256:0f3a...\n\n")
    ve.add_argument("artifact", help="artifact directory")
    ve.add_argument("--digest", help="the digest `build` printed (sha256:...): pins the manifest, hence every file")
    shared(ve, "json")
    d = add("doctor", cmd_doctor, "CPU ISA, cores, library versions, and which recipes this machine can build")
    d.add_argument("--recipes", help="directory of recipes to check (default: ./recipes, when there is one)")
    shared(d, "json")
    ps = add("passes", cmd_passes, "list the passes (built in and installed), or one pass's options")
    ps.add_argument("name", nargs="?", help="a pass name: list its options with types, defaults, descriptions")
    shared(ps, "json")
    t = add("targets", cmd_targets, "list the targets an artifact can be built for")
    shared(t, "json")
    return p


class _Parser(argparse.ArgumentParser):
    """argparse, with its usage errors raised as RecipeError (exit 2), so they reach the one error path that
    also answers --json."""

    def error(self, message):
        raise RecipeError(f"{self.prog}: {message}\n{self.format_usage().strip()}")


def _report_error(e: BaseException, wants_json: bool) -> int:
    code = e.exit_code if isinstance(e, OptpipeError) else 1
    gates = (e.report.get("manifest") or e.report).get("gates") if isinstance(e, GateFailed) else None
    if gates and not wants_json:
        _print_gates(gates)
    if wants_json:  # a refusal carries the measurements it rests on
        _emit_json({"status": "error", "exit_code": code, "error": str(e), **({"gates": gates} if gates else {})})
    if isinstance(e, OptpipeError):
        print(f"error: {e}", file=sys.stderr)
    else:
        print(f"internal error: {type(e).__name__}: {e} (run with -v for the traceback; please report it)",
              file=sys.stderr)
    if _Out.verbose:
        traceback.print_exception(e, file=sys.stderr)
    return code


# An OSError naming a path the user gave (too long a name, no permission, a file where a directory must be) is the
# input's fault: exit 2 with the path, not an internal error.
USER_PATH_ERRNOS = {errno.ENAMETOOLONG, errno.ELOOP, errno.ENOTDIR, errno.EISDIR, errno.EACCES, errno.EPERM,
                    errno.EROFS}
OUTPUT_ERRNOS = {errno.ENOSPC, errno.EIO, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}


def _as_user_error(e: Exception) -> OptpipeError | None:
    if isinstance(e, OSError) and e.errno in USER_PATH_ERRNOS and e.filename is not None:
        return RecipeError(f"{e.filename}: {e.strerror}")
    return None


def _stdout_failure() -> OSError | None:
    """The error writing to stdout raises now (/dev/full, a full disk), or None when stdout takes what it holds."""
    try:
        sys.stdout.flush()
    except OSError as e:
        return e
    return None


def _raised_by_a_print_here(e: BaseException) -> bool:
    """The error came from this module's own writing (its `print`s: stdout or stderr), not from a build's I/O."""
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_globals.get("__name__") == __name__


def _silence(*streams) -> None:
    """Point streams at /dev/null, so nothing more (not even the interpreter's flush at exit) fails on them."""
    for stream in streams:
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())
        except (OSError, ValueError, io.UnsupportedOperation):
            pass


def _standard_streams() -> None:
    """A command started with a standard stream closed (`2>&-`) still runs and says what it can: the closed
    descriptor is taken by /dev/null (else the next file opened would become 'stderr' for every C library), and
    Python's missing stream object is replaced."""
    for fd, name, mode in ((0, "stdin", "r"), (1, "stdout", "w"), (2, "stderr", "w")):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
        if getattr(sys, name) is None:
            setattr(sys, name, open(fd, mode, closefd=False))


def _parse(argv: list[str] | None, wants_json: bool):
    """The parsed arguments; (None, code) when parsing ended the command (--help, --version: 0)."""
    if not wants_json:
        try:
            return parser().parse_args(argv), None
        except SystemExit as e:  # --help / --version
            return None, int(e.code or 0)
    text = io.StringIO()
    try:
        with contextlib.redirect_stdout(text):
            return parser().parse_args(argv), None
    except SystemExit as e:  # --help or --version under --json: their text, as JSON
        _emit_json({"status": "ok", "exit_code": int(e.code or 0), "text": text.getvalue()})
        return None, int(e.code or 0)


INTERRUPTING_SIGNALS = ("SIGTERM", "SIGHUP")  # `kill`, a closed terminal or SSH session: unwind like Ctrl-C


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _standard_streams()
    words = sys.argv[1:] if argv is None else list(argv)
    wants_json = "--json" in words
    from . import progress

    on_main = threading.current_thread() is threading.main_thread()  # signal handlers only exist there
    signalled: list[int] = []

    def on_signal(signum, frame):
        signalled.append(signum)
        raise KeyboardInterrupt

    handled = [getattr(signal, n) for n in INTERRUPTING_SIGNALS if hasattr(signal, n)] if on_main else []
    previous = {sig: signal.signal(sig, on_signal) for sig in handled}  # the staging directory is then removed
    try:
        try:
            args, code = _parse(argv, wants_json)
        except RecipeError as e:  # a usage error: exit 2, as argparse would, and as JSON under --json
            return _report_error(e, wants_json)
        if args is None:
            return code
        _Out.quiet, _Out.verbose = args.quiet, args.verbose
        progress.set_quiet(args.quiet)
        if not sys.stderr.isatty():  # libraries' own bars would write \r updates into logs
            os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        code = args.func(args)
        failed = _stdout_failure()
        if failed is not None:
            raise failed
        return code
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as a Unix tool does on SIGPIPE
        _silence(sys.stdout, sys.stderr)  # nothing more reaches the closed pipe, not even at exit
        return 141
    except Exception as e:  # noqa: BLE001 - every error ends as a message and an exit code, never a traceback
        if not signalled:  # after a signal, any error is the interrupt (a library may have wrapped it, in a pass say)
            if isinstance(e, OSError) and e.errno in OUTPUT_ERRNOS and _raised_by_a_print_here(e):
                _silence(sys.stdout)  # the result could not be written: say so where it can still be read
                print(f"error: cannot write the result to standard output: {e.strerror}", file=sys.stderr)
                return 2
            return _report_error(_as_user_error(e) or e, wants_json)
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)
        progress.set_quiet(False)
    if wants_json:
        _emit_json({"status": "interrupted", "exit_code": 130, "error": "interrupted; nothing was emitted"})
    print("interrupted; nothing was emitted", file=sys.stderr)
    return 130


if __name__ == "__main__":
    sys.exit(main())
