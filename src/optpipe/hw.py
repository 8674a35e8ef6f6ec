"""What this CPU can do, read at run time (never assume Intel): ISA flags, physical cores, library versions."""
from __future__ import annotations

import importlib
import math
import os
import platform
import statistics
from functools import lru_cache

ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16")


@lru_cache(maxsize=None)
def _cpuinfo(key: str) -> str | None:
    """The first `key: value` line of /proc/cpuinfo (None where there is none, e.g. not Linux)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith(key)), None)
    except OSError:
        return None


def cpu_flags() -> frozenset[str]:
    return frozenset((_cpuinfo("flags") or "").split())


def cpu_model() -> str:
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def importable(module: str) -> bool:
    """An optional dependency imports here (lm-eval for task gates, Ray for distributed tuning)."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


# two-sided 95% Student t quantiles by degrees of freedom (1..30); 1.96 beyond
T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
       2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def ratio_interval(ratios: list[float]) -> tuple[float, float, float]:
    """Geometric mean of per-round ratios and its 95% interval (t on the logs; (x, 0, inf) for one round): the speed
    gate's statistic, and this module's own bf16 measurement's."""
    logs = [math.log(r) for r in ratios]
    mean = statistics.fmean(logs)
    if len(logs) < 2:
        return math.exp(mean), 0.0, math.inf
    half = (T95[len(logs) - 2] if len(logs) - 1 <= len(T95) else 1.96) * statistics.stdev(logs) / math.sqrt(len(logs))
    return math.exp(mean), math.exp(mean - half), math.exp(mean + half)


@lru_cache(maxsize=8)
def bf16_matmul_speedup(shapes: tuple[tuple[int, int, int], ...] = ((2048, 1024, 1),),
                        rounds: int = 9) -> tuple[float, float]:
    """fp32 time / bf16 time of one decode step's matmuls (one token times each (out, in) weight of `shapes`, `count`
    times; at most 2 threads): the geometric mean of rounds (fp32 and bf16 interleaved) and the lower end of its 95%
    interval, since a decision on the point flips between runs near 1.0x. The flags say the bf16 instructions exist,
    not that torch's kernels use them well, and the shape decides: on an AMX Xeon a 2048x1024 matrix ran 1.1x,
    SmolLM2's 576-wide ones 0.3-0.6x, 11008x4096 1.7x. A decode reads each layer's weights from memory, not from the
    cache one matrix called again sits in, so each shape cycles through up to 256 MB of distinct copies: there
    SmolLM2's shapes measured 0.80x (one copy: 0.59x) and its eager decode 0.84-0.90x; a 2048-wide 8-layer Llama
    1.16-1.23x (one copy: 1.06x) and its decode 1.23x. The default shape stands in where the model's are unknown.
    About 5 ms per shape, round and dtype; cached per `shapes`."""
    import time

    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(min(2, threads))
    took = [[0.0, 0.0] for _ in range(rounds)]  # per round: the step's fp32 and bf16 time
    try:
        with torch.inference_mode():
            for out, n_in, count in shapes:  # one shape at a time, in up to 256 MB of distinct fp32 copies
                copies = max(1, min(count, 2**26 // (out * n_in)))
                w32, x32 = [torch.randn(out, n_in) for _ in range(copies)], torch.randn(1, n_in)
                pair = ((x32, w32), (x32.bfloat16(), [w.bfloat16() for w in w32]))
                for x, ws in pair:  # warm both kernels
                    for w in ws[:3]:
                        torch.nn.functional.linear(x, w)
                t = time.perf_counter()
                torch.nn.functional.linear(x32, w32[0])
                calls = max(2, min(400, int(0.005 / max(time.perf_counter() - t, 1e-7))))
                for step in took:
                    for dtype, (x, ws) in enumerate(pair):
                        t = time.perf_counter()
                        for i in range(calls):
                            torch.nn.functional.linear(x, ws[i % copies])
                        step[dtype] += (time.perf_counter() - t) / calls * count
                del w32, pair
        point, low, _ = ratio_interval([fp32 / bf16 for fp32, bf16 in took])
        return point, low
    finally:
        torch.set_num_threads(threads)


def isa() -> dict[str, bool]:
    flags = cpu_flags()
    out = {name: name in flags for name in ISA_FLAGS}
    out["amx"] = any(f.startswith("amx") for f in flags)
    return out


def int8_dot_product() -> str | None:
    """The CPU's u8 x s8 dot-product instruction set (None: only AVX2's vpmaddubsw, whose int16 intermediate
    sums can saturate when both operands are large: ONNX Runtime then loses accuracy unless weights use 7 bits)."""
    have = isa()
    for name in ("amx_int8", "avx512_vnni", "avx_vnni"):
        if have.get(name):
            return name
    return None


def physical_cores() -> int:
    """Physical cores (hyper-threads share execution units, so they are not counted)."""
    try:
        import psutil

        n = psutil.cpu_count(logical=False)
        if n:
            return min(n, usable_cpus())
    except Exception:  # noqa: BLE001 - psutil absent or unsupported platform
        pass
    return max(1, usable_cpus())


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask), else all of them."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class BackgroundLoad:
    """CPU time other processes take on the CPUs this process may run on, over an interval: what makes a speed
    measurement describe the machine's load instead of the artifact. `cpus()` after the interval: how many CPUs
    others kept busy on average (None where per-CPU counters are unavailable)."""

    def __init__(self):
        import time

        self._cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
        self._t0, self._own0, self._busy0 = time.perf_counter(), time.process_time(), self._busy()

    def _busy(self) -> float | None:
        try:
            import psutil

            per_cpu = psutil.cpu_times(percpu=True)
            chosen = [per_cpu[i] for i in self._cpus if i < len(per_cpu)] if self._cpus else per_cpu
            return sum(t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)
                       + getattr(t, "steal", 0.0) for t in chosen)
        except Exception:  # noqa: BLE001 - no per-CPU counters here: the load cannot be measured
            return None

    def cpus(self) -> float | None:
        import time

        busy = self._busy()
        wall = time.perf_counter() - self._t0
        if busy is None or self._busy0 is None or wall <= 0:
            return None
        others = (busy - self._busy0) - (time.process_time() - self._own0)
        return max(others, 0.0) / wall


def threads(requested: int | None, field: str = "threads") -> int:
    """A validated thread count: default physical cores; more than the CPUs this process may use is refused
    (it would only oversubscribe them, and absurd values hang thread-pool creation)."""
    if requested is None:
        return physical_cores()
    if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
        raise ValueError(f"{field}: must be a whole number >= 1, got {requested!r}")
    if requested > usable_cpus():
        raise ValueError(f"{field}: {requested} exceeds the {usable_cpus()} CPUs available to this process")
    return requested


def threads_beside_load(threads: int, others: float | None, cpus: int | None = None) -> int:
    """The thread count that fits beside `others` CPUs kept busy by other processes: a default thread count
    that oversubscribes a loaded machine measures its barriers (threads spin while a sibling is descheduled),
    not the artifact. At least 1; unchanged when the load is unknown or leaves room."""
    cpus = usable_cpus() if cpus is None else cpus
    if others is None:
        return threads
    free = int(cpus - others + 0.25)  # a quarter CPU of background noise does not cost a thread
    return max(1, min(threads, free))


def probe_load(seconds: float = 0.5) -> float | None:
    """CPUs other processes keep busy, sampled over `seconds` (None where it cannot be measured)."""
    import time

    load = BackgroundLoad()
    time.sleep(seconds)
    return load.cpus()


def library_versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in ("optpipe", "torch", "transformers", "onnx", "onnxruntime", "numpy", "datasets", "gguf"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def environment() -> dict:
    return {
        "cpu": cpu_model(),
        "machine": platform.machine(),
        "isa": isa(),
        "physical_cores": physical_cores(),
        "logical_cpus": os.cpu_count(),
        "versions": library_versions(),
    }


def peak_rss_mib() -> float | None:
    """This process's peak resident memory so far (VmHWM), MiB; None where /proc is not available."""
    try:
        with open("/proc/self/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None
