"""Accuracy versus GMACs and speed over clustering settings: the sweep every project uses.

    python -m expedit_d2.sweep --config-file projects/DPT/configs/dpt_hybrid_nyuv2.yaml \\
        --input-size 480 640 --output-dir output/sweep_dpt \\
        --grid "MODEL.EXPEDIT.CLUSTERING_LOCATION=[2, 4, 6]" \\
        --grid "MODEL.EXPEDIT.NUM_CLUSTERS=[[14, 14], [16, 16], [24, 24]]" MODEL.WEIGHTS dpt_hybrid_nyu.pt
    python -m expedit_d2.sweep --sweep-file configs/sweeps/dpt_hybrid_nyuv2.yaml MODEL.WEIGHTS ...

A sweep is a base config (+ weights), the project that owns it (the folder of its
``train_net.py``, found from the config's path or given with ``--project``), an input size,
and a grid: the product of ``KEY=[values]`` lists plus any explicit points. The
un-expedited baseline is always point 0. For every point:

* backbone and whole-model GMACs (fvcore multiply-adds, one image of the stated size; GFLOPs
  in the two-flops-per-multiply-add convention are twice that),
* latency (median of ``--repeats`` after warm-up, synchronised, batch 1), FPS, and the speed-up
  over the baseline timed interleaved with it in the same process,
* peak memory of one forward (on CPU in a fresh process, see :mod:`expedit_d2.measure`),
* the task's metrics from the project's own evaluators: ``train_net.py --eval-only`` runs in a
  subprocess (Detectron2's ``launch`` on ``--num-gpus``) and leaves ``eval_results.json``.

Every grid value is checked before anything is evaluated: unknown config keys, values the
backbone rejects (alpha beyond the depth), and cluster grids larger than the token grid at the
stated input size (a shape-only forward on the meta device). So are the weights: the baseline
model loads ``MODEL.WEIGHTS`` as ``--eval-only`` does (:func:`expedit_d2.checkpoint.load_weights`),
so no weights, a missing or unreadable file, or a checkpoint of another model stop the sweep with
an error naming the file and the first offending keys; ``--allow-partial-weights`` (passed on to
every point's evaluation) accepts a partial load. A point whose evaluation fails reports the
exception its ``train_net.py`` raised.

Results: one row per point, appended atomically to ``results.jsonl`` and ``results.csv``
(``results.shard-I-of-N.*`` with ``--shard I/N``); a rerun skips the points already there, so a
killed sweep resumes without duplicates. ``table.md`` (deltas vs. the baseline) and
``pareto.png`` (metric vs. backbone GMACs and vs. FPS, baseline and Pareto front marked) are
rebuilt from all rows after each run; ``--merge`` joins the shards' rows into ``results.*``.
``--budget-gmacs`` / ``--budget-ms`` report the best setting within a budget.

Official Expedit Swin keys are accepted as grid keys (``MODEL.SWIN.CLUSTERING_LOCATION``,
``MODEL.SWIN.TOKEN_CLUSTERING_BLOCK.NUM_SPIXELS`` ...) and mapped to ``MODEL.EXPEDIT.*``; a
base config on a plain backbone (``D2SwinTransformer``, ``D2ViT``, ``D2ViTHybrid``) or on
``D2HourglassSwinTransformer`` is rewritten onto ``ExpeditBackbone`` for expedited points.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import io
import itertools
import json
import logging
import math
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml

from detectron2.engine import default_argument_parser
from detectron2.utils.logger import setup_logger

from .checkpoint import PARTIAL_FLAG, WeightsError, load_weights
from .cli import HelpFormatter
from .fileio import atomic_write
from .flops import FLOPS_PER_MAC

__all__ = ["SweepSpec", "Point", "SweepError", "expand_points", "point_opts", "validate_points",
           "run_sweep", "read_rows", "merge", "write_report", "best_within_budget", "main", "cli"]

logger = logging.getLogger("expedit_d2.sweep")

# official Expedit Swin keys -> ours (NUM_SPIXELS: clusters per window, a square)
ALIASES = {
    "MODEL.SWIN.CLUSTERING_LOCATION": "MODEL.EXPEDIT.CLUSTERING_LOCATION",
    "MODEL.SWIN.TOKEN_CLUSTERING_BLOCK.NUM_SPIXELS": "MODEL.EXPEDIT.NUM_CLUSTERS",
    "MODEL.SWIN.TOKEN_CLUSTERING_BLOCK.N_ITERS": "MODEL.EXPEDIT.ITERS",
    "MODEL.SWIN.TOKEN_CLUSTERING_BLOCK.TEMPERATURE": "MODEL.EXPEDIT.TEMPERATURE",
    "MODEL.SWIN.TOKEN_CLUSTERING_BLOCK.WINDOW_SIZE": "MODEL.EXPEDIT.WINDOW",
    "MODEL.SWIN.TOKEN_RECONSTRUCTION_BLOCK.K": "MODEL.EXPEDIT.RECON_K",
    "MODEL.SWIN.TOKEN_RECONSTRUCTION_BLOCK.TEMPERATURE": "MODEL.EXPEDIT.RECON_TEMPERATURE",
}
PLAIN_BACKBONES = ("D2SwinTransformer", "D2ViT", "D2ViTHybrid")
# default primary metrics, in order of preference; metrics where lower is better
PRIMARY_METRICS = ("panoptic_seg/PQ", "segm/AP", "sem_seg/mIoU", "depth/rmse", "bbox/AP")
LOWER_IS_BETTER = {"rmse", "rmse_log", "abs_rel", "sq_rel", "log10", "silog"}
RESULTS = "results"


class SweepError(ValueError):
    """A sweep that cannot run as asked (bad grid value, mismatched output folder ...)."""


# ======================================================================================
# the sweep: spec and points
# ======================================================================================
@dataclass
class SweepSpec:
    """What to sweep. ``grid``: key -> list of values (their product); ``points``: explicit
    extra points (key -> value dicts); ``opts``: overrides of the base config for every point."""

    config_file: str
    input_size: tuple[int, int]
    grid: dict = field(default_factory=dict)
    points: list = field(default_factory=list)
    opts: list = field(default_factory=list)
    project: str | None = None
    metric: str | None = None
    metric_mode: str | None = None  # "max" or "min"; from the metric's name when None
    repeats: int = 5
    warmup: int = 2
    memory: bool = True
    timing: bool = True
    allow_partial_weights: bool = False  # --allow-partial-weights for every evaluation

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
        for key, values in self.grid.items():
            if not isinstance(values, list) or not values:
                raise SweepError(f"grid {key}: expected a non-empty list of values, got {values!r}")
        if self.metric_mode not in (None, "max", "min"):
            raise SweepError(f"metric_mode must be 'max' or 'min', got {self.metric_mode!r}")
        if self.repeats < 1 or self.warmup < 0:
            raise SweepError(f"repeats must be >= 1 and warmup >= 0, got {self.repeats}, {self.warmup}")
        if self.project is None:
            self.project = str(find_project(self.config_file))

    def fingerprint(self) -> str:
        """What makes two runs' rows comparable: config file contents, base opts, input size."""
        h = hashlib.sha1(Path(self.config_file).read_bytes())
        h.update(json.dumps([self.opts, list(self.input_size)]).encode())
        return h.hexdigest()[:12]


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
    def label(self) -> str:
        if self.baseline:
            return "baseline"
        d = dict(self.overrides)
        parts = []
        if "MODEL.EXPEDIT.CLUSTERING_LOCATION" in d:
            parts.append(f"a{d.pop('MODEL.EXPEDIT.CLUSTERING_LOCATION')}")
        if "MODEL.EXPEDIT.NUM_CLUSTERS" in d:
            h, w = d.pop("MODEL.EXPEDIT.NUM_CLUSTERS")
            parts.append(f"{h}x{w}")
        parts += [f"{k.rsplit('.', 1)[-1]}={v}" for k, v in d.items()]
        return "_".join(parts) or "base"


def find_project(config_file) -> Path:
    """The nearest folder above ``config_file`` holding a ``train_net.py``."""
    from .engine import find_project as find

    project = find(config_file)
    if project is None:
        raise SweepError(f"no train_net.py in any folder above {config_file}; pass --project")
    return project


def _canonical(key: str, value):
    """Official Expedit key/value -> ``MODEL.EXPEDIT`` key/value."""
    if key not in ALIASES:
        return key, value
    if key.endswith("NUM_SPIXELS"):
        side = math.isqrt(int(value)) if isinstance(value, int) and value > 0 else 0
        if side * side != value:
            raise SweepError(f"{key}={value!r}: clusters per window must be a positive square (64 = 8x8)")
        value = [side, side]
    return ALIASES[key], value


def _normalise(value):
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(value, list):
        return [_normalise(v) for v in value]
    return value


def expand_points(spec: SweepSpec) -> list[Point]:
    """Baseline first, then the grid's product, then the explicit points (duplicates once)."""
    keys = list(spec.grid)
    combos = [dict(zip(keys, vals)) for vals in itertools.product(*(spec.grid[k] for k in keys))] if keys else []
    out, seen = [Point((), baseline=True)], set()
    for raw in combos + list(spec.points):
        if not isinstance(raw, dict) or not raw:
            raise SweepError(f"a sweep point must be a non-empty KEY: value mapping, got {raw!r}")
        pairs = dict(_canonical(k, _normalise(v)) for k, v in raw.items())
        point = Point(tuple(sorted(pairs.items())))
        if point.id not in seen:
            seen.add(point.id)
            out.append(point)
    return out


def _opt_value(value) -> str:
    return value if isinstance(value, str) else repr(value)


def _backbone_key(cfg) -> str:
    """Which config key names the (bottom-up) backbone."""
    if cfg.MODEL.BACKBONE.NAME == "build_bottom_up_fpn_backbone":
        return "MODEL.FPN.BOTTOM_UP"
    return "MODEL.BACKBONE.NAME"


def point_opts(base_cfg, point: Point) -> list[str]:
    """Config overrides (KEY VALUE ...) that turn the base config into ``point``."""
    key = _backbone_key(base_cfg)
    name = base_cfg.MODEL.FPN.BOTTOM_UP if key == "MODEL.FPN.BOTTOM_UP" else base_cfg.MODEL.BACKBONE.NAME
    overrides = dict(point.overrides)
    expedited = any(k.startswith("MODEL.EXPEDIT.") for k in overrides)
    opts: dict = {}
    if point.baseline:
        if name == "ExpeditBackbone":
            opts["MODEL.EXPEDIT.ENABLED"] = False
        elif name == "D2HourglassSwinTransformer":
            opts[key] = "D2SwinTransformer"
    elif expedited:
        if name == "D2HourglassSwinTransformer":  # carry the official keys over, then override
            s = base_cfg.MODEL.SWIN
            for official, ours in ALIASES.items():
                node = s
                for part in official.split(".")[2:]:
                    node = node[part]
                opts.update([_canonical(official, node)])
            opts.update({key: "ExpeditBackbone", "MODEL.EXPEDIT.BASE": "D2SwinTransformer"})
        elif name in PLAIN_BACKBONES:
            opts.update({key: "ExpeditBackbone", "MODEL.EXPEDIT.BASE": name})
        elif name != "ExpeditBackbone":
            raise SweepError(f"{key}={name!r}: MODEL.EXPEDIT.* grid keys need ExpeditBackbone, "
                             f"D2HourglassSwinTransformer or one of {PLAIN_BACKBONES}")
        opts["MODEL.EXPEDIT.ENABLED"] = True
    opts.update(overrides)
    return [item for k, v in opts.items() for item in (k, _opt_value(v))]


# ======================================================================================
# validation (before any evaluation)
# ======================================================================================
def _args(spec: SweepSpec, opts: list[str], extra: list[str] = (), num_gpus: int = 1):
    return default_argument_parser().parse_args(
        ["--config-file", spec.config_file, "--num-gpus", str(num_gpus), *extra, *spec.opts, *opts])


def build_point_cfg(project, spec: SweepSpec, point: Point, base_cfg):
    """The point's frozen config; bad keys/values raise :class:`SweepError` naming them."""
    opts = point_opts(base_cfg, point)
    try:
        return project.build_config(_args(spec, opts)), opts
    except (KeyError, ValueError, AssertionError, TypeError) as e:
        raise SweepError(f"point {point.label} ({dict(point.overrides)}): {e}") from e


def validate_points(project, spec: SweepSpec, points: list[Point]):
    """Build every point's config and backbone (on the meta device) and run the backbone on a
    meta image of the stated size (padded as the model pads it); returns the configs."""
    from detectron2.modeling import build_backbone

    try:
        base_cfg = project.build_config(_args(spec, []))
    except (KeyError, ValueError, AssertionError, TypeError) as e:
        raise SweepError(f"base config {spec.config_file} with opts {spec.opts}: {e}") from e
    cfgs = {}
    for point in points:
        cfg, opts = build_point_cfg(project, spec, point, base_cfg)
        vcfg = cfg
        if "EXPEDIT" in cfg.MODEL:  # a stated input smaller than the cluster grid is an error here
            vcfg = cfg.clone()
            vcfg.defrost()
            vcfg.MODEL.EXPEDIT.SMALL_INPUT = "error"
        try:
            with torch.device("meta"):
                backbone = build_backbone(vcfg)
                div = max(int(getattr(backbone, "size_divisibility", 0) or 0),
                          int(cfg.MODEL.get("MASK_FORMER", {}).get("SIZE_DIVISIBILITY", 0) or 0), 1)
                H, W = (-(-s // div) * div for s in spec.input_size)
                backbone(torch.empty(1, len(cfg.MODEL.PIXEL_MEAN), H, W))
        except (KeyError, ValueError, AssertionError) as e:
            raise SweepError(f"point {point.label} ({dict(point.overrides)}) at input "
                             f"{spec.input_size[0]}x{spec.input_size[1]}: {e}") from e
        cfgs[point.id] = (cfg, opts)
    return cfgs


# ======================================================================================
# results files
# ======================================================================================
def _results_name(shard) -> str:
    return RESULTS if shard is None else f"{RESULTS}.shard-{shard[0]}-of-{shard[1]}"


def read_rows(out_dir: Path) -> list[dict]:
    """Rows of every results*.jsonl under ``out_dir``, one per point (merged shards)."""
    rows = {}
    for path in sorted(Path(out_dir).glob(f"{RESULTS}*.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                for old in ("backbone", "model"):  # rows written before the GMACs labels
                    if f"{old}_gflops" in row:
                        row[f"{old}_gmacs"] = row.pop(f"{old}_gflops")
                rows.setdefault(row["point_id"], row)
    return sorted(rows.values(), key=lambda r: (not r["baseline"], r["order"]))


CSV_FIELDS = ["order", "point_id", "label", "baseline", "overrides", "metric", "metric_value",
              "backbone_gmacs", "model_gmacs", "input_size", "latency_ms", "fps",
              "speedup_vs_baseline", "peak_memory_mb", "metrics", "device", "versions", "time",
              "fingerprint"]


def _csv_text(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, CSV_FIELDS, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: json.dumps(r[k]) if isinstance(r.get(k), (dict, list)) else r.get(k) for k in CSV_FIELDS})
    return buf.getvalue()


def append_row(out_dir: Path, shard, row: dict) -> None:
    """Add ``row`` to this run's JSONL and CSV: each file is rewritten whole to a temporary
    name and renamed, so a kill leaves either the old or the new file, never half a row."""
    name = _results_name(shard)
    jsonl = Path(out_dir) / f"{name}.jsonl"
    rows = [json.loads(x) for x in jsonl.read_text().splitlines() if x.strip()] if jsonl.exists() else []
    rows = [r for r in rows if r["point_id"] != row["point_id"]] + [row]
    atomic_write(jsonl, "".join(json.dumps(r) + "\n" for r in rows))
    atomic_write(Path(out_dir) / f"{name}.csv", _csv_text(rows))


def merge(out_dir) -> list[dict]:
    """Join every shard's rows into ``results.jsonl`` / ``results.csv``; returns the rows."""
    out_dir = Path(out_dir)
    rows = read_rows(out_dir)
    if not rows:
        raise SweepError(f"no results*.jsonl rows under {out_dir}")
    prints = {r["fingerprint"] for r in rows}
    if len(prints) > 1:
        raise SweepError(f"{out_dir} mixes rows of different sweeps (fingerprints {sorted(prints)})")
    atomic_write(out_dir / f"{RESULTS}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    atomic_write(out_dir / f"{RESULTS}.csv", _csv_text(rows))
    return rows


# ======================================================================================
# report: table, plot, budget
# ======================================================================================
def _fmt(v, nd=2):
    return "-" if v is None else f"{v:.{nd}f}"


def _pct(v, base):
    if v is None or not base:
        return "-"
    return f"{100.0 * (v - base) / base:+.1f}%"


def best_within_budget(rows: list[dict], budget_gmacs=None, budget_ms=None):
    """The row with the best primary metric whose backbone GMACs / latency fit the budget."""
    ok = [r for r in rows if r.get("metric_value") is not None
          and (budget_gmacs is None or r["backbone_gmacs"] <= budget_gmacs)
          and (budget_ms is None or (r.get("latency_ms") is not None and r["latency_ms"] <= budget_ms))]
    if not ok:
        return None
    lower = rows[0]["metric_mode"] == "min"
    return min(ok, key=lambda r: r["metric_value"] if lower else -r["metric_value"])


def pareto_front(rows: list[dict], x: str) -> list[dict]:
    """Rows no other row beats on both ``x`` (lower better for GMACs, higher for FPS) and
    the metric; sorted by ``x``."""
    lower_x = x != "fps"
    lower_m = rows[0]["metric_mode"] == "min" if rows else False

    def better_eq(a, b):  # a at least as good as b on both, strictly on one
        ax, bx, am, bm = a[x], b[x], a["metric_value"], b["metric_value"]
        gx = ax <= bx if lower_x else ax >= bx
        gm = am <= bm if lower_m else am >= bm
        return gx and gm and (ax != bx or am != bm)

    valid = [r for r in rows if r.get(x) is not None and r.get("metric_value") is not None]
    front = [r for r in valid if not any(better_eq(o, r) for o in valid)]
    return sorted(front, key=lambda r: r[x])


def table_markdown(rows: list[dict], budget=None) -> str:
    base = next((r for r in rows if r["baseline"]), None)
    metric = rows[0]["metric"]
    lines = [f"Sweep of `{rows[0]['config_file']}` at input {rows[0]['input_size'][0]}x"
             f"{rows[0]['input_size'][1]} on {rows[0]['device']} ({len(rows)} points; GMACs: "
             "fvcore multiply-adds, one image (GFLOPs = 2 x GMACs); latency: median, batch 1; speed-up: baseline time / point time, the two "
             "timed interleaved in one run, so machine drift cancels; deltas vs. the baseline)", "",
             f"| point | backbone GMACs | model GMACs | latency ms | FPS | speed-up | peak MB | "
             f"{metric} | delta |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        b = base or r
        dm = None if base is None or r["metric_value"] is None else r["metric_value"] - base["metric_value"]
        lines.append(
            f"| {r['label']} | {_fmt(r['backbone_gmacs'])} ({_pct(r['backbone_gmacs'], b['backbone_gmacs'])}) "
            f"| {_fmt(r['model_gmacs'])} ({_pct(r['model_gmacs'], b['model_gmacs'])}) "
            f"| {_fmt(r['latency_ms'], 1)} | {_fmt(r['fps'])} | {_fmt(r['speedup_vs_baseline'])}x "
            f"| {_fmt(r['peak_memory_mb'], 0)} | {_fmt(r['metric_value'], 3)} "
            f"| {'-' if dm is None else f'{dm:+.3f}'} |")
    if budget is not None:
        what, best = budget
        lines += ["", f"Best {metric} within {what}: " +
                  ("none fits" if best is None else
                   f"**{best['label']}** ({metric} {best['metric_value']:.3f}, "
                   f"{best['backbone_gmacs']:.2f} backbone GMACs, {_fmt(best['latency_ms'], 1)} ms)")]
    return "\n".join(lines) + "\n"


def plot_pareto(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = rows[0]["metric"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, x, xlabel in ((axes[0], "backbone_gmacs", "backbone GMACs"), (axes[1], "fps", "FPS (batch 1)")):
        pts = [r for r in rows if r.get(x) is not None and r.get("metric_value") is not None]
        others = [r for r in pts if not r["baseline"]]
        ax.scatter([r[x] for r in others], [r["metric_value"] for r in others], s=28, color="tab:blue",
                   label="expedited settings", zorder=3)
        for r in pts:
            ax.annotate(r["label"], (r[x], r["metric_value"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        front = pareto_front(pts, x)
        if front:
            ax.plot([r[x] for r in front], [r["metric_value"] for r in front], "-", color="tab:orange",
                    lw=1.5, label="Pareto front", zorder=2)
        for r in pts:
            if r["baseline"]:
                ax.scatter([r[x]], [r["metric_value"]], marker="*", s=180, color="tab:red",
                           label="baseline", zorder=4)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(metric + (" (lower is better)" if rows[0]["metric_mode"] == "min" else ""))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{Path(rows[0]['config_file']).name}: {metric} vs. cost "
                 f"(input {rows[0]['input_size'][0]}x{rows[0]['input_size'][1]}, {rows[0]['device']})",
                 fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, dpi=120, format="png"))
    plt.close(fig)


def write_report(out_dir, budget_gmacs=None, budget_ms=None) -> tuple[list[dict], dict | None]:
    """``table.md`` and ``pareto.png`` from every row under ``out_dir``; returns the rows and
    the budget's best row (None without a budget or when nothing fits)."""
    out_dir = Path(out_dir)
    rows = read_rows(out_dir)
    if not rows:
        raise SweepError(f"no sweep results under {out_dir}")
    budget = None
    if budget_gmacs is not None or budget_ms is not None:
        what = " and ".join(s for s in (budget_gmacs is not None and f"{budget_gmacs} backbone GMACs",
                                        budget_ms is not None and f"{budget_ms} ms") if s)
        budget = (what, best_within_budget(rows, budget_gmacs, budget_ms))
    atomic_write(out_dir / "table.md", table_markdown(rows, budget))
    plot_pareto(rows, out_dir / "pareto.png")
    return rows, None if budget is None else budget[1]


# ======================================================================================
# measuring one point
# ======================================================================================
def _flatten(results: dict, prefix="") -> dict[str, float]:
    out = {}
    for k, v in results.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = float(v)
    return out


def _versions() -> dict:
    import detectron2

    import expedit_d2

    return {"python": platform.python_version(), "torch": torch.__version__,
            "detectron2": detectron2.__version__, "expedit_d2": expedit_d2.__version__}


def _device_name(device: str) -> str:
    d = torch.device(device)
    if d.type == "cuda":
        return torch.cuda.get_device_name(d)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _load_model(project, cfg, allow_partial: bool = False):
    """The point's model with ``MODEL.WEIGHTS`` loaded as ``--eval-only`` loads them."""
    model = project.Trainer.build_model(cfg).eval()
    load_weights(project.Checkpointer(model), cfg.MODEL.WEIGHTS, allow_partial=allow_partial)
    return model


def _image(cfg, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(len(cfg.MODEL.PIXEL_MEAN), *size, generator=g) * 255).to(cfg.MODEL.DEVICE)


def child_exception(log: str) -> str | None:
    """The exception (``module.Type: message``) of the last traceback in a child's output,
    or None; under Detectron2's ``launch`` on several GPUs that is the failed worker's."""
    start = log.rfind("Traceback (most recent call last):")
    if start < 0:
        return None
    lines = log[start:].splitlines()[1:]
    i = 0
    while i < len(lines) and (not lines[i].strip() or lines[i].startswith((" ", "\t"))):
        i += 1  # the frames: indented "File ..." lines, their source and ^^^ markers
    text = "\n".join(lines[i:]).strip()
    return text[:4000] or None


_WEIGHTS_ERROR = re.compile(r"^(?:[\w.]+\.)?Weights(?:NotFound)?Error: ")


def evaluate_point(project_dir, spec: SweepSpec, opts: list[str], point_dir: Path, num_gpus: int) -> dict:
    """``train_net.py --eval-only`` in a subprocess; returns its ``eval_results.json``. A failed
    evaluation raises with the exception the child raised (a :class:`WeightsError` when the
    weights were the problem), the command and the log's path."""
    from .engine import EVAL_RESULTS

    result = point_dir / EVAL_RESULTS
    if result.exists():
        result.unlink()
    partial = [PARTIAL_FLAG] if spec.allow_partial_weights else []
    cmd = [sys.executable, str(Path(project_dir) / "train_net.py"), "--config-file", spec.config_file,
           "--eval-only", *partial, "--num-gpus", str(num_gpus), *spec.opts, *opts, "OUTPUT_DIR", str(point_dir)]
    point_dir.mkdir(parents=True, exist_ok=True)
    log_path = point_dir / "stdout.txt"
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0 or not result.exists():
        log_text = log_path.read_text(errors="replace")
        error = child_exception(log_text)
        where = f"\n  command: {' '.join(cmd)}\n  log: {log_path}"
        if error and _WEIGHTS_ERROR.match(error):
            raise WeightsError(f"point {point_dir.name}: {error.split(': ', 1)[1]}{where}")
        what = error or f"no exception in the log; its end:\n{log_text[-3000:]}"
        raise RuntimeError(f"evaluation of point {point_dir.name} failed (exit {proc.returncode}): {what}{where}")
    return json.loads(result.read_text())


def _forward_peak_bytes(model, cfg, size) -> int | None:
    """Peak extra bytes of one batch-1 forward on the sweep's image of ``size``."""
    from .measure import peak_memory

    inputs = [{"image": _image(cfg, size), "height": size[0], "width": size[1]}]
    with torch.inference_mode():
        model(inputs)  # warm-up: lazily built buffers are not the forward's peak
        return peak_memory(lambda: model(inputs), cfg.MODEL.DEVICE)


def memory_child(argv) -> None:
    """``python -m expedit_d2.sweep --memory-child JSON``: peak extra bytes of one forward."""
    from .engine import load_project

    job = json.loads(argv)
    spec = SweepSpec(**job["spec"])
    project = load_project(spec.project)
    project.register_datasets()
    cfg = project.build_config(_args(spec, job["opts"]))
    model = _load_model(project, cfg, spec.allow_partial_weights)
    print(json.dumps(_forward_peak_bytes(model, cfg, spec.input_size)))


def measure_memory(spec: SweepSpec, opts: list[str], cfg, model) -> float | None:
    """Peak extra MB of one forward of ``model``: on CUDA in this process, on CPU in a fresh
    child process that builds the same model (see :mod:`expedit_d2.measure`)."""
    from .measure import run_memory_child

    if torch.device(cfg.MODEL.DEVICE).type == "cuda":
        peak = _forward_peak_bytes(model, cfg, spec.input_size)
    else:
        job = json.dumps({"spec": asdict(spec), "opts": opts})
        peak = json.loads(run_memory_child([sys.executable, "-m", "expedit_d2.sweep", "--memory-child", job]))
    return None if peak is None else peak / 2**20


# ======================================================================================
# the run
# ======================================================================================
def _point_dir(point: Point) -> str:
    return point.label if point.baseline else f"{point.label}-{point.id[:6]}"


def _primary_metric(spec: SweepSpec, metrics: dict) -> tuple[str, str]:
    name = spec.metric or next((m for m in PRIMARY_METRICS if m in metrics), None)
    if name is None or name not in metrics:
        raise SweepError(f"metric {name!r} is not among the evaluator's results {sorted(metrics)}; "
                         "pass --metric")
    mode = spec.metric_mode or ("min" if name.rsplit("/", 1)[-1].lower() in LOWER_IS_BETTER else "max")
    return name, mode


def _check_output_dir(out_dir: Path, rows: list[dict], spec: SweepSpec) -> None:
    prints = {r["fingerprint"] for r in rows}
    if prints - {spec.fingerprint()}:
        raise SweepError(f"{out_dir} holds results of a different sweep (config file contents, opts or "
                         "input size changed); use a new --output-dir")


@contextlib.contextmanager
def output_lock(out_dir: Path, shard=None):
    """Hold ``out_dir`` (for this shard) exclusively while a sweep writes there: a second
    sweep on the same folder and shard refuses at once, naming the holder. Shards lock
    separately, so they can run side by side and merge. The lock is the kernel's (flock):
    it goes with the process, also when it is killed."""
    import fcntl

    path = out_dir / f".{_results_name(shard)}.lock"
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


def _check_test_datasets(cfg) -> None:
    """The evaluation needs DATASETS.TEST, registered: say what is missing before any work."""
    from detectron2.data import DatasetCatalog

    if not cfg.DATASETS.TEST:
        raise SweepError("the config has no DATASETS.TEST: the sweep evaluates every point on it; "
                         "set DATASETS.TEST (e.g. DATASETS.TEST \"('coco_2017_val_panoptic',)\")")
    missing = [d for d in cfg.DATASETS.TEST if d not in DatasetCatalog.list()]
    if missing:
        raise SweepError(f"DATASETS.TEST names {missing}, not registered by the project "
                         f"(registered: {sorted(DatasetCatalog.list())[:12]} ...)")


def run_sweep(spec: SweepSpec, out_dir, shard=None, num_gpus: int = 1, show_progress: bool = True) -> list[dict]:
    """Evaluate this shard's points not yet in ``out_dir`` and rewrite the report; returns
    the rows written now. ``out_dir`` is locked for this shard meanwhile (:func:`output_lock`)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with output_lock(out_dir, shard):
        return _run_sweep(spec, out_dir, shard, num_gpus, show_progress)


def _run_sweep(spec: SweepSpec, out_dir: Path, shard, num_gpus: int, show_progress: bool) -> list[dict]:
    from tqdm import tqdm

    from .engine import load_project
    from .flops import gmacs
    from .measure import time_interleaved

    rows = read_rows(out_dir)
    _check_output_dir(out_dir, rows, spec)
    done = {r["point_id"] for r in rows}
    project = load_project(spec.project)
    project.register_datasets()
    points = expand_points(spec)
    cfgs = validate_points(project, spec, points)  # every point, before any evaluation
    _check_test_datasets(cfgs["baseline"][0])
    order = {p.id: i for i, p in enumerate(points)}
    mine = points if shard is None else [p for p in points if order[p.id] % shard[1] == shard[0]]
    todo = [p for p in mine if p.id not in done]
    logger.info(f"{len(points)} points ({len(mine)} in this shard), {len(mine) - len(todo)} already done, "
                f"{len(todo)} to evaluate; results in {out_dir}")
    if not todo:
        if done:  # everything was there already: the report still reflects every row
            write_report(out_dir)
        return []
    device = cfgs["baseline"][0].MODEL.DEVICE
    H, W = spec.input_size
    # the weights, as every point's --eval-only will load them, before any evaluation
    baseline_model = _load_model(project, cfgs["baseline"][0], spec.allow_partial_weights)
    if not spec.timing and not any(p.baseline for p in todo):
        baseline_model = None  # neither timed against nor measured
    written = []
    for point in tqdm(todo, desc="sweep", unit="point", disable=not show_progress):
        cfg, opts = cfgs[point.id]
        t0 = time.time()
        logger.info(f"[{point.label}] evaluating: {' '.join(opts) or '(baseline)'}")
        metrics = _flatten(evaluate_point(spec.project, spec, opts, out_dir / "points" / _point_dir(point), num_gpus))
        metric, mode = _primary_metric(spec, metrics)
        model = (baseline_model if point.baseline and baseline_model is not None
                 else _load_model(project, cfg, spec.allow_partial_weights))
        image = _image(cfg, (H, W))
        flops = gmacs(model, image)
        latency = speedup = base_latency = None
        if spec.timing:
            inputs = [{"image": image, "height": H, "width": W}]

            def run(m):
                with torch.inference_mode():
                    m(inputs)

            fns = {"point": lambda: run(model)}
            if not point.baseline:
                fns["baseline"] = lambda: run(baseline_model)
            times = time_interleaved(fns, device, spec.repeats, spec.warmup)
            latency = times["point"]
            base_latency = times.get("baseline", latency)
            speedup = base_latency / latency
        peak = measure_memory(spec, opts, cfg, model) if spec.memory else None
        if model is not baseline_model:
            del model
        row = {
            "order": order[point.id], "point_id": point.id, "label": point.label, "baseline": point.baseline,
            "overrides": dict(point.overrides), "opts": opts, "metric": metric, "metric_mode": mode,
            "metric_value": metrics[metric], "metrics": metrics,
            "backbone_gmacs": flops["backbone"], "model_gmacs": flops["model"],
            "input_size": list(spec.input_size), "padded_input": list(flops["padded"]),
            "latency_ms": None if latency is None else 1e3 * latency,
            "fps": None if latency is None else 1.0 / latency, "speedup_vs_baseline": speedup,
            "baseline_latency_ms_same_run": None if base_latency is None else 1e3 * base_latency,
            "peak_memory_mb": peak, "device": _device_name(device), "num_gpus": num_gpus,
            "versions": _versions(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "seconds": time.time() - t0, "config_file": spec.config_file, "fingerprint": spec.fingerprint(),
            "shard": None if shard is None else f"{shard[0]}/{shard[1]}",
        }
        append_row(out_dir, shard, row)
        written.append(row)
        logger.info(f"[{point.label}] {metric} {metrics[metric]:.4f}, backbone {flops['backbone']:.2f} GMACs"
                    + ("" if latency is None else f", {1e3 * latency:.1f} ms ({speedup:.2f}x)"))
    write_report(out_dir)
    return written


# ======================================================================================
# command line
# ======================================================================================
def load_sweep_file(path) -> dict:
    """A YAML sweep file: ``config_file``, ``input_size``, ``grid``, ``points``, ``opts``,
    ``project``, ``metric``, ``metric_mode``, ``repeats``, ``warmup``, ``memory``, ``timing``,
    ``allow_partial_weights`` (paths relative to the working directory, as on the command line)."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    allowed = {"config_file", "input_size", "grid", "points", "opts", "project", "metric", "metric_mode",
               "repeats", "warmup", "memory", "timing", "allow_partial_weights"}
    unknown = set(data) - allowed
    if unknown:
        raise SweepError(f"{path}: unknown sweep-file keys {sorted(unknown)} (allowed: {sorted(allowed)})")
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


def _parse_shard(text):
    if text is None:
        return None
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise SweepError(f"--shard {text!r}: expected I/N, e.g. 0/4") from None
    if not 0 <= i < n:
        raise SweepError(f"--shard {text!r}: need 0 <= I < N")
    return i, n


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m expedit_d2.sweep", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--sweep-file", help="YAML sweep file (configs/sweeps/); flags override it")
    p.add_argument("--config-file", help="base config")
    p.add_argument("--project", help="project folder (default: found from the config's path)")
    p.add_argument("--input-size", nargs=2, type=int, metavar=("H", "W"), help="image size for GMACs/latency")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=[V, ...]",
                   help="a grid axis (repeatable); the sweep is the product of the axes")
    p.add_argument("--output-dir", default="output/sweep", help="results, table and plot go here")
    p.add_argument("--num-gpus", type=int, default=1, help="per point evaluation (Detectron2 launch)")
    p.add_argument("--shard", help="I/N: evaluate every N-th point starting at I")
    p.add_argument("--merge", action="store_true", help="join the shards' results, write the report")
    p.add_argument("--report-only", action="store_true", help="write the report from existing results")
    p.add_argument("--metric", help="primary metric, e.g. panoptic_seg/PQ (default: from the task)")
    p.add_argument("--metric-mode", choices=["max", "min"])
    p.add_argument("--repeats", type=int,
                   help=f"timed forwards per point (default: the sweep file's, else {SweepSpec.repeats})")
    p.add_argument("--warmup", type=int,
                   help=f"untimed forwards first (default: the sweep file's, else {SweepSpec.warmup})")
    p.add_argument("--no-memory", action="store_true", help="skip peak-memory measurement")
    p.add_argument(PARTIAL_FLAG, action="store_true",
                   help="evaluate even if MODEL.WEIGHTS does not cover the whole model (passed on to "
                        "train_net.py --eval-only; see its --help); without it that is an error")
    p.add_argument("--budget-gmacs", type=float, help="report the best point within this backbone GMACs")
    p.add_argument("--budget-gflops", type=float,
                   help="the same in GFLOPs, counting two flops per multiply-add (= 2 x GMACs)")
    p.add_argument("--budget-ms", type=float, help="report the best point within this latency (ms)")
    p.add_argument("--memory-child", help=argparse.SUPPRESS)
    p.add_argument("opts", nargs=argparse.REMAINDER, help="base config overrides KEY VALUE ...")
    return p


def spec_from_args(args) -> SweepSpec:
    data = load_sweep_file(args.sweep_file) if args.sweep_file else {}
    for name in ("config_file", "project", "metric", "metric_mode", "repeats", "warmup"):
        if getattr(args, name) is not None:
            data[name] = getattr(args, name)
    if args.input_size:
        data["input_size"] = args.input_size
    if args.grid:
        data["grid"] = {**data.get("grid", {}), **parse_grid(args.grid)}
    data["opts"] = list(data.get("opts", [])) + list(args.opts)
    if args.no_memory:
        data["memory"] = False
    if args.allow_partial_weights:
        data["allow_partial_weights"] = True
    for required in ("config_file", "input_size"):
        if required not in data:
            raise SweepError(f"--{required.replace('_', '-')} is required (or set it in the sweep file)")
    return SweepSpec(**data)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.memory_child:
        memory_child(args.memory_child)
        return 0
    setup_logger(name="expedit_d2")  # Detectron2's own INFO lines stay in each point's log
    out_dir = Path(args.output_dir)
    if args.budget_gflops is not None:
        if args.budget_gmacs is not None:
            raise SweepError("give --budget-gmacs or --budget-gflops, not both")
        args.budget_gmacs = args.budget_gflops / FLOPS_PER_MAC
    budget = args.budget_gmacs is not None or args.budget_ms is not None
    if args.merge:
        merge(out_dir)
    elif not args.report_only:
        spec = spec_from_args(args)
        run_sweep(spec, out_dir, _parse_shard(args.shard), args.num_gpus)  # writes the report
    if args.merge or args.report_only or budget:
        write_report(out_dir, args.budget_gmacs, args.budget_ms)
    rows = read_rows(out_dir)
    if not rows:
        raise SweepError(f"no sweep results under {out_dir}")
    logger.info(f"{len(rows)} points: {out_dir / 'table.md'}, {out_dir / 'pareto.png'}")
    print((out_dir / "table.md").read_text())
    return 0


def cli() -> None:
    """``main`` with a one-line error and exit status 2 for a sweep that cannot run as asked
    (bad grid or options, weights that are missing or not this model's)."""
    try:
        sys.exit(main())
    except (SweepError, WeightsError) as e:
        print(f"sweep: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("sweep: interrupted; every finished point is kept in the output folder's "
              "results.jsonl: run the same command again to resume", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    cli()
