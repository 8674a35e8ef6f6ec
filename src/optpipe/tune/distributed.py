"""`optpipe tune --ray`: the machine-independent work of a search (builds, the screen, the output-comparing gates)
spread over Ray workers; speed stays where it is comparable.

Each worker is a Ray actor holding its own copy of the model and of the fp32 reference; it takes a contiguous
run of candidates (neighbours share pass prefixes) and writes builds and measurements into the shared cache
directory (`--cache`, which every node must see at the same path). When all are done the workers exit and the
driver runs the ordinary search: it finds every build and every quality record in the cache and measures
speed itself, one candidate at a time, with the reference in its own process, on one node. The trace names the
node that measured each figure.
"""
from __future__ import annotations

import platform

from .. import hw
from ..errors import BuildError, RecipeError

INSTALL_HINT = "pip install 'optpipe[distributed]'"


def available() -> bool:
    return hw.importable("ray")


class QualityWorker:
    """One Ray actor: builds and quality-gates candidates by number, into the shared cache."""

    def __init__(self, recipe_data: dict, source: str, cache_dir: str, threads: int, allow_plugins):
        from ..recipe import recipe_from_dict
        from .search import Tuner

        recipe = recipe_from_dict(recipe_data, source, allow_plugins)
        self.tuner = Tuner(recipe, cache_dir=cache_dir, threads=threads, allow_plugins=allow_plugins,
                           log=lambda m: None)

    def run(self, numbers: list[int]) -> list[dict]:
        out = []
        for n in numbers:
            cand = self.tuner.candidates[n - 1]
            try:
                key, directory, info, built_before = self.tuner.build(cand)
            except BuildError as e:  # the driver meets it again and records it as failed
                out.append({"candidate": n, "status": "failed", "node": platform.node(), "reason": str(e)})
                continue
            record, cached = self.tuner.quality(cand, key, directory, info)
            out.append({"candidate": n, "status": record["status"], "node": platform.node(),
                        "cached": {"build": built_before, "quality": cached}})
        self.tuner.close()
        return out


def chunks(numbers: list[int], parts: int) -> list[list[int]]:
    """`parts` contiguous runs of nearly equal length (contiguous: neighbours share pass prefixes)."""
    parts = max(1, min(parts, len(numbers)))
    size, extra = divmod(len(numbers), parts)
    out, start = [], 0
    for i in range(parts):
        end = start + size + (1 if i < extra else 0)
        out.append(numbers[start:end])
        start = end
    return [c for c in out if c]


def reachable(address: str, timeout: float = 5.0) -> None:
    """A `host:port` (or `ray://host:port`) address answers a TCP connect, so a typo fails in seconds (Ray itself
    retries for minutes). `auto` and other forms are left to Ray."""
    import socket

    hostport = address.removeprefix("ray://")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout).close()
    except OSError as e:
        raise RecipeError(f"--ray-address: cannot join a Ray cluster at {address}: {e}") from None


def prewarm(tuner, numbers: list[int], *, address: str | None, workers: int, log=print) -> list[dict]:
    """Build and quality-gate `numbers` on Ray workers (a local Ray with `workers` CPUs when `address` is None)."""
    if not available():
        raise RecipeError(f"--ray: Ray is not installed ({INSTALL_HINT})")
    import ray

    if address:
        reachable(address)
    started = not ray.is_initialized()
    if started:
        try:
            ray.init(address=address, num_cpus=None if address else workers, include_dashboard=False,
                     log_to_driver=False, configure_logging=False)
        except (ConnectionError, ValueError, RuntimeError) as e:
            raise RecipeError(f"--ray-address: cannot join a Ray cluster at {address}: {e}") from None
    try:
        cpus = int(ray.cluster_resources().get("CPU", workers))
        n = max(1, min(workers, cpus, len(numbers)))
        per = max(1, tuner.threads // n) if address is None else 1
        log(f"ray: {n} workers ({per} thread(s) each) build and quality-gate {len(numbers)} candidates; "
            f"cache {tuner.store.root}")
        actor = ray.remote(num_cpus=1)(QualityWorker)
        data = tuner.recipe.model_dump(mode="json")
        actors = [actor.remote(data, tuner.source, str(tuner.store.root), per, tuner.allow_plugins) for _ in range(n)]
        results = ray.get([a.run.remote(c) for a, c in zip(actors, chunks(numbers, n))])
        for a in actors:
            ray.kill(a)
    finally:
        if started:
            ray.shutdown()
    done = [r for part in results for r in part]
    log("ray: " + ", ".join(f"{sum(1 for r in done if r['node'] == node)} on {node}"
                            for node in sorted({r["node"] for r in done})))
    return done
