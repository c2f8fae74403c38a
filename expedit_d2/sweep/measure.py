"""Measuring one point: its evaluation (``train_net.py --eval-only`` in a subprocess), GMACs,
latency against the baseline, and peak memory (the memory child of
:mod:`expedit_d2.measure`: ``python -m expedit_d2.sweep --memory-child JOB`` on CPU).
"""
from __future__ import annotations

import json
import platform
import re
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from ..checkpoint import PARTIAL_FLAG, WeightsError, load_weights
from .spec import Point, SweepError, SweepSpec

__all__ = ["evaluate_point", "child_exception", "flatten_metrics", "primary_metric", "load_model", "image",
           "gmacs_of", "latency_vs_baseline", "measure_memory", "memory_child", "device_name", "versions",
           "point_dir"]

_WEIGHTS_ERROR = re.compile(r"^(?:[\w.]+\.)?Weights(?:NotFound)?Error: ")


def flatten_metrics(results: dict, prefix="") -> dict[str, float]:
    """An evaluation's nested results -> ``{"evaluator/metric": value}`` (numbers only)."""
    out = {}
    for k, v in results.items():
        if isinstance(v, dict):
            out.update(flatten_metrics(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = float(v)
    return out


def primary_metric(spec: SweepSpec, protocol, metrics: dict) -> tuple[str, str]:
    """(name, ``max`` | ``min``) of the sweep's metric: ``spec.metric``, else the first of the
    project's ``primary_metrics`` (:class:`expedit_d2.sweep.protocol.SweepProtocol`) in ``metrics``."""
    name = spec.metric or next((m for m in protocol.primary_metrics if m in metrics), None)
    if name is None or name not in metrics:
        raise SweepError(f"metric {name!r} is not among the evaluator's results {sorted(metrics)}; "
                         "pass --metric (or declare primary_metrics in the project's SWEEP)")
    mode = spec.metric_mode or ("min" if protocol.lower_is_better_for(name) else "max")
    return name, mode


def versions() -> dict:
    import detectron2

    import expedit_d2

    return {"python": platform.python_version(), "torch": torch.__version__,
            "detectron2": detectron2.__version__, "expedit_d2": expedit_d2.__version__}


def device_name(device: str) -> str:
    d = torch.device(device)
    if d.type == "cuda":
        return torch.cuda.get_device_name(d)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def point_dir(point: Point) -> str:
    """The point's folder under ``<output>/points``: its label, unique with the id's start."""
    return point.label if point.baseline else f"{point.label}-{point.id[:6]}"


def load_model(project, cfg, allow_partial: bool = False):
    """The point's model with ``MODEL.WEIGHTS`` loaded as ``--eval-only`` loads them."""
    model = project.Trainer.build_model(cfg).eval()
    load_weights(project.Checkpointer(model), cfg.MODEL.WEIGHTS, allow_partial=allow_partial)
    return model


def image(cfg, size, seed=0) -> torch.Tensor:
    """The sweep's (C, H, W) image of ``size``: uniform 0..255, the same for every point."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(len(cfg.MODEL.PIXEL_MEAN), *size, generator=g) * 255).to(cfg.MODEL.DEVICE)


def _inputs(cfg, size, frames=None) -> list[dict]:
    """The model's input: the sweep's image, or a clip of ``frames`` copies of it (video)."""
    from ..inputs import model_inputs

    return model_inputs(image(cfg, size), frames)


def gmacs_of(model, cfg, size, frames=None) -> dict:
    """Backbone and whole-model GMACs on the sweep's image, or per clip of ``frames`` of it
    (:func:`expedit_d2.flops.gmacs`)."""
    from ..flops import gmacs

    return gmacs(model, image(cfg, size), frames=frames)


def latency_vs_baseline(model, baseline_model, cfg, spec: SweepSpec) -> tuple[float, float]:
    """(point seconds, baseline seconds): medians of ``spec.repeats`` batch-1 forwards after
    ``spec.warmup``, the two timed interleaved in this process (the baseline's own when
    ``model`` is the baseline)."""
    from ..measure import time_interleaved

    inputs = _inputs(cfg, spec.input_size, spec.frames)

    def run(m):
        with torch.inference_mode():
            m(inputs)

    fns = {"point": lambda: run(model)}
    if model is not baseline_model:
        fns["baseline"] = lambda: run(baseline_model)
    times = time_interleaved(fns, cfg.MODEL.DEVICE, spec.repeats, spec.warmup)
    return times["point"], times.get("baseline", times["point"])


def memory_child(job: str) -> None:
    """``python -m expedit_d2.sweep --memory-child JOB``: build the point's model in this
    fresh process and print the peak extra bytes of one forward (:mod:`expedit_d2.measure`)."""
    from ..engine import load_project
    from ..measure import forward_peak_bytes, print_child_peak
    from .points import point_args

    job = json.loads(job)
    spec = SweepSpec(**job["spec"])
    project = load_project(spec.project)
    project.register_datasets()
    cfg = project.build_config(point_args(spec, job["opts"]))
    model = load_model(project, cfg, spec.allow_partial_weights)
    inputs = _inputs(cfg, spec.input_size, spec.frames)
    print_child_peak(forward_peak_bytes(lambda: model(inputs), cfg.MODEL.DEVICE))


def measure_memory(spec: SweepSpec, opts: list[str], cfg, model) -> float | None:
    """Peak extra MB of one forward of ``model``: on CUDA in this process, elsewhere in a
    fresh child that builds the same model (:func:`expedit_d2.measure.peak_memory_mb`)."""
    from ..measure import peak_memory_mb

    inputs = _inputs(cfg, spec.input_size, spec.frames)
    job = json.dumps({"spec": asdict(spec), "opts": opts})
    return peak_memory_mb(lambda: model(inputs), cfg.MODEL.DEVICE,
                          [sys.executable, "-m", "expedit_d2.sweep", "--memory-child", job])


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


def evaluate_point(project_dir, spec: SweepSpec, opts: list[str], point_dir: Path, num_gpus: int) -> dict:
    """The project's script (``train_net.py``, or the one ``project`` names, e.g.
    ``train_net_video.py``) with ``--eval-only`` in a subprocess; returns its ``eval_results.json``. A failed
    evaluation raises with the exception the child raised (a :class:`WeightsError` when the
    weights were the problem), the command and the log's path."""
    from ..engine import EVAL_RESULTS, project_script

    result = point_dir / EVAL_RESULTS
    if result.exists():
        result.unlink()
    partial = [PARTIAL_FLAG] if spec.allow_partial_weights else []
    cmd = [sys.executable, str(project_script(project_dir)), "--config-file", spec.config_file,
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
