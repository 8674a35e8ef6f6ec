"""The runner API a Hugging Face user expects: tokenizer attached, text in and out, streaming, sampling,
and input checked before any compute (batch, range, empty, static-cache overflow, threads)."""
import numpy as np
import pytest

import optpipe
from optpipe.runtime import sampler

from ..conftest import FUSED_INT4, tiny_recipe


@pytest.fixture(scope="module")
def model(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("loaded") / "art"
    optpipe.build(tiny_recipe(tiny_llama, FUSED_INT4), output=out, log=lambda m: None)
    return optpipe.load(out, threads=1)


def test_text_in_text_out_matches_ids(model):
    c = model.generate("hello world", max_new_tokens=6, eos_token_id=None)
    assert len(c.tokens) == 6 and isinstance(c.text, str) and c.finish_reason == "length"
    ids = model.tokenizer("hello world", add_special_tokens=False)["input_ids"]
    assert c.prompt_ids == ids
    assert model.generate(np.array(ids), 6, eos_token_id=None).tokens == c.tokens
    assert model.generate(np.array([ids]), 6, eos_token_id=None).tokens == c.tokens  # [1, N] batch of one
    assert c.text == model.tokenizer.decode(c.tokens, skip_special_tokens=True)


def test_streaming_reports_every_token_and_the_same_text(model):
    pieces = []
    c = model.generate("abc", 8, eos_token_id=None, stream=lambda text, tok: pieces.append((text, tok)))
    assert [t for _, t in pieces if t != -1] == c.tokens
    assert "".join(t for t, _ in pieces) == c.text


def test_sampling_is_seeded_and_differs_from_greedy(model):
    a = model.generate("abc", 12, eos_token_id=None, temperature=1.5, seed=7).tokens
    b = model.generate("abc", 12, eos_token_id=None, temperature=1.5, seed=7).tokens
    greedy = model.generate("abc", 12, eos_token_id=None).tokens
    assert a == b and a != greedy
    assert model.generate("abc", 12, eos_token_id=None, temperature=1.0, top_p=1e-9, seed=1).tokens == greedy


def test_sampler_arithmetic():
    assert sampler(0.0) is None
    pick = sampler(1.0, top_p=0.5, seed=0)
    logits = np.log(np.array([0.6, 0.3, 0.1]))
    assert {pick(logits) for _ in range(50)} == {0}  # top_p 0.5: only the most likely token is kept
    pick = sampler(1.0, top_p=0.85, seed=0)
    assert {pick(logits) for _ in range(200)} == {0, 1}


@pytest.mark.parametrize("prompt,match", [
    (np.zeros((2, 5), dtype=np.int64), "batch of one"),
    (np.array([], dtype=np.int64), "empty"),
    ("", "empty"),
    (np.array([1, 2, 999]), "outside the vocabulary"),
    (np.array([1, -1]), "outside the vocabulary"),
    (np.array([1.5, 2.0]), "integers"),
])
def test_bad_prompts_are_refused_before_running(model, prompt, match):
    with pytest.raises(optpipe.InputError, match=match):
        model.generate(prompt, 4)


def test_lengths_are_checked_before_generating(model):
    assert model.max_length == 256
    assert model.generate("abc", 0).tokens == []
    with pytest.raises(optpipe.InputError, match="max_new_tokens"):
        model.generate("abc", -1)
    with pytest.raises(optpipe.InputError, match="nothing was generated"):
        model.generate(np.arange(1, 200), 100)
    with pytest.raises(optpipe.InputError, match="exceed"):
        model.logits(np.ones(300, dtype=np.int64))
    with pytest.raises(optpipe.InputError, match="temperature"):
        model.generate("abc", 2, temperature=-1)


@pytest.mark.parametrize("threads", [0, -1, 100000, 2.5, True])
def test_threads_are_validated(model, threads):
    with pytest.raises(optpipe.InputError, match="threads"):
        optpipe.load(model.path, threads=threads)
