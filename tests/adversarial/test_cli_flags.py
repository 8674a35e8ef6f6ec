"""Adversarial command lines: unknown flags and commands, missing arguments, bad numbers, options that need
another, budgets that are not budgets. Each is exit 2 with the flag named, and under --json one JSON object on
stdout (argparse's own errors included)."""
import pytest

from optpipe.cli import parse_budget
from optpipe.errors import RecipeError

from .harness import base_recipe, run_cli, write

pytestmark = pytest.mark.timeout(30)

COMMANDS_WITH_RECIPE = ["build", "tune", "validate"]
COMMANDS_WITH_ARTIFACT = ["gate", "inspect", "verify"]


def _argv(command, recipe, art):
    return [command, str(recipe if command in COMMANDS_WITH_RECIPE else art)]


FLAG_CASES = {
    "unknown-flag": (lambda c, r, a: _argv(c, r, a) + ["--frobnicate"], r"unrecognized arguments: .*--frobnicate"),
    "missing-positional": (lambda c, r, a: [c], r"the following arguments are required"),
    "flag-missing-value": (lambda c, r, a: _argv(c, r, a) + ["--threads"], r"--threads: expected one argument"),
    "threads-word": (lambda c, r, a: _argv(c, r, a) + ["--threads", "many"], r"--threads: invalid int value: 'many'"),
    "threads-float": (lambda c, r, a: _argv(c, r, a) + ["--threads", "1.5"], r"--threads: invalid int value"),
}
FLAG_COMMANDS = {"unknown-flag": COMMANDS_WITH_RECIPE + COMMANDS_WITH_ARTIFACT + ["doctor", "passes", "targets"],
                 "missing-positional": COMMANDS_WITH_RECIPE + COMMANDS_WITH_ARTIFACT,
                 "flag-missing-value": ["build", "tune", "gate"], "threads-word": ["build", "tune", "gate"],
                 "threads-float": ["build", "gate"]}
CASES = [(name, c) for name, cs in FLAG_COMMANDS.items() for c in cs]


@pytest.fixture
def paths(tiny_llama, tmp_path):
    art = tmp_path / "art"
    art.mkdir()
    return write(tmp_path / "r.yaml", base_recipe(tiny_llama)), art


@pytest.mark.parametrize("name, command", CASES, ids=[f"{n}-{c}" for n, c in CASES])
def test_an_argparse_error_is_exit_2_and_json(name, command, paths, capsys):
    make, said = FLAG_CASES[name]
    run_cli(capsys, make(command, *paths), 2, said)


@pytest.mark.parametrize("argv, said", [
    ([], r"the following arguments are required: COMMAND"),
    (["frobnicate"], r"invalid choice: 'frobnicate'"),
    (["--threads", "2"], r"unrecognized arguments|invalid choice|required"),
    (["passes", "no-such-pass"], r"unknown pass 'no-such-pass'"),
    (["doctor", "--recipes", "/nonexistent/recipes"], r"--recipes: /nonexistent/recipes is not a directory"),
])
def test_top_level_mistakes_are_exit_2(argv, said, capsys):
    run_cli(capsys, argv, 2, said)


@pytest.mark.parametrize("threads", ["0", "-1", "999"])
@pytest.mark.parametrize("command", ["build", "gate"])
def test_a_thread_count_out_of_range_names_the_flag(threads, command, paths, tmp_path, capsys):
    argv = _argv(command, *paths) + ["--threads", threads]
    if command == "build":
        argv += ["-o", str(tmp_path / "o")]
    run_cli(capsys, argv, 2 if command == "build" else 4, r"--threads" if command == "build" else r"no manifest")


@pytest.mark.parametrize("flag", ["--max-ppl-increase", "--max-slowdown"])
def test_a_tolerance_without_against_says_what_it_needs(flag, paths, capsys):
    run_cli(capsys, ["gate", str(paths[1]), flag, "1.0"], 2, r"tolerances of --against")


@pytest.mark.parametrize("budget", ["nanh", "nanm", "infm", "inf h", "-5m", "0h", "0", "-3", "1e400m", "abc", "",
                                    "m", "h", "5x", "1.5"])
def test_a_budget_that_is_not_one_is_refused(budget):
    with pytest.raises(RecipeError, match=r"--budget"):
        parse_budget(budget)


@pytest.mark.parametrize("budget, parsed", [("30m", (30.0, None)), ("1.5h", (90.0, None)), ("24", (None, 24)),
                                            (" 2min ", (2.0, None))])
def test_a_budget_is_minutes_or_a_count(budget, parsed):
    assert parse_budget(budget) == parsed


def test_tune_with_a_nan_budget_is_exit_2(paths, capsys):
    run_cli(capsys, ["tune", str(paths[0]), "--budget", "nanh"], 2, r"--budget: 'nanh'")


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["build", "--help"], ["verify", "--help"]])
def test_help_and_version_under_json_are_one_json_object(argv, capsys):
    run_cli(capsys, argv, 0)


def test_doctor_reports_every_recipe_of_a_folder_even_broken_ones(tiny_llama, tmp_path, capsys):
    import json

    from optpipe.cli import main

    d = tmp_path / "recipes"
    d.mkdir()
    write(d / "a-good.yaml", base_recipe(tiny_llama))
    write(d / "b-complex-key.yaml", "? [a, b]\n: 1\n")
    write(d / "c-bad-type.yaml", {**base_recipe(tiny_llama), "seed": "x"})
    (d / "d-directory.yaml").mkdir()
    write(d / "e-good.yaml", base_recipe(tiny_llama))
    assert main(["doctor", "--recipes", str(d), "--json"]) == 0
    got = {k.rsplit("/", 1)[1]: v for k, v in json.loads(capsys.readouterr().out)["recipes"].items()}
    assert sorted(got) == ["a-good.yaml", "b-complex-key.yaml", "c-bad-type.yaml", "d-directory.yaml", "e-good.yaml"]
    assert got["a-good.yaml"]["buildable"] and got["e-good.yaml"]["buildable"]
    assert all(not got[k]["buildable"] and got[k]["reason"] for k in ("b-complex-key.yaml", "c-bad-type.yaml",
                                                                       "d-directory.yaml"))


@pytest.mark.parametrize("workers", ["0", "-2"])
def test_tune_ray_workers_below_one_is_exit_2(workers, paths, capsys):
    run_cli(capsys, ["tune", str(paths[0]), "--ray-workers", workers], 2, r"--ray-workers: must be a whole number >= 1")
