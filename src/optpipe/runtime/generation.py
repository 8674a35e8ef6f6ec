"""The decoding contract every runner keeps (the gates, the benchmarks and users call the same code)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np


@dataclass
class Generation:
    tokens: list[int]
    prefill_seconds: float
    decode_seconds: float  # for len(tokens) - 1 steps: the first token comes from the prefill
    extra: dict = field(default_factory=dict)
    # CPU time of this process (all its threads) in each phase; None where a runner cannot split it
    prefill_cpu_seconds: float | None = None
    decode_cpu_seconds: float | None = None

    @property
    def decode_tokens_per_second(self) -> float:
        steps = len(self.tokens) - 1
        return steps / self.decode_seconds if self.decode_seconds > 0 and steps > 0 else 0.0


Pick = Callable[[np.ndarray], int]  # next-token choice from a logits row (greedy by default, or a sampler)
OnToken = Callable[[int], None]  # called with each new token as soon as it is chosen (streaming)


class Runner(Protocol):
    """Runs a model batch 1: the same code the gates, the benchmark and users call."""

    max_length: int  # the longest prompt + generation the artifact can hold (static cache or rotary table)

    def logits(self, ids: np.ndarray) -> np.ndarray:
        """[S, V] next-token logits for a 1-D token array, computed in one prefill."""

    def generate(self, ids: np.ndarray, max_new_tokens: int, eos_token_id: int | None = None,
                 pick: Pick | None = None, on_token: OnToken | None = None) -> Generation:
        """Greedy decoding (or `pick`'s choice), reporting each token to `on_token`."""

    def precisions(self) -> dict[str, str]:
        """Every weight matmul (linear) of the artifact with the precision it runs in, e.g. "int4", "float32"."""

    def with_threads(self, threads: int) -> "Runner":
        """This runner at another thread count (the speed gate's answer to a load that starts mid-gate)."""

    # optional: storage() -> dict, the bytes and bits per weight it stores (runtime/storage.py); None if absent


def greedy(logits_row: np.ndarray) -> int:
    return int(np.argmax(logits_row))


def decode(prefill: Callable[[], np.ndarray], step: Callable[[int, int], np.ndarray], prompt_len: int,
           max_new_tokens: int, eos_token_id: int | None, pick: Pick | None, on_token: OnToken | None) -> Generation:
    """The decode loop every runner shares: `prefill()` gives the last prompt position's logits, `step(token,
    position)` the next logits. Times the prefill (to the first token) apart from the decode steps."""
    pick = pick or greedy
    c0, t0 = time.process_time(), time.perf_counter()
    tok = pick(prefill())
    c1, t1 = time.process_time(), time.perf_counter()
    tokens = [tok]
    if on_token:
        on_token(tok)
    while len(tokens) < max_new_tokens and tok != eos_token_id:
        tok = pick(step(tok, prompt_len + len(tokens) - 1))
        tokens.append(tok)
        if on_token:
            on_token(tok)
    t2, c2 = time.perf_counter(), time.process_time()
    return Generation(tokens, t1 - t0, t2 - t1, prefill_cpu_seconds=c1 - c0, decode_cpu_seconds=c2 - c1)
