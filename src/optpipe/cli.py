"""`optpipe` command line: build, gate, validate, inspect, verify, doctor.

Exit codes: 0 ok, 1 build failure, 2 bad recipe/arguments/model, 3 a gate refused the artifact, 4 artifact problem.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from pathlib import Path

from .errors import GateFailed, OptpipeError


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _print_gates(gates: dict) -> None:
    for name, g in gates.items():
        keys = [k for k in g if k not in ("thresholds", "failures", "runs", "runs_columns", "passed")
                and not isinstance(g[k], list)]
        print(f"{name}: " + ", ".join(f"{k}={g[k]}" for k in keys))
        for f in g.get("failures", []):
            print(f"  FAILED: {f}")


def cmd_build(a) -> int:
    from .builder import build

    res = build(a.recipe, a.output, keep_rejected=a.keep_rejected, overwrite=a.overwrite, threads=a.threads, log=_log)
    _print_gates(res.manifest["gates"])
    print(f"artifact: {res.artifact_path}")
    return 0


def cmd_gate(a) -> int:
    from .builder import gate

    res = gate(a.artifact, eval_data=a.eval_data, threads=a.threads, log=_log)
    _print_gates(res.manifest["gates"])
    print("gates passed")
    return 0


def cmd_validate(a) -> int:
    from .pipeline import validate_pass_chain
    from .recipe import load_recipe

    r = load_recipe(a.recipe)
    validate_pass_chain(r, str(a.recipe))
    print(f"{a.recipe}: ok ({r.target}, passes: {', '.join(p.name for p in r.passes)})")
    return 0


def cmd_inspect(a) -> int:
    from .artifact import read_manifest

    m = read_manifest(Path(a.artifact))
    if a.json:
        print(json.dumps(m, indent=2))
        return 0
    print(f"{m['recipe']['name']}  [{m['status']}]  target={m['recipe']['target']}  model={m['recipe']['model']['source']}")
    print(f"built {m['created_utc']} in {m['build_seconds']} s; {m['artifact_bytes'] / 1e6:.1f} MB in {len(m['files'])} files")
    for p in m["passes"]:
        ch = ", ".join(f"{k}={v}" for k, v in p["changes"].items() if not isinstance(v, (dict, list)))
        print(f"  pass {p['name']:<16} {p['seconds']:>7.1f}s  {ch}")
    _print_gates(m["gates"])
    return 0


def cmd_verify(a) -> int:
    from .artifact import read_manifest, verify
    from .errors import ArtifactError

    problems = verify(Path(a.artifact))
    if problems:
        raise ArtifactError(f"{a.artifact}: {len(problems)} problem(s):\n  " + "\n  ".join(problems))
    print(f"{a.artifact}: {len(read_manifest(Path(a.artifact))['files'])} files match the manifest")
    return 0


def cmd_doctor(a) -> int:
    from . import hw

    env = hw.environment()
    if a.json:
        print(json.dumps(env, indent=2))
        return 0
    print(f"cpu: {env['cpu']} ({env['machine']}), {env['physical_cores']} physical cores, {env['logical_cpus']} logical")
    print("isa: " + ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in env["isa"].items()))
    print("versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="optpipe", description="Build, measure and refuse optimized model artifacts.")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build a recipe into a gated artifact")
    b.add_argument("recipe")
    b.add_argument("-o", "--output", help="artifact directory (default: the recipe's `output`)")
    b.add_argument("--keep-rejected", action="store_true", help="keep a refused candidate at OUTPUT.rejected")
    b.add_argument("--overwrite", action="store_true", help="replace an existing artifact at OUTPUT")
    b.add_argument("--threads", type=int, help="threads for gates (default: recipe, else physical cores)")
    b.set_defaults(func=cmd_build)
    g = sub.add_parser("gate", help="re-run the accuracy and speed gates on an artifact")
    g.add_argument("artifact")
    g.add_argument("--eval-data", help="evaluation text (.txt/.jsonl/.parquet or a dataset name)")
    g.add_argument("--threads", type=int)
    g.set_defaults(func=cmd_gate)
    v = sub.add_parser("validate", help="check a recipe without building")
    v.add_argument("recipe")
    v.set_defaults(func=cmd_validate)
    i = sub.add_parser("inspect", help="what was built, by which passes, with which gate figures")
    i.add_argument("artifact")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_inspect)
    ve = sub.add_parser("verify", help="check every file against the manifest's sha256")
    ve.add_argument("artifact")
    ve.set_defaults(func=cmd_verify)
    d = sub.add_parser("doctor", help="CPU ISA, cores and library versions")
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=cmd_doctor)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parser().parse_args(argv)
    on_main = threading.current_thread() is threading.main_thread()  # signal handlers only exist there
    signalled: list[int] = []

    def on_sigterm(signum, frame):
        signalled.append(signum)
        raise KeyboardInterrupt

    if on_main:
        # `kill` (SIGTERM) unwinds like Ctrl-C, so the staging directory is removed and nothing is half-written
        signal.signal(signal.SIGTERM, on_sigterm)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        pass
    except Exception as e:
        if not signalled:  # after a signal, any error is the interrupt (a library may have wrapped it, in a pass say)
            if isinstance(e, GateFailed):
                gates = (e.report.get("manifest") or e.report).get("gates")
                if gates:
                    _print_gates(gates)
            if not isinstance(e, OptpipeError):
                raise
            print(f"error: {e}", file=sys.stderr)
            return e.exit_code
    finally:
        if on_main:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
    print("interrupted; nothing was emitted", file=sys.stderr)
    return 130


if __name__ == "__main__":
    sys.exit(main())
