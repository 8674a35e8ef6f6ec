"""Task gate: lm-evaluation-harness tasks on the candidate and on the reference, gated on each task's paired drop.

`RunnerLM` adapts any runner (the `logits`/`generate` API every gate uses) to lm-eval's `LM`, so the same task
runs on the fp32 reference and on the artifact, in this process. Both runs score the same documents, so the drop
is taken document by document: its mean, and a 95% interval from the standard error of the per-document
differences (normal approximation; a document's metric is 0/1 for accuracy-type metrics). `max_drop` applies to
the statistic the accuracy gate decides on (`upper_95` by default: the upper end of the drop's interval) — the
way llm-compressor's CI gates on recovery against the unquantized model, with the uncertainty stated.
lm-eval is an optional dependency (`pip install 'optpipe[lmeval]'`).
"""
from __future__ import annotations

import importlib
import math
from contextlib import ExitStack, contextmanager
from functools import lru_cache, partial
from unittest import mock

import numpy as np

from .. import hw
from . import GateResult
from .accuracy import log_softmax

INSTALL_HINT = "pip install 'optpipe[lmeval]' (lm-eval)"


def available() -> bool:
    return hw.importable("lm_eval")


@lru_cache(maxsize=1)
def runner_lm_class():
    """The adapter class (built on first use: lm-eval is optional)."""
    from lm_eval.api.model import LM
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    class RunnerLM(LM):
        """lm-eval's LM over an optpipe runner: scores continuations from `runner.logits`, generates greedily with
        `runner.generate`. `max_length` bounds every sequence (a static-KV-cache artifact holds only so many)."""

        def __init__(self, runner, tokenizer, max_length: int):
            super().__init__()
            self.runner, self.tokenizer, self.max_length = runner, tokenizer, int(max_length)
            eos = tokenizer.eos_token_id
            self.prefix = eos if eos is not None else (tokenizer.bos_token_id or 0)

        def _encode(self, text: str) -> list[int]:
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

        def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
            # as lm-eval's HF model: trailing spaces of the context belong to the continuation, and the
            # continuation's tokens are those of the whole string after the context's
            spaces = len(context) - len(context.rstrip())
            if spaces:
                context, continuation = context[:-spaces], context[-spaces:] + continuation
            whole, ctx = self._encode(context + continuation), self._encode(context)
            return ctx, whole[len(ctx):]

        def _score(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
            if not continuation:
                return 0.0, True
            whole = (context or [self.prefix]) + continuation
            inp = np.asarray(whole[-(self.max_length + 1):-1], dtype=np.int64)
            n = min(len(continuation), inp.size)
            lp = log_softmax(self.runner.logits(inp)[-n:])
            target = np.asarray(continuation[-n:])
            return float(lp[np.arange(n), target].sum()), bool((lp.argmax(-1) == target).all())

        def loglikelihood(self, requests) -> list[tuple[float, bool]]:
            out = []
            for r in requests:
                context, continuation = r.args
                ctx, cont = (([], self._encode(continuation)) if context == "" else
                             self._encode_pair(context, continuation))
                out.append(self._score(ctx, cont))
            return out

        def loglikelihood_rolling(self, requests) -> list[float]:
            out = []
            for r in requests:
                windows = map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self._encode(r.args[0]), prefix_token=self.prefix, max_seq_len=self.max_length,
                    context_len=1))
                out.append(sum(self._score(list(c), list(t))[0] for c, t in windows))
            return out

        def generate_until(self, requests) -> list[str]:
            out = []
            for r in requests:
                context, kwargs = r.args
                kwargs = dict(kwargs or {})
                until = kwargs.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                new = int(kwargs.get("max_gen_toks", 256))
                ids = np.asarray(self._encode(context)[-max(1, self.max_length - new):], dtype=np.int64)
                tokens = self.runner.generate(ids, new, eos_token_id=self.tokenizer.eos_token_id).tokens
                text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                cut = min((text.find(u) for u in until if u and u in text), default=len(text))
                out.append(text[:cut])
            return out

    return RunnerLM


@contextmanager
def _quiet():
    """No progress bars (they write carriage returns into logs) and no `git describe` on stderr."""
    import datasets
    import tqdm

    datasets.disable_progress_bars()
    with ExitStack() as stack:
        for name in ("lm_eval.api.task", "lm_eval.api.model", "lm_eval.api.metrics", "lm_eval.evaluator"):
            if hasattr(importlib.import_module(name), "tqdm"):
                stack.enter_context(mock.patch(f"{name}.tqdm", partial(tqdm.tqdm, disable=True)))
        stack.enter_context(mock.patch("lm_eval.evaluator.get_git_commit_hash", lambda: None))
        stack.enter_context(mock.patch("lm_eval.loggers.utils.get_git_commit_hash", lambda: None))
        yield


def task_manager(paths: list[str]):
    """Tasks from `paths` alone when given (indexing lm-eval's own ~15k task files takes ~20 s), else lm-eval's."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=paths or None, include_defaults=not paths)


def _per_doc(result: dict, task: str, metric: str | None) -> tuple[str, dict[int, float], bool]:
    samples = result["samples"][task]
    hib = result.get("higher_is_better", {}).get(task, {})
    if metric is None:
        metric = next((m for m in hib if isinstance(samples[0].get(m), (int, float, bool))), None)
    if metric is None or metric not in samples[0]:
        known = sorted(k for k, v in samples[0].items() if isinstance(v, (int, float, bool)) and k != "doc_id")
        raise ValueError(f"task {task!r} has no per-document metric {metric!r} (it reports: {', '.join(known)})")
    return metric, {int(s["doc_id"]): float(s[metric]) for s in samples}, bool(hib.get(metric, True))


def evaluate(runner, tokenizer, names: list[str], paths: list[str], max_length: int, limit: int | None) -> dict:
    from lm_eval import evaluator

    with _quiet():
        return evaluator.simple_evaluate(model=runner_lm_class()(runner, tokenizer, max_length), tasks=list(names),
                                         task_manager=task_manager(paths), limit=limit, log_samples=True,
                                         bootstrap_iters=0, verbosity="ERROR")


def measure(reference, candidate, tokenizer, specs: list, paths: list[str], max_length: int) -> dict:
    """Per task: the metric on both runners and the paired per-document drop (positive: the candidate is worse)."""
    names = [s.name for s in specs]
    limit = max((s.limit for s in specs if s.limit is not None), default=None)
    ref = evaluate(reference, tokenizer, names, paths, max_length, limit)
    cand = evaluate(candidate, tokenizer, names, paths, max_length, limit)
    out = {}
    for s in specs:
        metric, r, higher_better = _per_doc(ref, s.name, s.metric)
        _, c, _ = _per_doc(cand, s.name, metric)
        docs = sorted(set(r) & set(c))[: s.limit] if s.limit else sorted(set(r) & set(c))
        rv, cv = np.array([r[d] for d in docs]), np.array([c[d] for d in docs])
        drop = (rv - cv) if higher_better else (cv - rv)
        se = float(drop.std(ddof=1) / math.sqrt(drop.size)) if drop.size > 1 else math.inf
        mean = float(drop.mean())
        out[s.name] = {"metric": metric, "higher_is_better": higher_better, "docs": int(drop.size),
                       "reference": round(float(rv.mean()), 6), "candidate": round(float(cv.mean()), 6),
                       "recovery": round(float(cv.mean() / rv.mean()), 6) if rv.mean() else None,
                       "drop": round(mean, 6), "drop_ci95": [round(mean - 1.96 * se, 6), round(mean + 1.96 * se, 6)]}
    return out


def check(metrics: dict, specs: list, decide_on: str) -> GateResult:
    failures = []
    for s in specs:
        m = metrics[s.name]
        decided = m["drop_ci95"][1] if decide_on == "upper_95" else m["drop"]
        m["drop_decided"] = decided
        if decided > s.max_drop:
            failures.append(f"task {s.name}: {m['metric']} drop {decided:+.4f} "
                            f"({'upper 95% bound' if decide_on == 'upper_95' else 'point estimate'}; "
                            f"point {m['drop']:+.4f}, 95% interval {m['drop_ci95'][0]:+.4f} to {m['drop_ci95'][1]:+.4f} "
                            f"over {m['docs']} documents; reference {m['reference']:.4f}, candidate "
                            f"{m['candidate']:.4f}) exceeds max_drop {s.max_drop}")
    thresholds = {"tasks": [s.model_dump() for s in specs], "decided_on": decide_on}
    return GateResult("tasks", not failures, {"tasks": metrics}, thresholds, failures)
