"""Adversarial recipes: every typed field given a value of the wrong kind, raw YAML a parser can choke on, and
opt-in variables: `optpipe validate` answers each with exit 2 naming the file and the field, never a traceback."""
import os

import pytest

from optpipe.hw import usable_cpus

from .harness import base_recipe, run_cli, set_path, write

pytestmark = pytest.mark.timeout(30)

# (field path, what the message must name)
NUMBER_FIELDS = [
    (("gates", "speed", "repeats"), r"gates\.speed\.repeats"),
    (("gates", "speed", "max_repeats"), r"gates\.speed\.max_repeats"),
    (("gates", "speed", "prompt_tokens"), r"gates\.speed\.prompt_tokens"),
    (("gates", "speed", "new_tokens"), r"gates\.speed\.new_tokens"),
    (("gates", "speed", "threads"), r"gates\.speed\.threads"),
    (("gates", "speed", "min_decode_speedup"), r"gates\.speed\.min_decode_speedup"),
    (("gates", "speed", "max_background_cpus"), r"gates\.speed\.max_background_cpus"),
    (("gates", "accuracy", "max_ppl_delta_pct"), r"gates\.accuracy\.max_ppl_delta_pct"),
    (("gates", "accuracy", "max_mean_kl"), r"gates\.accuracy\.max_mean_kl"),
    (("gates", "accuracy", "min_top1_agreement"), r"gates\.accuracy\.min_top1_agreement"),
    (("evaluation", "window"), r"evaluation\.window"),
    (("evaluation", "max_tokens"), r"evaluation\.max_tokens"),
    (("calibration", "window"), r"calibration\.window"),
    (("passes", 2, "max_length"), r"passes\[2\]\.max_length"),
    (("passes", 3, "block_size"), r"passes\[3\]\.block_size"),
    (("passes", 3, "accuracy_level"), r"passes\[3\]\.accuracy_level"),
    (("seed",), r"seed"),
]
WRONG_KINDS = {"true": True, "false": False, "word": "fast", "list": [1, 2], "mapping": {"a": 1}}
TEXT_FIELDS = [
    (("name",), r"name"), (("target",), r"target"), (("evaluation", "source"), r"evaluation\.source"),
    (("gates", "accuracy", "decide_on"), r"gates\.accuracy\.decide_on"),
    (("gates", "speed", "unmeasured"), r"gates\.speed\.unmeasured"), (("passes", 0, "name"), r"passes\[0\]\.name"),
]
TEXT_WRONG = {"number": 12, "list": ["a"], "mapping": {"a": 1}, "null": None}
RANGE_CASES = [
    (("gates", "speed", "repeats"), 0), (("gates", "speed", "repeats"), 10 ** 9),
    (("gates", "speed", "threads"), usable_cpus() + 1),  # refused at validate, not after loading at build
    (("gates", "speed", "threads"), 0), (("gates", "speed", "threads"), -1), (("gates", "speed", "new_tokens"), 1),
    (("gates", "accuracy", "max_ppl_delta_pct"), -1), (("gates", "accuracy", "min_top1_agreement"), 1.5),
    (("gates", "accuracy", "max_ppl_delta_pct"), float("nan")), (("gates", "speed", "min_decode_speedup"), float("inf")),
    (("evaluation", "window"), 8), (("evaluation", "max_tokens"), 0), (("passes", 2, "max_length"), 8),
    (("passes", 3, "block_size"), 48), (("passes", 3, "accuracy_level"), 9),
]


def _cases():
    for path, said in NUMBER_FIELDS:
        for kind, value in WRONG_KINDS.items():
            yield f"{'.'.join(map(str, path))}={kind}", path, value, said
    for path, said in TEXT_FIELDS:
        for kind, value in TEXT_WRONG.items():
            yield f"{'.'.join(map(str, path))}={kind}", path, value, said
    for path, value in RANGE_CASES:
        yield f"{'.'.join(map(str, path))}={value}", path, value, r"\.".join(str(p) if isinstance(p, str) else "" for p
                                                                               in path[-1:])


CASES = list(_cases())


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_a_wrong_value_is_refused_naming_the_field(case, tiny_llama, tmp_path, capsys):
    _, path, value, said = case
    recipe = base_recipe(tiny_llama)
    set_path(recipe, path, value)
    file = write(tmp_path / "r.yaml", recipe)
    err = run_cli(capsys, ["validate", str(file)], 2, said)
    assert str(file) in err


RAW = {
    "complex-key": ("? [a, b]\n: 1\n", r"a key must be a plain value"),
    "complex-key-nested": ("name: x\ngates:\n  ? {a: 1}\n  : 2\n", r"a key must be a plain value"),
    "duplicate-key": ("name: a\nname: b\n", r"duplicate key 'name'"),
    "tab-indent": ("name: a\n\tmodel: b\n", r"not valid YAML"),
    "unclosed-flow": ("passes: [\n", r"not valid YAML"),
    "python-tag": ("name: !!python/object/apply:os.system ['true']\n", r"not valid YAML"),
    "alias-bomb": ("a: &a [x,x,x,x,x,x,x,x,x,x]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,"
                   "*b,*b,*b]\nd: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c]\ne: [*d,*d,*d,*d,*d,*d,*d,*d,*d,*d]\n",
                   r"expands to more than"),
    "top-level-list": ("- a\n- b\n", r"a recipe is a mapping"),
    "top-level-scalar": ("hello\n", r"a recipe is a mapping"),
    "empty": ("", r"a recipe is a mapping"),
    "only-comment": ("# nothing\n", r"a recipe is a mapping"),
    "deep-nesting": ("a: " + "[" * 5000 + "]" * 5000 + "\n", r"nested too deeply|not valid YAML"),
    "unknown-top-key": ("name: a\nmodel: builtin:smollm2-135m\ntarget: cpu-onnx\npasses: [{name: export}]\nbogus: 1\n",
                        r"bogus"),
    "merge-key-of-a-list": ("base: &b [1]\nname: a\n<<: *b\n", r"not valid YAML"),
}


@pytest.mark.parametrize("name", sorted(RAW))
def test_raw_yaml_is_refused_with_exit_2(name, tmp_path, capsys):
    text, said = RAW[name]
    file = write(tmp_path / "r.yaml", text)
    run_cli(capsys, ["validate", str(file)], 2, said)


def test_yaml_merge_keys_are_standard_yaml_and_accepted(tiny_llama, tmp_path, capsys):
    """`<<: *anchor` (and `<<: {...}`) merges a mapping; a key of the mapping itself overrides a merged one."""
    body = write(tmp_path / "m.yaml", f"name: merged\nmodel: {tiny_llama}\ntarget: cpu-onnx\n"
                 "passes: [{name: export}]\ngates:\n  speed: {min_decode_speedup: 0.05, threads: 1}\n"
                 "  accuracy: &acc {max_ppl_delta_pct: 4.0, decide_on: point}\n"
                 "  regression: {<<: {max_ppl_delta_pct: 1.0}, max_decode_slowdown_pct: 5}\n")
    run_cli(capsys, ["validate", str(body)], 0)
    from optpipe.recipe import load_recipe

    r = load_recipe(body)
    assert r.gates.regression.max_ppl_delta_pct == 1.0 and r.gates.regression.max_decode_slowdown_pct == 5
    over = write(tmp_path / "o.yaml", body.read_text() + "evaluation: {<<: {window: 64, source: builtin:evaluation}, window: 128}\n")
    assert load_recipe(over).evaluation.window == 128  # the mapping's own key wins over the merged one


def test_a_directory_given_as_the_recipe_says_so(tmp_path, capsys):
    run_cli(capsys, ["validate", str(tmp_path)], 2, r"is a directory, not a recipe file")


def test_a_fifo_given_as_the_recipe_is_refused_without_blocking(tmp_path, capsys):
    fifo = tmp_path / "r.yaml"
    os.mkfifo(fifo)
    run_cli(capsys, ["validate", str(fifo)], 2, r"is a FIFO, not a regular file")


@pytest.mark.parametrize("where", ["recipe", "model", "env", "output"])
def test_a_path_component_over_255_bytes_is_exit_2(where, tiny_llama, tmp_path, capsys, monkeypatch):
    long = "x" * 300
    recipe = write(tmp_path / "r.yaml", base_recipe(tiny_llama))
    argv = {"recipe": ["validate", str(tmp_path / long / "r.yaml")],
            "model": ["validate", str(recipe), "--model", str(tmp_path / long)],
            "env": ["validate", str(write(tmp_path / "e.yaml", {**base_recipe(tiny_llama), "model": "${LONG_MODEL}"}))],
            "output": ["build", str(recipe), "-o", str(tmp_path / long)]}[where]
    monkeypatch.setenv("LONG_MODEL", str(tmp_path / long))
    run_cli(capsys, argv, 2, r"300 bytes long")


@pytest.mark.parametrize("value", ["${OPTPIPE_EMPTY_MODEL:-}", "${OPTPIPE_EMPTY_MODEL}"])
def test_an_empty_expansion_names_the_variable(value, tiny_llama, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OPTPIPE_EMPTY_MODEL", "")
    file = write(tmp_path / "r.yaml", {**base_recipe(tiny_llama), "model": value})
    run_cli(capsys, ["validate", str(file)], 2, r"model\.source.*OPTPIPE_EMPTY_MODEL")


def _plugin_recipe(tmp_path, tiny_llama):
    from ..conftest import ROOT

    marker = tmp_path / "plugin-ran"
    plugin = tmp_path / "plugin.py"
    plugin.write_text((ROOT / "passes" / "embedding_fp16.py").read_text() + f"\nopen({str(marker)!r}, 'w').write('x')\n")
    recipe = base_recipe(tiny_llama)
    recipe["passes"].append({"name": "embedding-fp16", "path": str(plugin)})
    return write(tmp_path / "r.yaml", recipe), marker


@pytest.mark.parametrize("value", ["", "0", "false", "False", "FALSE", "no", "No", "off", "OFF", " off "])
def test_plugins_stay_off_for_every_no(value, tiny_llama, tmp_path, capsys, monkeypatch):
    file, marker = _plugin_recipe(tmp_path, tiny_llama)
    monkeypatch.setenv("OPTPIPE_ALLOW_PLUGINS", value)
    run_cli(capsys, ["validate", str(file)], 2, r"is plugin code, which is not run unless allowed")
    assert not marker.exists()


@pytest.mark.parametrize("value", ["2", "maybe", "y", "enable", "truee", "1 0", "-1", "ja"])
def test_an_unrecognized_opt_in_is_refused_naming_the_variable(value, tiny_llama, tmp_path, capsys, monkeypatch):
    file, marker = _plugin_recipe(tmp_path, tiny_llama)
    monkeypatch.setenv("OPTPIPE_ALLOW_PLUGINS", value)
    run_cli(capsys, ["validate", str(file)], 2, r"OPTPIPE_ALLOW_PLUGINS=.*not a yes/no value")
    assert not marker.exists()


@pytest.mark.parametrize("value", ["1", "true", "True", "YES", "on", "On"])
def test_every_yes_allows_plugins(value, tiny_llama, tmp_path, capsys, monkeypatch):
    file, marker = _plugin_recipe(tmp_path, tiny_llama)
    monkeypatch.setenv("OPTPIPE_ALLOW_PLUGINS", value)
    run_cli(capsys, ["validate", str(file)], 0, json_too=False)
    assert marker.exists()


PATH_FIELDS = {  # a path field given a value no filesystem can name
    "model": (("model",), r"model(\.source)?"),
    "evaluation": (("evaluation", "source"), r"evaluation\.source"),
    "calibration": (("calibration", "source"), r"calibration\.source"),
    "output": (("output",), r"output"),
    "reference": (("gates", "accuracy", "reference"), r"gates\.accuracy\.reference"),
    "baseline": (("gates", "speed", "baseline"), r"gates\.speed\.baseline"),
    "task-path": (("gates", "accuracy", "task_paths"), r"gates\.accuracy\.task_paths"),
    "plugin": (("passes", 4), r"passes\[4\]\.path"),
}
BAD_PATHS = {"nul": "a\0b", "long-component": "/tmp/" + "y" * 300 + "/m", "empty": ""}


@pytest.mark.parametrize("bad", sorted(BAD_PATHS))
@pytest.mark.parametrize("field", sorted(PATH_FIELDS))
def test_a_path_no_filesystem_can_name_is_refused_naming_the_field(field, bad, tiny_llama, tmp_path, capsys):
    path, said = PATH_FIELDS[field]
    value = BAD_PATHS[bad]
    recipe = base_recipe(tiny_llama)
    if field == "task-path":
        value = [value]
    if field == "plugin":
        recipe["passes"].append({"name": "embedding-fp16", "path": value})
    else:
        set_path(recipe, path, value)
    run_cli(capsys, ["validate", str(write(tmp_path / "r.yaml", recipe)), "--allow-plugins"], 2, said)


@pytest.mark.parametrize("seed", [-1, 2 ** 32, 2 ** 70])
def test_a_seed_outside_32_bits_is_refused(seed, tiny_llama, tmp_path, capsys):
    run_cli(capsys, ["validate", str(write(tmp_path / "r.yaml", {**base_recipe(tiny_llama), "seed": seed}))], 2,
            r"seed")
