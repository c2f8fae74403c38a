"""Results files: one typed :class:`Row` per point in ``results.jsonl`` and ``results.csv``
(``results.shard-I-of-N.*`` per shard), written atomically; merge; the output-folder lock.

Every file is rewritten whole to a unique temporary name and renamed
(:func:`expedit_d2.fileio.atomic_write`), so a kill leaves the old or the new file, never
half a row. Rows written by older versions stay readable: renamed keys are mapped
(``backbone_gflops`` -> ``backbone_gmacs``), missing ones take their defaults (the method
from the overrides), unknown ones are kept in :attr:`Row.extra` and written back.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ..fileio import atomic_write
from .spec import SweepError, SweepSpec, point_method

__all__ = ["Row", "RESULTS", "CSV_FIELDS", "results_name", "read_rows", "rows_from_jsonl", "rows_to_jsonl",
           "rows_from_csv", "rows_to_csv", "append_row", "merge", "check_output_dir", "output_lock"]

logger = logging.getLogger("expedit_d2.sweep")

RESULTS = "results"
# keys of rows written by older versions -> their field now
_RENAMED = {"backbone_gflops": "backbone_gmacs", "model_gflops": "model_gmacs"}


@dataclass
class Row:
    """One evaluated point.

    Identity: ``point_id`` (stable hash of the overrides; ``baseline`` for point 0), ``order``
    (position in the sweep), ``label``, ``baseline``, ``method`` (``baseline``, or the
    point's ``MODEL.TOKEN_REDUCTION.METHOD``, ``expedit`` by default), ``overrides`` (canonical
    key -> value) and ``opts`` (the ``KEY VALUE`` list the evaluation got).
    Accuracy: ``metric`` (primary, flattened ``evaluator/name``), ``metric_mode`` (``max`` or
    ``min``), ``metric_value``, ``metrics`` (every flattened metric).
    Cost: ``backbone_gmacs`` / ``model_gmacs`` (fvcore multiply-adds / 1e9, one image of
    ``input_size`` [H, W], backbone input ``padded_input``; per clip of ``frames`` frames for
    a video model, None for images); ``latency_ms`` (median, batch 1),
    ``fps`` (1 / latency), ``speedup_vs_baseline`` (baseline time / point time, timed
    interleaved) and ``baseline_latency_ms_same_run``; ``peak_memory_mb`` (one forward);
    None where not measured.
    Provenance: ``device``, ``num_gpus``, ``versions``, ``time``, ``seconds`` (the point's wall
    time), ``config_file``, ``fingerprint`` (:meth:`SweepSpec.fingerprint`), ``shard`` (``I/N``).
    ``extra``: keys of the file this version does not know, kept as they were.

    ``row["label"]`` reads a field (or an extra key) as rows written as dicts were read.
    """

    point_id: str
    order: int = 0
    label: str = ""
    baseline: bool = False
    method: str = ""
    overrides: dict = field(default_factory=dict)
    opts: list = field(default_factory=list)
    metric: str | None = None
    metric_mode: str = "max"
    metric_value: float | None = None
    metrics: dict = field(default_factory=dict)
    backbone_gmacs: float | None = None
    model_gmacs: float | None = None
    input_size: list = field(default_factory=list)
    padded_input: list | None = None
    frames: int | None = None
    latency_ms: float | None = None
    fps: float | None = None
    speedup_vs_baseline: float | None = None
    baseline_latency_ms_same_run: float | None = None
    peak_memory_mb: float | None = None
    device: str = ""
    num_gpus: int = 1
    versions: dict = field(default_factory=dict)
    time: str = ""
    seconds: float | None = None
    config_file: str = ""
    fingerprint: str = ""
    shard: str | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if not self.method:
            self.method = point_method(self.overrides, self.baseline)

    def __getitem__(self, key: str):
        if key in _FIELDS and key != "extra":
            return getattr(self, key)
        if key in self.extra:
            return self.extra[key]
        raise KeyError(key)

    @classmethod
    def from_dict(cls, data: dict) -> "Row":
        """A row from its JSON object (any version's: see the module docstring)."""
        data = {_RENAMED.get(k, k): v for k, v in data.items()}
        if "point_id" not in data:
            raise SweepError(f"a results row without point_id: {json.dumps(data)[:200]}")
        known = {k: v for k, v in data.items() if k in _FIELDS and k != "extra"}
        extra = {k: v for k, v in data.items() if k not in _FIELDS}
        return cls(**known, extra={**data.get("extra", {}), **extra})

    def to_dict(self) -> dict:
        """The JSON object: every field, then the extra keys at top level."""
        out = asdict(self)
        extra = out.pop("extra")
        out.update((k, v) for k, v in extra.items() if k not in out)
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict())


_FIELDS = {f.name: f for f in fields(Row)}
# string fields -> whether an empty cell is "" (str) rather than None (str | None)
_STRINGS = {f.name: f.type == "str" for f in fields(Row) if f.type in ("str", "str | None")}
#: results.csv columns: every field but ``extra``; dicts and lists as JSON
CSV_FIELDS = ["order", "point_id", "label", "method", "baseline", "overrides", "metric", "metric_value",
              "backbone_gmacs", "model_gmacs", "input_size", "latency_ms", "fps", "speedup_vs_baseline",
              "peak_memory_mb", "metrics", "device", "versions", "time", "fingerprint"]
CSV_FIELDS += [f for f in _FIELDS if f not in CSV_FIELDS and f != "extra"]


def results_name(shard) -> str:
    """``results`` or ``results.shard-I-of-N`` for ``shard`` (I, N)."""
    return RESULTS if shard is None else f"{RESULTS}.shard-{shard[0]}-of-{shard[1]}"


def rows_from_jsonl(text: str) -> list[Row]:
    return [Row.from_dict(json.loads(line)) for line in text.splitlines() if line.strip()]


def rows_to_jsonl(rows: list[Row]) -> str:
    return "".join(r.to_json() + "\n" for r in rows)


def _csv_cell(value):
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value)


def rows_to_csv(rows: list[Row]) -> str:
    """``CSV_FIELDS`` columns; strings as they are, None empty, everything else as JSON."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, CSV_FIELDS)
    w.writeheader()
    for r in rows:
        w.writerow({k: _csv_cell(getattr(r, k)) for k in CSV_FIELDS})
    return buf.getvalue()


def _csv_value(name: str, text: str):
    if name in _STRINGS:
        return text if text or _STRINGS[name] else None
    if text == "":
        return None
    if text in ("True", "False"):  # csv's str(bool), as older versions wrote it
        return text == "True"
    return json.loads(text)


def rows_from_csv(text: str) -> list[Row]:
    """Rows back from :func:`rows_to_csv`'s text (columns it does not know are kept as extra)."""
    rows = []
    for record in csv.DictReader(io.StringIO(text)):
        data = {k: _csv_value(k, v) if k in _FIELDS else v for k, v in record.items()}
        rows.append(Row.from_dict(data))
    return rows


def read_rows(out_dir) -> list[Row]:
    """Rows of every results*.jsonl under ``out_dir``, one per point (merged shards), the
    baseline first, then in sweep order."""
    rows = {}
    for path in sorted(Path(out_dir).glob(f"{RESULTS}*.jsonl")):
        for row in rows_from_jsonl(path.read_text()):
            rows.setdefault(row.point_id, row)
    return sorted(rows.values(), key=lambda r: (not r.baseline, r.order))


def _write(out_dir: Path, name: str, rows: list[Row]) -> None:
    atomic_write(out_dir / f"{name}.jsonl", rows_to_jsonl(rows))
    atomic_write(out_dir / f"{name}.csv", rows_to_csv(rows))


def append_row(out_dir, shard, row: Row) -> None:
    """Add ``row`` to this run's JSONL and CSV (replacing a row of the same point); each file
    is rewritten whole to a temporary name and renamed."""
    out_dir = Path(out_dir)
    jsonl = out_dir / f"{results_name(shard)}.jsonl"
    rows = rows_from_jsonl(jsonl.read_text()) if jsonl.exists() else []
    rows = [r for r in rows if r.point_id != row.point_id] + [row]
    _write(out_dir, results_name(shard), rows)


def merge(out_dir) -> list[Row]:
    """Join every shard's rows into ``results.jsonl`` / ``results.csv`` (one row per point);
    returns the rows. A shard ``I/N`` whose rows file is missing (not run, not finished a
    point yet, or its folder not copied here) is named in a warning: merge again once it has
    run."""
    out_dir = Path(out_dir)
    rows = read_rows(out_dir)
    if not rows:
        raise SweepError(f"no results*.jsonl rows under {out_dir}")
    prints = {r.fingerprint for r in rows}
    if len(prints) > 1:
        raise SweepError(f"{out_dir} mixes rows of different sweeps (fingerprints {sorted(prints)})")
    counts = {int(r.shard.split("/")[1]) for r in rows if r.shard}
    missing = [f"{i}/{n}" for n in sorted(counts) for i in range(n)
               if not (out_dir / f"{results_name((i, n))}.jsonl").exists()]
    if missing:
        logger.warning(f"no results from shard(s) {', '.join(missing)} in {out_dir}: the merged table lacks "
                       "their points (a shard with no point of its own writes nothing); merge again once "
                       "they have run")
    _write(out_dir, RESULTS, rows)
    return rows


def check_output_dir(out_dir: Path, rows: list[Row], spec: SweepSpec) -> None:
    """Rows already in ``out_dir`` must come from this sweep (same :meth:`SweepSpec.fingerprint`)."""
    if {r.fingerprint for r in rows} - {spec.fingerprint()}:
        raise SweepError(f"{out_dir} holds results of a different sweep (config file contents, opts or "
                         "input size changed); use a new --output-dir")


@contextlib.contextmanager
def output_lock(out_dir, shard=None):
    """Hold ``out_dir`` (for this shard) exclusively while a sweep writes there: a second
    sweep on the same folder and shard refuses at once, naming the holder. Shards lock
    separately, so they can run side by side and merge. The lock is the kernel's (flock):
    it goes with the process, also when it is killed."""
    import fcntl

    out_dir = Path(out_dir)
    path = out_dir / f".{results_name(shard)}.lock"
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise SweepError(f"{out_dir} is in use by another sweep ({holder}); wait for it to "
                             "finish, or use another --output-dir (or --shard I/N to split one "
                             "sweep)") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {platform.node()} since {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                f"{' '.join(sys.argv)}")
        f.flush()
        try:
            yield
        finally:
            f.seek(0)
            f.truncate()
            fcntl.flock(f, fcntl.LOCK_UN)
