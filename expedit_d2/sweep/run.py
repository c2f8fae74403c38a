"""The run: validate every point, then evaluate and measure this shard's points not yet in
the output folder, one :class:`~expedit_d2.sweep.store.Row` each, and rewrite the report."""
from __future__ import annotations

import logging
import time
from pathlib import Path

from .measure import (device_name, evaluate_point, flatten_metrics, gmacs_of, latency_vs_baseline, load_model,
                      measure_memory, point_dir, primary_metric, versions)
from .points import check_test_datasets, validate_points
from .report import write_report
from .spec import SweepSpec, expand_points
from .store import Row, append_row, check_output_dir, output_lock, read_rows

__all__ = ["run_sweep"]

logger = logging.getLogger("expedit_d2.sweep")


def run_sweep(spec: SweepSpec, out_dir, shard=None, num_gpus: int = 1, show_progress: bool = True) -> list[Row]:
    """Evaluate this shard's points not yet in ``out_dir`` and rewrite the report; returns
    the rows written now. ``out_dir`` is locked for this shard meanwhile (:func:`output_lock`).
    ``show_progress``: a bar over the points (with the ETA and the point's current stage) on
    stderr when it is a terminal (:func:`expedit_d2.progress.progress_bar`); the log has a line
    per point either way."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with output_lock(out_dir, shard):
        return _run_sweep(spec, out_dir, shard, num_gpus, show_progress)


def _run_sweep(spec: SweepSpec, out_dir: Path, shard, num_gpus: int, show_progress: bool) -> list[Row]:
    from ..engine import load_project
    from ..progress import logs_above, progress_bar
    from .protocol import sweep_protocol

    rows = read_rows(out_dir)
    check_output_dir(out_dir, rows, spec)
    done = {r.point_id for r in rows}
    project = load_project(spec.project)
    project.register_datasets()
    protocol = sweep_protocol(project)
    points = expand_points(spec)
    cfgs = validate_points(project, spec, points)  # every point, before any evaluation
    check_test_datasets(cfgs["baseline"][0])
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
    # the weights, as every point's --eval-only will load them, before any evaluation
    baseline_model = load_model(project, cfgs["baseline"][0], spec.allow_partial_weights)
    if not spec.timing and not any(p.baseline for p in todo):
        baseline_model = None  # neither timed against nor measured
    written = []
    bar = progress_bar(total=len(todo), desc="sweep", unit="point", enabled=None if show_progress else False)
    with bar, logs_above(bar):  # the per-point log lines print above the bar, not into it

        def stage(point, what):
            bar.set_postfix_str(f"{point.label}: {what}")

        for point in todo:
            cfg, opts = cfgs[point.id]
            t0 = time.time()
            logger.info(f"[{point.label}] evaluating: {' '.join(opts) or '(baseline)'}")
            stage(point, "evaluating")
            metrics = flatten_metrics(evaluate_point(spec.project, spec, opts, out_dir / "points" / point_dir(point),
                                                     num_gpus))
            metric, mode = primary_metric(spec, protocol, metrics)
            model = (baseline_model if point.baseline and baseline_model is not None
                     else load_model(project, cfg, spec.allow_partial_weights))
            stage(point, "GMACs")
            flops = gmacs_of(model, cfg, spec.input_size, spec.frames)
            latency = base_latency = None
            if spec.timing:
                stage(point, "timing")
                latency, base_latency = latency_vs_baseline(model, baseline_model, cfg, spec)
            if spec.memory:
                stage(point, "peak memory")
            peak = measure_memory(spec, opts, cfg, model) if spec.memory else None
            if model is not baseline_model:
                del model
            row = Row(
                point_id=point.id, order=order[point.id], label=point.label, baseline=point.baseline,
                method=point.method, overrides=dict(point.overrides), opts=opts, metric=metric, metric_mode=mode,
                metric_value=metrics[metric], metrics=metrics,
                backbone_gmacs=flops["backbone"], model_gmacs=flops["model"],
                input_size=list(spec.input_size), padded_input=list(flops["padded"]), frames=spec.frames,
                latency_ms=None if latency is None else 1e3 * latency,
                fps=None if latency is None else 1.0 / latency,
                speedup_vs_baseline=None if latency is None else base_latency / latency,
                baseline_latency_ms_same_run=None if base_latency is None else 1e3 * base_latency,
                peak_memory_mb=peak, device=device_name(device), num_gpus=num_gpus, versions=versions(),
                time=time.strftime("%Y-%m-%dT%H:%M:%S%z"), seconds=time.time() - t0, config_file=spec.config_file,
                fingerprint=spec.fingerprint(), shard=None if shard is None else f"{shard[0]}/{shard[1]}",
            )
            append_row(out_dir, shard, row)
            written.append(row)
            logger.info(f"[{point.label}] {metric} {row.metric_value:.4f}, backbone {row.backbone_gmacs:.2f} GMACs"
                        + ("" if latency is None else f", {row.latency_ms:.1f} ms against the baseline's "
                                                      f"{row.baseline_latency_ms_same_run:.1f} ms timed beside it "
                                                      f"({row.speedup_vs_baseline:.2f}x)"))
            bar.update(1)
    write_report(out_dir)
    return written
