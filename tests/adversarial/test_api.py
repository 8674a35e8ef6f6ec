"""Adversarial Python API calls: `optpipe.load` and `generate` with arguments of the wrong kind or range. Each is
an InputError (a ValueError, exit 2 in the CLI) naming the argument, never numpy's or onnxruntime's own error."""
import shutil

import numpy as np
import pytest

import optpipe

from ..conftest import FUSED_INT4, tiny_recipe

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(scope="module")
def model(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("adv-api") / "art"
    res = optpipe.build(tiny_recipe(tiny_llama, FUSED_INT4), output=out, log=lambda m: None)
    return optpipe.load(out, threads=1, digest=res.digest)


GENERATE = {
    "seed-negative": ({"seed": -1}, r"seed must be None or a whole number >= 0, got -1"),
    "seed-bool": ({"seed": True}, r"seed must be"),
    "seed-text": ({"seed": "1"}, r"seed must be"),
    "seed-float": ({"seed": 1.5}, r"seed must be"),
    "temperature-text": ({"temperature": "hot"}, r"temperature must be a number"),
    "temperature-nan": ({"temperature": float("nan")}, r"temperature must be"),
    "temperature-negative": ({"temperature": -0.1}, r"temperature must be"),
    "temperature-none": ({"temperature": None}, r"temperature must be"),
    "top-p-zero": ({"top_p": 0}, r"top_p must be"),
    "top-p-above-one": ({"top_p": 1.5}, r"top_p must be"),
    "top-p-text": ({"top_p": "all", "temperature": 1.0}, r"top_p must be"),
    "max-new-negative": ({"max_new_tokens": -1}, r"max_new_tokens must be"),
    "max-new-bool": ({"max_new_tokens": True}, r"max_new_tokens must be"),
    "max-new-float": ({"max_new_tokens": 2.5}, r"max_new_tokens must be"),
    "max-new-too-many": ({"max_new_tokens": 10 ** 6}, r"exceed the artifact's 256-token limit"),
}


@pytest.mark.parametrize("name", sorted(GENERATE))
def test_a_generate_setting_out_of_range_is_an_input_error(name, model):
    kwargs, said = GENERATE[name]
    with pytest.raises(optpipe.InputError, match=said):
        model.generate([1, 2, 3], **{"max_new_tokens": 4, **kwargs})


PROMPTS = {
    "id-2^63": ([2 ** 63], r"token id 9223372036854775808 is outside the vocabulary"),
    "id-2^64-1": (np.array([2 ** 64 - 1], dtype=np.uint64), r"token id 18446744073709551615 is outside"),
    "id-2^70": ([2 ** 70], r"token id 1180591620717411303424 is outside"),
    "id-negative": ([-1], r"token id -1 is outside"),
    "id-vocab": ([256], r"token id 256 is outside the vocabulary \[0, 256\)"),
    "floats": ([1.5, 2.0], r"token ids must be integers"),
    "strings-list": (["a", "b"], r"token ids must be integers"),
    "bools": ([True, False], r"token ids must be integers"),
    "batch-of-two": ([[1, 2], [3, 4]], r"batch > 1 is not supported"),
    "three-d": (np.zeros((1, 1, 2), dtype=np.int64), r"token ids must be 1-D"),
    "empty-list": ([], r"the prompt is empty"),
    "empty-text": ("", r"the prompt is empty"),
    "too-long": (list(range(200)) * 2, r"exceed the artifact's 256-token limit"),
    "mixed-object": ([1, "x"], r"token ids must be integers"),
}


@pytest.mark.parametrize("name", sorted(PROMPTS))
def test_a_prompt_that_is_not_token_ids_is_an_input_error(name, model):
    prompt, said = PROMPTS[name]
    with pytest.raises(optpipe.InputError, match=said):
        model.generate(prompt, 2)


@pytest.mark.parametrize("threads", [0, -1, 10 ** 6, "2", 1.5, True])
def test_load_with_a_thread_count_out_of_range_is_an_input_error(threads, model, tmp_path):
    art = tmp_path / "a"
    shutil.copytree(model.path, art)
    with pytest.raises(optpipe.InputError, match=r"threads"):
        optpipe.load(art, threads=threads)


def test_every_refusal_is_a_value_error_and_an_optpipe_error(model):
    with pytest.raises(ValueError) as e:
        model.generate([1], 2, seed=-1)
    assert isinstance(e.value, optpipe.OptpipeError) and e.value.exit_code == 2
