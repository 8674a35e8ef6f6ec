"""Progress on long steps: a tqdm bar on a terminal; in a log (stderr not a TTY, e.g. CI) one plain line when the
step ends, never `\\r` updates. `-q` silences both."""
from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterable, Iterator

from tqdm import tqdm

_QUIET: list[bool] = [False]


def set_quiet(quiet: bool) -> None:
    _QUIET[0] = quiet


def interactive() -> bool:
    return not _QUIET[0] and sys.stderr.isatty()


def note(message: str) -> None:
    """A line before a long step that has no count to show (a trace), unless -q."""
    if not _QUIET[0]:
        print(f"    {message}", file=sys.stderr, flush=True)


def _done(desc: str, n: float, unit: str, seconds: float) -> None:
    note(f"{desc}: {n:,.0f} {unit} in {seconds:.1f}s")


def track(iterable: Iterable, desc: str, unit: str = "it", total: int | None = None, leave: bool = True,
          log: bool = True) -> Iterator:
    """Iterate with progress (`log=False`: no line in logs, for steps repeated too often to be worth one)."""
    if interactive():
        yield from tqdm(iterable, desc=desc, unit=unit, total=total, leave=leave)
        return
    t0, n = time.perf_counter(), 0
    for item in iterable:
        n += 1
        yield item
    if log:
        _done(desc, n, unit, time.perf_counter() - t0)


@contextlib.contextmanager
def bar(total: float, desc: str, unit: str = "it", **kwargs):
    """A bar updated by hand (`.update(n)`, `.set_postfix_str(...)`)."""
    t0 = time.perf_counter()
    with tqdm(total=total, desc=desc, unit=unit, disable=not interactive(), **kwargs) as b:
        yield b
    if not interactive():
        _done(desc, total, unit, time.perf_counter() - t0)
