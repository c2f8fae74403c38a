"""What to sweep: the spec, its points (grid product + explicit points), point labels, and
the parsing of sweep files and ``--grid`` / ``--point`` items.

A point is a set of overrides with canonical keys (official Expedit Swin keys mapped onto
``MODEL.EXPEDIT.*`` by :func:`expedit_d2.reduction.config.canonical_key`). Its method is
``MODEL.TOKEN_REDUCTION.METHOD`` among them (``expedit`` when absent); ``METHOD: expedit``
beside other keys is dropped, so a point means the same whether it names expedit or not.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..reduction.config import canonical_key
from ..reduction.core import METHOD_KEY, registered_methods

__all__ = ["SweepError", "SweepSpec", "Point", "find_project", "expand_points", "point_method",
           "load_sweep_file", "parse_grid", "parse_point", "METHOD_KEY", "DEFAULT_METHOD", "BASELINE"]

#: the method of a reduced point that names none
DEFAULT_METHOD = "expedit"
#: the baseline row's method
BASELINE = "baseline"
#: sweep-file keys (the fields of SweepSpec)
SWEEP_FILE_KEYS = ("config_file", "input_size", "frames", "grid", "points", "opts", "project", "metric", "metric_mode",
                   "repeats", "warmup", "memory", "timing", "allow_partial_weights")
# short label parts of well-known keys: key -> format of the value ("{v}"; pairs as "{h}x{w}")
def _label_formats() -> dict[str, str]:
    """{config key: its short form in point labels}, as each method registered them
    (:attr:`expedit_d2.reduction.core.Method.labels`), in the methods' own key order."""
    out = {}
    for method in registered_methods().values():
        out.update(method.labels)
    return out


class SweepError(ValueError):
    """A sweep that cannot run as asked (bad grid value, mismatched output folder ...)."""


@dataclass
class SweepSpec:
    """What to sweep. ``grid``: key -> list of values (their product); ``points``: explicit
    extra points (key -> value dicts, e.g. one per method); ``opts``: overrides of the base
    config for every point."""

    config_file: str
    input_size: tuple[int, int]
    grid: dict = field(default_factory=dict)
    points: list = field(default_factory=list)
    opts: list = field(default_factory=list)
    project: str | None = None
    metric: str | None = None
    metric_mode: str | None = None  # "max" or "min"; from the project's SWEEP when None
    repeats: int = 5
    warmup: int = 2
    memory: bool = True
    timing: bool = True
    allow_partial_weights: bool = False  # --allow-partial-weights for every evaluation
    # a video model: GMACs, latency and memory of a clip of this many frames of input_size
    frames: int | None = None

    def __post_init__(self):
        if not os.path.isfile(self.config_file):
            raise SweepError(f"config file not found: {self.config_file}")
        size = list(self.input_size) if isinstance(self.input_size, (list, tuple)) else [self.input_size]
        if len(size) != 2 or not all(isinstance(v, int) and v > 0 for v in size):
            raise SweepError(f"input_size must be [H, W] of positive ints, got {self.input_size!r}")
        self.input_size = (size[0], size[1])
        self.opts = [str(o) for o in self.opts]  # YAML numbers -> command-line strings
        if len(self.opts) % 2:
            raise SweepError(f"opts must be KEY VALUE pairs, got an odd list: {self.opts}")
        if not isinstance(self.grid, dict):
            raise SweepError(f"grid must be a KEY: [values] mapping, got {self.grid!r}")
        for key, values in self.grid.items():
            if not isinstance(values, list) or not values:
                raise SweepError(f"grid {key}: expected a non-empty list of values, got {values!r}")
        if not isinstance(self.points, list):
            raise SweepError(f"points must be a list of KEY: value mappings, got {self.points!r}")
        if self.metric_mode not in (None, "max", "min"):
            raise SweepError(f"metric_mode must be 'max' or 'min', got {self.metric_mode!r}")
        if self.repeats < 1 or self.warmup < 0:
            raise SweepError(f"repeats must be >= 1 and warmup >= 0, got {self.repeats}, {self.warmup}")
        if self.frames is not None and (isinstance(self.frames, bool) or not isinstance(self.frames, int)
                                        or self.frames < 1):
            raise SweepError(f"frames must be an int >= 1 (a clip's length), got {self.frames!r}")
        if self.project is None:
            self.project = str(find_project(self.config_file))

    def fingerprint(self) -> str:
        """What makes two runs' rows comparable: config file contents, base opts, input size."""
        h = hashlib.sha1(Path(self.config_file).read_bytes())
        h.update(json.dumps([self.opts, list(self.input_size)] + ([self.frames] if self.frames else [])).encode())
        return h.hexdigest()[:12]


def point_method(overrides: dict, baseline: bool = False) -> str:
    """The method a point's overrides select: ``baseline`` for the baseline, else
    ``MODEL.TOKEN_REDUCTION.METHOD`` (``expedit`` when the point does not name one)."""
    if baseline:
        return BASELINE
    return str(overrides.get(METHOD_KEY, DEFAULT_METHOD))


def _label_part(key: str, value) -> str:
    fmt = _label_formats().get(key)
    if fmt is None:
        return f"{key.rsplit('.', 1)[-1]}={value}"
    if "{h}" in fmt and isinstance(value, list) and len(value) == 2:
        return fmt.format(h=value[0], w=value[1])
    if isinstance(value, list):
        value = "-".join(str(v) for v in value)
    return fmt.format(v=value)


@dataclass(frozen=True)
class Point:
    """One setting: ``overrides`` (canonical keys -> values); ``baseline`` for point 0."""

    overrides: tuple  # ((key, value), ...) sorted, values JSON-able
    baseline: bool = False

    @property
    def id(self) -> str:
        if self.baseline:
            return "baseline"
        return hashlib.sha1(json.dumps(self.overrides).encode()).hexdigest()[:10]

    @property
    def method(self) -> str:
        """See :func:`point_method`."""
        return point_method(dict(self.overrides), self.baseline)

    @property
    def label(self) -> str:
        """Short name: the method unless expedit, then the well-known keys in a fixed order
        (``a4_16x16``, ``tome_r8_s0``, ``pool_a4_16x16``), then ``LAST=value`` for others."""
        if self.baseline:
            return BASELINE
        d = dict(self.overrides)
        method = str(d.pop(METHOD_KEY, DEFAULT_METHOD))
        parts = [] if method == DEFAULT_METHOD else [method]
        parts += [_label_part(k, d.pop(k)) for k in _label_formats() if k in d]
        parts += [_label_part(k, v) for k, v in d.items()]
        return "_".join(parts) or "base"


def find_project(config_file) -> Path:
    """The nearest folder above ``config_file`` holding a ``train_net.py``."""
    from ..engine import find_project as find

    project = find(config_file)
    if project is None:
        raise SweepError(f"no train_net.py in any folder above {config_file}; pass --project")
    return project


def _normalise(value):
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(value, list):
        return [_normalise(v) for v in value]
    return value


def _canonical_point(raw: dict) -> dict:
    pairs = {}
    for key, value in raw.items():
        try:
            key, value = canonical_key(key, _normalise(value))
        except ValueError as e:
            raise SweepError(f"point {raw}: {e}") from e
        pairs[key] = value
    if pairs.get(METHOD_KEY) == DEFAULT_METHOD and len(pairs) > 1:
        del pairs[METHOD_KEY]
    return pairs


def expand_points(spec: SweepSpec) -> list[Point]:
    """Baseline first, then the grid's product, then the explicit points (duplicates once)."""
    keys = list(spec.grid)
    combos = [dict(zip(keys, vals)) for vals in itertools.product(*(spec.grid[k] for k in keys))] if keys else []
    out, seen = [Point((), baseline=True)], set()
    for raw in combos + list(spec.points):
        if not isinstance(raw, dict) or not raw:
            raise SweepError(f"a sweep point must be a non-empty KEY: value mapping, got {raw!r}")
        point = Point(tuple(sorted(_canonical_point(raw).items())))
        if point.id not in seen:
            seen.add(point.id)
            out.append(point)
    return out


def load_sweep_file(path) -> dict:
    """A YAML sweep file: ``config_file``, ``input_size``, ``grid``, ``points``, ``opts``,
    ``project``, ``metric``, ``metric_mode``, ``repeats``, ``warmup``, ``memory``, ``timing``,
    ``allow_partial_weights`` (paths relative to the working directory, as on the command line)."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    unknown = set(data) - set(SWEEP_FILE_KEYS)
    if unknown:
        raise SweepError(f"{path}: unknown sweep-file keys {sorted(unknown)} (allowed: {sorted(SWEEP_FILE_KEYS)})")
    return data


def parse_point(item: str) -> dict:
    """``KEY=VALUE[;KEY=VALUE ...]`` (YAML values) -> one explicit point's overrides."""
    point = {}
    for pair in item.split(";"):
        key, sep, value = pair.partition("=")
        if not sep:
            raise SweepError(f"--point {item!r}: expected KEY=VALUE[;KEY=VALUE ...]")
        point[key.strip()] = yaml.safe_load(value)
    return point


def parse_grid(items: list[str]) -> dict:
    """``--grid KEY=[v1, v2, ...]`` items -> {key: values}."""
    grid = {}
    for item in items:
        key, sep, rhs = item.partition("=")
        if not sep:
            raise SweepError(f"--grid {item!r}: expected KEY=[v1, v2, ...]")
        values = yaml.safe_load(rhs)
        if not isinstance(values, list):
            raise SweepError(f"--grid {item!r}: the values must be a list, e.g. {key}=[2, 4, 6]")
        grid[key.strip()] = values
    return grid
