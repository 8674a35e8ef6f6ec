"""The decode loop every runner shares: positions, stopping, streaming, timing."""
import numpy as np

from optpipe.runtime.generation import Generation, decode, greedy


def _one_hot(token: int, vocab: int = 10) -> np.ndarray:
    row = np.zeros(vocab, np.float32)
    row[token] = 1.0
    return row


def test_positions_follow_the_prompt_and_every_token_is_streamed():
    steps, streamed = [], []

    def step(token, position):
        steps.append((token, position))
        return _one_hot((token + 1) % 10)

    g = decode(lambda: _one_hot(4), step, prompt_len=7, max_new_tokens=4, eos_token_id=None, pick=None,
               on_token=streamed.append)
    assert g.tokens == [4, 5, 6, 7] == streamed
    # the prefill gives the first token; each step feeds the previous token at the next position
    assert steps == [(4, 7), (5, 8), (6, 9)]
    assert g.prefill_seconds >= 0 and g.decode_seconds >= 0 and g.decode_cpu_seconds is not None


def test_generation_stops_at_eos_and_keeps_it():
    g = decode(lambda: _one_hot(2), lambda t, p: _one_hot(t + 1), 3, 50, eos_token_id=5, pick=None, on_token=None)
    assert g.tokens == [2, 3, 4, 5]
    g = decode(lambda: _one_hot(5), lambda t, p: _one_hot(0), 3, 50, eos_token_id=5, pick=None, on_token=None)
    assert g.tokens == [5]  # EOS as the first token: no decode step


def test_a_sampler_replaces_greedy_choice():
    least = lambda row: int(np.argmin(row))  # noqa: E731
    g = decode(lambda: np.arange(10.0), lambda t, p: -np.arange(10.0), 1, 3, None, least, None)
    assert g.tokens == [0, 9, 9] and greedy(np.arange(10.0)) == 9


def test_tokens_per_second_counts_decode_steps_only():
    assert Generation([1, 2, 3, 4, 5], 9.0, 2.0).decode_tokens_per_second == 2.0  # 4 steps in 2 s
    assert Generation([1], 0.1, 0.0).decode_tokens_per_second == 0.0
