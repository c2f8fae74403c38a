"""``--pool``: one latency ratio from the rounds of several earlier runs of a benchmark.

On a noisy machine one run's interval can be wide, and runs of the same command can differ
by more than their intervals say. Pooling reads earlier runs' JSON files (:func:`read_runs`),
checks that they measured the same thing (the same rows in the same order, the same input,
device, ... and GMACs; else a ValueError naming the file) and gives each row the median of
every run's per-round ratios (each round's time over the reference time of the same round,
as a single run computes it, :func:`expedit_d2.measure.round_ratios`), with that median's
distribution-free 95% interval (:func:`expedit_d2.measure.median_interval`).

One implementation, :func:`pool_runs`, serves both benchmarks; a :class:`PoolSpec` says what
differs between their runs' rows:

* ``tools/benchmark_model.py``: a row per setting, its rounds paired with the baseline row's
  (the run's first) (:data:`expedit_d2.benchmark.model.POOL`);
* ``tools/benchmark_backbone.py``: a row per case, holding both the base and the reduced
  backbone's rounds (:data:`expedit_d2.benchmark.backbone.POOL`).
"""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Callable, NamedTuple

from ..measure import median_interval, round_ratios

__all__ = ["PoolSpec", "Pooled", "read_runs", "pool_mismatch", "pooled_ratios", "pool_runs", "pool_files"]

#: (a row, the first row of its run) -> (the row's times per round, the reference times of
#: the same rounds), or None where the row has no such rounds
Rounds = Callable[[dict, dict], "tuple[list[float], list[float]] | None"]


class Pooled(NamedTuple):
    """One row pooled over the runs, handed to :attr:`PoolSpec.row` to lay out."""

    ref: dict  # the first run's row
    rows: list[dict]  # the row of every run, in run order
    runs: list[str]  # the runs' file names
    ratios: list[float]  # every run's per-round ratios
    latency_ratio: float  # their median
    ci95: tuple[float, float]  # its distribution-free 95% interval
    also: dict  # {name: every run's per-round ratios of PoolSpec.also[name], or None}


class PoolSpec(NamedTuple):
    """What a benchmark's runs hold, for :func:`pool_runs`."""

    tool: str  # the script, as a refused file is named ("benchmark_model.py")
    fields: frozenset  # the fields every row of a run needs
    name: str  # the field naming a row ("setting", "case")
    keys: tuple  # what must agree between the runs' rows (beside the names and GMACs)
    gmacs: tuple  # the GMACs fields that must agree
    same: str  # what differing GMACs mean: "not the same {same}"
    rounds: Rounds  # a row's rounds and their reference rounds
    labels: tuple  # how a rounds mismatch names (the reference's rounds, the row's)
    row: Callable[[Pooled], dict]  # the pooled row, laid out as the benchmark's report reads it
    defaults: dict = {}  # a key's value in runs recorded before it was
    optional: tuple = ()  # keys compared only where both rows recorded them
    also: dict = {}  # {name: Rounds}: further series pooled the same way where every run has them


def read_runs(paths, fields: frozenset, tool: str) -> dict[str, list[dict]]:
    """{path: rows} of earlier runs' JSON files for a benchmark's ``--pool``: each file a
    non-empty list of rows holding ``fields``. ValueError naming a file that cannot be read
    or is not a run of ``tool``."""
    runs = {}
    for path in paths:
        try:
            rows = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"--pool: cannot read {path}: {e}") from e
        if not (isinstance(rows, list) and rows and all(isinstance(r, dict) and fields <= set(r) for r in rows)):
            raise ValueError(f"--pool: {path} is not a {tool} run's JSON (rows with {sorted(fields)})")
        runs[str(path)] = rows
    return runs


def pool_mismatch(row: dict, ref: dict, keys, defaults: dict | None = None, optional=()) -> tuple | None:
    """The first of ``keys`` on which a run's ``row`` differs from the first run's ``ref``, as
    (key, row's value, ref's value), or None. A key missing from a row has its value in
    ``defaults`` (what runs recorded before it was); a key in ``optional`` is only compared
    where both rows recorded it."""
    defaults = defaults or {}
    for key in keys:
        if key in optional and (key not in row or key not in ref):
            continue
        ours, theirs = row.get(key, defaults.get(key)), ref.get(key, defaults.get(key))
        if ours != theirs:
            return key, ours, theirs
    return None


def pooled_ratios(runs: dict[str, list[dict]], rounds: Rounds) -> list[list[float]] | None:
    """Per row index: every run's per-round ratios of ``rounds(row, first row of its run)``,
    run after run; None where a run's row has no such rounds (runs before they were kept)."""
    pooled = [[] for _ in next(iter(runs.values()))]
    for rows in runs.values():
        for i, row in enumerate(rows):
            pair = rounds(row, rows[0])
            if pair is None or pair[0] is None or pair[1] is None:
                return None
            times, reference = pair
            pooled[i] += round_ratios({"row": times, "reference": reference}, "reference")["row"]
    return pooled


def _check(runs: dict[str, list[dict]], spec: PoolSpec) -> None:
    """ValueError naming the file where a run's rows differ from the first run's."""
    names = list(runs)
    first = runs[names[0]]
    labels = [r[spec.name] for r in first]
    for name, rows in runs.items():
        if [r[spec.name] for r in rows] != labels:
            raise ValueError(f"--pool: {name} has {spec.name}s {[r[spec.name] for r in rows]}, "
                             f"{names[0]} has {labels}")
        for row, ref in zip(rows, first):
            label = row[spec.name]
            differs = pool_mismatch(row, ref, spec.keys, spec.defaults, spec.optional)
            if differs:
                key, ours, theirs = differs
                raise ValueError(f"--pool: {name}: {label} has {key}={ours!r}, {names[0]} has {theirs!r}")
            for key in spec.gmacs:
                if not math.isclose(row[key], ref[key], rel_tol=1e-6):
                    raise ValueError(f"--pool: {name}: {label} has {key}={row[key]:.3f} GMACs, {names[0]} has "
                                     f"{ref[key]:.3f} (not the same {spec.same})")
            times, reference = spec.rounds(row, rows[0])
            if len(times) != len(reference) or not times:
                raise ValueError(f"--pool: {name}: {label} has {len(reference)} {spec.labels[0]} and "
                                 f"{len(times)} {spec.labels[1]} rounds")


def pool_runs(runs: dict[str, list[dict]], spec: PoolSpec) -> list[dict]:
    """{file name: the rows of one run's JSON} -> one row per row of the runs (laid out by
    ``spec.row``): the median over every run's rounds of each round's ratio to the reference
    of the same round, and that median's 95% interval. Raises ValueError naming the file
    where a run's rows, their ``spec.keys``, GMACs or rounds differ from the first run's."""
    if not runs:
        raise ValueError("--pool: no runs given")
    _check(runs, spec)
    names = list(runs)
    ratios = pooled_ratios(runs, spec.rounds)
    also = {k: pooled_ratios(runs, rounds) for k, rounds in spec.also.items()}
    pooled = []
    for i, ref in enumerate(runs[names[0]]):
        pooled.append(spec.row(Pooled(
            ref=ref, rows=[runs[name][i] for name in names], runs=names, ratios=ratios[i],
            latency_ratio=statistics.median(ratios[i]), ci95=median_interval(ratios[i]),
            also={k: None if series is None else series[i] for k, series in also.items()})))
    return pooled


def pool_files(paths, spec: PoolSpec) -> list[dict]:
    """``--pool RUN.json ...``: :func:`pool_runs` of the runs in ``paths`` (:func:`read_runs`)."""
    return pool_runs(read_runs(paths, spec.fields, spec.tool), spec)
