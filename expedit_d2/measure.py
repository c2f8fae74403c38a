"""Latency and memory measurement shared by the benchmarks and the sweep.

* :func:`time_interleaved` -- median latency of several callables measured in one run,
  interleaved repeat by repeat in alternating order (machine drift hits all alike), after
  warm-up, synchronised on CUDA; :func:`interleaved_samples` gives every round's times and
  :func:`round_ratios` the per-round ratios to one of them.
* :func:`minor_page_faults` -- the process's minor page faults so far (pages mapped in on
  first touch: freshly allocated memory costs ~1 us per 4 KB page on a CPU), to tell
  allocation cost from compute in a breakdown.
* :func:`peak_memory` -- peak extra memory of one call: on CUDA
  ``max_memory_allocated`` over what was allocated before; on CPU the growth of the
  resident set's high-water mark (Linux ``/proc``, reset before the call). On CPU, measure
  in a fresh process started by :func:`run_memory_child`, whose glibc mmap threshold is
  fixed so freed blocks leave the resident set (otherwise glibc keeps them cached and
  later calls look free; in the timing process that setting would slow allocations).
* The memory child, shared by the sweep and the benchmarks: the child measures with
  :func:`forward_peak_bytes` and ends with :func:`print_child_peak`; the parent runs it with
  :func:`child_peak_mb`, or calls :func:`peak_memory_mb`, which measures on CUDA in-process
  and elsewhere in the child.
"""
from __future__ import annotations

import json
import math
import os
import re
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch

try:
    import resource
except ImportError:  # not a Unix: no page-fault counts
    resource = None

__all__ = ["set_flush_denormal", "sync", "minor_page_faults", "interleaved_samples", "time_interleaved",
           "round_ratios", "median_interval", "peak_memory", "run_memory_child", "forward_peak_bytes",
           "print_child_peak", "child_peak_mb", "peak_memory_mb", "write_report"]

_MMAP_ENV = "MALLOC_MMAP_THRESHOLD_"


def set_flush_denormal(flush: bool) -> bool:
    """Flush denormal floats to zero on CPU (x86 with SSE3; elsewhere a no-op), for timing:
    arithmetic on denormals is many times slower, so without it a model's time depends on
    how many of its activations are tiny. Returns whether the setting took effect."""
    return bool(torch.set_flush_denormal(flush))


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def minor_page_faults() -> int | None:
    """Minor page faults of this process so far, all threads (``getrusage``; None where the
    platform has no such count). A difference around a call counts the pages it touched for
    the first time (fresh allocations the kernel maps in and zeroes)."""
    return None if resource is None else resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def interleaved_samples(fns: dict[str, Callable[[], object]], device, repeats: int = 5,
                        warmup: int = 1) -> dict[str, list[float]]:
    """Seconds of each call of each function: ``warmup`` untimed rounds, then ``repeats``
    rounds, each calling every function once in turn (synchronised on CUDA); returns
    {name: [seconds of round 0, 1, ...]}.

    The order alternates: forwards in even rounds, backwards in odd ones (a, b, b, a, ...).
    A function is then as often first as last, so what the call before it leaves behind
    (freed memory to fault in again, a cooled cache, the previous call's background work)
    does not always land on the same one, and drift within a pair of rounds cancels."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    times = {name: [] for name in fns}
    names = list(fns)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            fn = fns[name]
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def time_interleaved(fns: dict[str, Callable[[], object]], device, repeats: int = 5,
                     warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each function (:func:`interleaved_samples`); returns {name: median}."""
    return {name: statistics.median(ts) for name, ts in interleaved_samples(fns, device, repeats, warmup).items()}


def round_ratios(samples: dict[str, list[float]], base: str) -> dict[str, list[float]]:
    """Per round, each function's time over ``base``'s time in the same round (from
    :func:`interleaved_samples`): drift slower than a round cancels in each ratio, so their
    median is steadier than the ratio of the medians on a machine whose speed wanders."""
    return {name: [t / b for t, b in zip(ts, samples[base])] for name, ts in samples.items()}


def median_interval(values: list[float], level: float = 0.95) -> tuple[float, float]:
    """A distribution-free confidence interval for the median of what ``values`` sample:
    the order statistics (x_(j), x_(n+1-j)) with the largest j whose coverage
    P(j <= Binomial(n, 1/2) <= n - j) is at least ``level`` (for 15 values at 0.95: the 4th
    and the 12th, coverage 0.965). With too few values for the level (n <= 5 at 0.95) it is
    (min, max), whose coverage is then below the level."""
    xs = sorted(values)
    n = len(xs)
    if not n:
        raise ValueError("median_interval: no values")

    def coverage(j: int) -> float:
        return sum(math.comb(n, i) for i in range(j, n - j + 1)) / 2 ** n

    j = 1
    while j + 1 <= (n + 1) // 2 and coverage(j + 1) >= level:
        j += 1
    return xs[j - 1], xs[n - j]


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{key}:\s+(\d+)", f.read(), re.M).group(1))


def peak_memory(fn: Callable[[], object], device) -> int | None:
    """Peak extra bytes while ``fn()`` runs (None where it cannot be measured)."""
    device = torch.device(device)
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    if device.type != "cpu" or not os.path.exists("/proc/self/clear_refs"):
        return None
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current resident set
    except OSError:
        return None
    before = _status_kb("VmRSS")
    fn()
    return (_status_kb("VmHWM") - before) * 1024


def run_memory_child(cmd: list[str], threshold: int = 1 << 20) -> str:
    """Run ``cmd`` (a measuring child process) with glibc's mmap threshold fixed at
    ``threshold`` bytes; return the last line it printed, or raise with its stderr."""
    env = dict(os.environ, **{_MMAP_ENV: str(threshold)})
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"memory subprocess {cmd[1:4]} failed:\n" + out.stderr[-3000:])
    return out.stdout.strip().splitlines()[-1]


def forward_peak_bytes(fn: Callable[[], object], device, warmup: int = 1) -> int | None:
    """Peak extra bytes of one ``fn()`` (a forward) under inference mode, after ``warmup``
    untimed calls: lazily built buffers, code pages and thread pools are not the call's peak
    (in a memory child the warm-up's freed blocks leave the resident set, see above)."""
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        return peak_memory(fn, device)


def print_child_peak(peak_bytes: int | None) -> None:
    """A memory child's last line: its peak in bytes (or null), as :func:`child_peak_mb` reads it."""
    print(json.dumps(peak_bytes), flush=True)


def child_peak_mb(cmd: list[str], threshold: int = 1 << 20) -> float | None:
    """Run the memory child ``cmd`` (see :func:`run_memory_child`; it ends with
    :func:`print_child_peak`); its peak in MB, or None where it could not measure."""
    line = run_memory_child(cmd, threshold)
    try:
        peak = json.loads(line)
    except json.JSONDecodeError:
        raise RuntimeError(f"memory subprocess {cmd[1:4]} printed {line!r} last, not a peak in bytes "
                           "(print_child_peak)") from None
    return None if peak is None else peak / 2**20


def peak_memory_mb(fn: Callable[[], object], device, child_cmd: list[str]) -> float | None:
    """Peak extra MB of one ``fn()``: on CUDA in this process (:func:`forward_peak_bytes`),
    elsewhere in the fresh process ``child_cmd``, which measures the same call the same way
    (:func:`child_peak_mb`)."""
    if torch.device(device).type == "cuda":
        peak = forward_peak_bytes(fn, device)
        return None if peak is None else peak / 2**20
    return child_peak_mb(child_cmd)


def write_report(output: Path, table: str, data) -> None:
    """``<output>.md`` (the table) and ``<output>.json`` (the data), each written to a
    temporary name and renamed, so a reader never sees half a file."""
    from .fileio import atomic_write

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".md", table), (".json", json.dumps(data, indent=2))):
        atomic_write(output.with_suffix(suffix), text)
