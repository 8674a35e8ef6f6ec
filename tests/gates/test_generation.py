"""The generation gate on runners whose behaviour is known: identical, diverging, looping, stopping early."""
import numpy as np
import pytest

from optpipe.gates import generation
from optpipe.recipe import GenerationGate
from optpipe.runtime.generation import Generation

V = 50


class Scripted:
    """Next token = `rule(previous tokens)`; logits put all mass on it (so teacher forcing is exact)."""

    def __init__(self, rule):
        self.rule = rule

    def logits(self, ids):
        out = np.full((len(ids), V), -10.0, dtype=np.float32)
        for i in range(len(ids)):
            out[i, self.rule(list(ids[:i + 1]))] = 10.0
        return out

    def generate(self, ids, max_new_tokens, eos_token_id=None, pick=None, on_token=None):
        seq, toks = list(ids), []
        while len(toks) < max_new_tokens:
            t = self.rule(seq)
            toks.append(t)
            seq.append(t)
            if t == eos_token_id:
                break
        return Generation(toks, 0.0, 0.0)


def counting(seq):  # a varied continuation: no 4-gram repeats within 32 tokens
    return (seq[-1] * 7 + len(seq)) % (V - 1) + 1


WINDOWS = [np.arange(1, 200, dtype=np.int64) % (V - 1) + 1]


def run(candidate, eos=None, **gate):
    g = GenerationGate(prompts=3, prompt_tokens=8, new_tokens=32, **gate)
    m = generation.measure(Scripted(counting), candidate, generation.prompts(WINDOWS, 3, 8), 32, eos)
    return generation.check(m, g)


def test_identical_generation_passes_with_full_agreement():
    r = run(Scripted(counting), min_teacher_forced_agreement=0.99, min_mean_first_divergence=32)
    assert r.passed and r.metrics["mean_first_divergence"] == 32 and r.metrics["teacher_forced_agreement"] == 1.0


def test_divergence_is_the_first_differing_position():
    late = Scripted(lambda s: counting(s) if len(s) < 8 + 10 else (counting(s) % (V - 2)) + 1)
    r = run(late, min_mean_first_divergence=20)
    assert r.metrics["first_divergence"] == [10, 10, 10] and r.passed is False
    assert "mean first divergence 10.0 tokens below min_mean_first_divergence 20" in r.failures[0]


def test_a_repetition_loop_is_degenerate():
    loop = Scripted(lambda s: [3, 4, 5][len(s) % 3])
    r = run(loop)
    assert r.passed is False and r.metrics["repetition_candidate"] > 0.8
    assert any(f.startswith("degenerate output: repeated 4-grams") for f in r.failures)
    assert any("teacher-forced" in f for f in run(loop, min_teacher_forced_agreement=0.5).failures)


def test_stopping_far_earlier_than_the_reference_is_degenerate():
    early = Scripted(lambda s: 0 if len(s) >= 8 + 4 else counting(s))
    r = run(early, eos=0)
    assert r.passed is False and r.metrics["length_candidate"] == 15 and r.metrics["length_reference"] == 96
    assert any("generated 15 tokens vs 96" in f for f in r.failures)


def test_helpers_by_hand():
    assert generation.repetition([1, 2, 3, 4, 1, 2, 3, 4]) == pytest.approx(0.2)  # 5 4-grams, 1 seen before
    assert generation.repetition([1, 2]) == 0.0
    assert generation.first_divergence([1, 2, 3], [1, 2, 4]) == 2 and generation.first_divergence([1], [1, 5]) == 1
    ps = generation.prompts(WINDOWS, 4, 10)
    assert len(ps) == 4 and all(p.size == 10 for p in ps) and ps[0][0] == WINDOWS[0][0]
    assert generation.check({"prompts": 0}, GenerationGate(prompts=0)).passed is None
