"""The lm-eval task gate: the adapter's scores against hand-computed ones, and the gate on a tiny random-init Llama —
passing the unchanged model, refusing a corrupted build, refusing unknown tasks before loading."""
import json
import math
from pathlib import Path

import numpy as np
import pytest

import optpipe
from optpipe.cli import main
from optpipe.errors import GateFailed
from optpipe.gates import tasks

from ..conftest import DATA, FUSED_INT4, _byte_tokenizer, tiny_recipe, write_recipe

pytest.importorskip("lm_eval")

SPEED = {"min_decode_speedup": 0.05, "prompt_tokens": 16, "new_tokens": 8, "repeats": 1, "threads": 1}


class Shifted:
    """A runner whose every position strongly predicts (its token + 1) mod 256: scores computable by hand."""

    def logits(self, ids):
        out = np.zeros((len(ids), 256), dtype=np.float32)
        out[np.arange(len(ids)), (np.asarray(ids) + 1) % 256] = 5.0
        return out

    def generate(self, ids, n, eos_token_id=None):
        class G:
            tokens = [(int(ids[-1]) + 1 + i) % 256 for i in range(n)]
        return G()


class Req:
    def __init__(self, *args):
        self.args = args


def test_adapter_scores_by_hand():
    tok = _byte_tokenizer()
    lm = tasks.runner_lm_class()(Shifted(), tok, max_length=64)
    ids = tok("ab", add_special_tokens=False)["input_ids"]
    follows = tok.decode([(ids[-1] + 1) % 256, (ids[-1] + 2) % 256])  # "cd": the next ids in the alphabet
    hit = 5.0 - math.log(math.exp(5.0) + 255)  # log-probability of the favoured token
    miss = -math.log(math.exp(5.0) + 255)
    (ll, greedy), (ll2, greedy2) = lm.loglikelihood([Req("ab", follows), Req("ab", follows[::-1])])
    assert ll == pytest.approx(2 * hit) and greedy
    assert ll2 == pytest.approx(2 * miss) and not greedy2
    # rolling: every token scored once; the first after the prefix (EOS) token
    text = tok.decode([10, 11, 12, 13])
    expect = (hit if (tok.eos_token_id + 1) % 256 == 10 else miss) + 3 * hit
    assert lm.loglikelihood_rolling([Req(text)])[0] == pytest.approx(expect)
    out = lm.generate_until([Req(text, {"until": [tok.decode([16])], "max_gen_toks": 5})])[0]
    assert out == tok.decode([14, 15])  # cut before the stop string


def _facts_task(tmp_path: Path, answers=None) -> Path:
    """The repo's facts task, its data file at an absolute path; `answers` replaces the answer column."""
    d = tmp_path / "tasks"
    d.mkdir(exist_ok=True)
    src = DATA / "lm_eval"
    rows = [json.loads(line) for line in (src / "facts.jsonl").read_text().splitlines()]
    for row, a in zip(rows, answers or [r["answer"] for r in rows]):
        row["answer"] = a
    (d / "facts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "optpipe_facts.yaml").write_text(
        (src / "optpipe_facts.yaml").read_text().replace("FACTS_JSONL", str(d / "facts.jsonl")))
    return d


def _reference_preferences(model_dir: Path, per_char: bool = False) -> list[int]:
    """The choice the tiny fp32 model itself prefers on each document (by log-likelihood, or per character as
    lm-eval's acc_norm): on that task the reference scores 1.0, so a broken candidate shows as a drop rather than
    as chance against chance."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optpipe.targets.torch_eager import TorchEagerRunner

    lm = tasks.runner_lm_class()(TorchEagerRunner(AutoModelForCausalLM.from_pretrained(model_dir), 1),
                                 AutoTokenizer.from_pretrained(model_dir), 128)
    rows = [json.loads(line) for line in (DATA / "lm_eval" / "facts.jsonl").read_text().splitlines()]
    return [int(np.argmax([ll / (len(c) if per_char else 1) for (ll, _), c in zip(
        lm.loglikelihood([Req(r["question"], c) for c in r["choices"]]), r["choices"])])) for r in rows]


def test_task_gate_passes_the_same_model_and_refuses_a_corrupted_build(tiny_llama, tmp_path, capsys):
    gate = {"max_ppl_delta_pct": 1000, "task_paths": [str(_facts_task(tmp_path, _reference_preferences(tiny_llama)))],
            "tasks": [{"name": "optpipe_facts", "max_drop": 0.0}]}
    # the export alone against fp32-onnx: the same scores document by document, a zero drop with zero width
    same = optpipe.build(tiny_recipe(tiny_llama, [{"name": "export"}], accuracy={**gate, "reference": "fp32-onnx"},
                                     speed=SPEED), output=tmp_path / "same", log=lambda m: None)
    t = same.manifest["gates"]["tasks"]
    assert t["status"] == "passed" and t["tasks"]["optpipe_facts"]["docs"] == 40
    f = t["tasks"]["optpipe_facts"]
    assert f["reference"] == 1.0 and f["drop"] == 0.0 and f["drop_ci95"] == [0.0, 0.0]
    assert "## Gate: tasks" in (same.artifact_path / "report.md").read_text()

    broken = FUSED_INT4 + [{"name": "corrupt-scales", "path": str(DATA / "corrupt_scales.py")}]
    # scrambled INT4 scales flip some of the reference's choices (on this random model the embedding path, which
    # is not quantized, decides most of them: +10% perplexity, a few documents)
    point = {**gate, "decide_on": "point"}
    with pytest.raises(GateFailed, match=r"tasks: task optpipe_facts: acc drop \+0\.\d+ \(point estimate.* exceeds "
                                         r"max_drop 0.0") as e:
        optpipe.build(tiny_recipe(tiny_llama, broken, accuracy=point, speed=SPEED), output=tmp_path / "bad",
                      allow_plugins=True, log=lambda m: None)
    m = e.value.report["manifest"]["gates"]["tasks"]["tasks"]["optpipe_facts"]
    assert m["reference"] == 1.0 and m["candidate"] < 1.0 and m["drop_ci95"][0] <= m["drop"] <= m["drop_ci95"][1]
    assert not (tmp_path / "bad").exists()


class Scrambled:
    """A candidate whose next-token scores belong to other tokens (the reference's, rolled along the vocabulary)."""

    def __init__(self, runner):
        self.runner = runner

    def logits(self, ids):
        return np.roll(self.runner.logits(ids), 7, axis=-1)


def test_a_scrambled_candidate_is_refused_on_the_drop_interval(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optpipe.recipe import TaskGate
    from optpipe.targets.torch_eager import TorchEagerRunner

    paths = [str(_facts_task(tmp_path, _reference_preferences(tiny_llama, per_char=True)))]
    ref = TorchEagerRunner(AutoModelForCausalLM.from_pretrained(tiny_llama), 1)
    spec = [TaskGate(name="optpipe_facts", max_drop=0.1, metric="acc_norm")]
    m = tasks.measure(ref, Scrambled(ref), AutoTokenizer.from_pretrained(tiny_llama), spec, paths, 128)
    f = m["optpipe_facts"]
    assert f["metric"] == "acc_norm" and f["reference"] == 1.0 and f["candidate"] <= 0.8 and f["drop_ci95"][0] > 0.1
    r = tasks.check(m, spec, "upper_95")
    assert not r.passed and "exceeds max_drop 0.1" in r.failures[0] and "over 40 documents" in r.failures[0]


def test_unknown_task_and_missing_paths_are_refused_before_loading(tiny_llama, tmp_path, capsys):
    paths = [str(_facts_task(tmp_path))]
    recipe = write_recipe(tmp_path, tiny_recipe(tiny_llama, FUSED_INT4, accuracy={
        "task_paths": paths, "tasks": [{"name": "optpipe_factz", "max_drop": 0.1}]}))
    assert main(["validate", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "gates.accuracy.tasks[0].name: unknown lm-eval task 'optpipe_factz'" in err and "optpipe_facts" in err
    recipe = write_recipe(tmp_path, tiny_recipe(tiny_llama, FUSED_INT4, accuracy={
        "task_paths": ["no/such/dir"], "tasks": [{"name": "optpipe_facts", "max_drop": 0.1}]}), "r2.yaml")
    assert main(["validate", str(recipe)]) == 2
    assert "gates.accuracy.task_paths[0]" in capsys.readouterr().err
    recipe = write_recipe(tmp_path, tiny_recipe(tiny_llama, FUSED_INT4, accuracy={
        "task_paths": paths, "tasks": [{"name": "optpipe_facts", "max_drop": -1}]}), "r3.yaml")
    assert main(["validate", str(recipe)]) == 2
    assert "gates.accuracy.tasks.0.max_drop" in capsys.readouterr().err.replace("[0]", ".0")


def test_gate_check_decides_on_the_stated_statistic():
    from optpipe.recipe import TaskGate

    m = {"optpipe_facts": {"metric": "acc", "drop": 0.02, "drop_ci95": [-0.01, 0.05], "docs": 40,
                           "reference": 0.8, "candidate": 0.78}}
    spec = [TaskGate(name="optpipe_facts", max_drop=0.03)]
    assert tasks.check(json.loads(json.dumps(m)), spec, "point").passed
    r = tasks.check(json.loads(json.dumps(m)), spec, "upper_95")
    assert not r.passed and "upper 95% bound" in r.failures[0] and "+0.0500" in r.failures[0]
