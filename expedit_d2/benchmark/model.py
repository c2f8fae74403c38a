"""Whole-model latency of base vs expedited settings, by parts (``tools/benchmark_model.py``).

* :func:`benchmark` -- one row per setting (baseline first): interleaved latency and its
  per-round ratio to the baseline with a 95% interval, GMACs, the per-part breakdown of a
  second, instrumented pass (:func:`part_seconds`, :func:`with_rest`) with page faults, and
  what post-processing produced (:func:`output_counts`); the tool's docstring says what each
  field means;
* :func:`model_parts`, :func:`compile_entry_points`, :func:`timed_parts` -- the parts timed
  separately, ``torch.compile`` of the entry points a head calls, and the part timers;
* :data:`POOL` -- what ``--pool`` pools of earlier runs (:func:`expedit_d2.benchmark.pool.pool_runs`);
* :func:`format_table`, :func:`format_pooled` -- the Markdown reports.

The settings are a sweep's (:class:`expedit_d2.sweep.SweepSpec`): its points, configs,
image and model loading (:mod:`expedit_d2.sweep.measure`).
"""
from __future__ import annotations

import contextlib
import statistics
import time

import torch
from torch import nn

from ..checks import check_positive_int
from ..cli import autocast
from ..engine import load_project
from ..flops import gmacs
from ..inputs import model_inputs
from ..measure import interleaved_samples, median_interval, minor_page_faults, round_ratios, sync
from ..sweep import Point, SweepError, SweepSpec, expand_points, validate_points
from ..sweep.measure import image as sweep_image, load_model
from .pool import Pooled, PoolSpec

__all__ = ["ENTRY_POINTS", "model_parts", "compile_entry_points", "timed_parts", "part_seconds", "with_rest",
           "output_counts", "build_models", "batch_throughput", "benchmark", "POOL", "format_table", "format_pooled"]


#: the methods through which a part is entered: ``forward`` (``module(x)``), Detectron2's pixel
#: decoders' ``forward_features``, and our token-tap backbones' ``forward_taps`` (DPT calls it
#: directly, not through ``forward``).
ENTRY_POINTS = ("forward", "forward_features", "forward_taps")


def model_parts(model: nn.Module) -> dict[str, nn.Module]:
    """The parts timed separately: what the meta-architecture's ``benchmark_parts()`` names
    (Mask2Former: backbone, pixel decoder, transformer decoder), else ``backbone`` and each
    other top-level child that holds parameters (DPT: reassemble, scratch)."""
    if hasattr(model, "benchmark_parts"):
        return dict(model.benchmark_parts())
    parts = {"backbone": model.backbone}
    parts.update((name, child) for name, child in model.named_children()
                 if name != "backbone" and any(True for _ in child.parameters()))
    return parts


def compile_entry_points(module: nn.Module, **compile_kwargs) -> list[str]:
    """``torch.compile(..., **compile_kwargs)`` each of :data:`ENTRY_POINTS` that ``module``
    has, in place (as instance attributes over the class's methods), and return their names.
    Wrapping the module (``torch.compile(module)``) would compile only ``forward``: a DPT
    head calls its backbone's ``forward_taps``, which such a wrapper hands to the uncompiled
    module."""
    names = [attr for attr in ENTRY_POINTS if callable(getattr(module, attr, None))]
    for attr in names:
        setattr(module, attr, torch.compile(getattr(module, attr), **compile_kwargs))
    return names


@contextlib.contextmanager
def timed_parts(model: nn.Module, device):
    """Within the block, the seconds and the minor page faults inside each of
    :func:`model_parts` are added to the last entries of ``spent[name]`` and ``faults[name]``
    (the caller appends a 0 to each per call); yields ``(spent, faults)`` (faults stay 0
    where the platform does not count them). A part is entered through ``forward``, or as
    Detectron2's pixel decoders (``forward_features``) and our ViTs (``forward_taps``) are
    (:data:`ENTRY_POINTS`): each is timed (the outermost entry only), wrapped on the instance
    for the duration; what the instance held before (a compiled entry point) is put back."""
    parts = model_parts(model)
    spent = {name: [] for name in parts}
    faults = {name: [] for name in parts}
    depth = dict.fromkeys(parts, 0)

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            depth[name] += 1
            if depth[name] == 1:
                sync(device)
                f0 = minor_page_faults() or 0
                t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                depth[name] -= 1
                if depth[name] == 0:
                    sync(device)
                    spent[name][-1] += time.perf_counter() - t0
                    faults[name][-1] += (minor_page_faults() or 0) - f0
        # the timer itself stays out of a compiled model (its list and counter updates would
        # guard and recompile every call); what it calls is still compiled
        return torch.compiler.disable(wrapper, recursive=False)

    missing = object()
    wrapped = []
    try:
        for name, mod in parts.items():
            for attr in ENTRY_POINTS:
                if callable(getattr(mod, attr, None)):
                    wrapped.append((mod, attr, vars(mod).get(attr, missing)))
                    setattr(mod, attr, timed(name, getattr(mod, attr)))
        yield spent, faults
    finally:
        for mod, attr, before in reversed(wrapped):
            if before is missing:
                delattr(mod, attr)  # the class's method again
            else:
                setattr(mod, attr, before)


Rounds = dict[str, dict[str, list[float]]]


def part_seconds(models: dict[str, nn.Module], runs: dict, device, repeats: int,
                 warmup: int = 0) -> tuple[Rounds, Rounds]:
    """({setting: {part: [seconds inside it, per round], ..., "total": [seconds of the call,
    per round]}}, the same for minor page faults) over ``repeats`` rounds, each calling every
    setting's ``runs[setting]()`` once in turn (interleaved as the timing pass, so drift hits
    every setting alike, and a part's time can be paired with the baseline's in the same
    round). ``warmup`` uncounted calls per setting go first (with ``torch.compile`` the
    instrumented model is compiled anew)."""
    with contextlib.ExitStack() as stack:
        clocks = {pid: stack.enter_context(timed_parts(m, device)) for pid, m in models.items()}
        call_faults = {pid: [] for pid in models}

        def counted(pid):
            def call():
                for per in clocks[pid]:
                    for counts in per.values():
                        counts.append(0)  # this call's entry
                f0 = minor_page_faults() or 0
                runs[pid]()
                call_faults[pid].append((minor_page_faults() or 0) - f0)
            return call

        # the warm-up calls go through the timers too (they must see the instrumented model)
        totals = interleaved_samples({pid: counted(pid) for pid in runs}, device, warmup + repeats, warmup=0)
    seconds = {pid: {**{name: [float(t) for t in ts[warmup:]] for name, ts in clocks[pid][0].items()},
                     "total": totals[pid][warmup:]} for pid in models}
    faults = {pid: {**{name: list(ns[warmup:]) for name, ns in clocks[pid][1].items()},
                    "total": call_faults[pid][warmup:]} for pid in models}
    return seconds, faults


def with_rest(per_part: dict[str, list[float]]) -> dict[str, list[float]]:
    """:func:`part_seconds`' rounds of one setting (times or page faults) plus ``rest``: each
    round's call less what is inside its parts (pre- and post-processing, glue), round by
    round: the median
    of the rests, not the median call less the parts' medians (which mixes rounds: the slow
    backbone of one round against the slow call of another)."""
    names = [k for k in per_part if k != "total"]
    rest = [max(total - sum(per_part[k][r] for k in names), 0.0) for r, total in enumerate(per_part["total"])]
    return {**per_part, "rest": rest}


def output_counts(outputs: list[dict]) -> dict[str, int]:
    """What post-processing produced for the image, where its cost depends on it: panoptic
    segments and instances (with random weights they differ between settings, and so may
    the post-processing time)."""
    counts = {}
    if isinstance(outputs, dict):  # a video model's one output (VideoMaskFormer)
        return {"predictions": len(outputs.get("pred_scores", ()))}
    for r in outputs:
        if "panoptic_seg" in r:
            counts["segments"] = counts.get("segments", 0) + len(r["panoptic_seg"][1])
        if "instances" in r:
            counts["instances"] = counts.get("instances", 0) + len(r["instances"])
    return counts


def _points(spec: SweepSpec) -> list[Point]:
    points = expand_points(spec)
    if len(points) == 1:  # no settings given: the config as it is, against its baseline
        points.append(Point(()))
    return points


def _label(point: Point) -> str:
    return "config" if not point.baseline and not point.overrides else point.label


def build_models(project, cfgs: dict, points: list[Point], allow_partial: bool) -> dict:
    """{point id: eval model}, all on the same weights: ``MODEL.WEIGHTS`` as ``--eval-only``
    loads them, else the baseline's random weights (seed 0) copied into every setting."""
    models = {}
    for point in points:
        cfg = cfgs[point.id][0]
        torch.manual_seed(0)
        if cfg.MODEL.WEIGHTS:
            model = load_model(project, cfg, allow_partial)
        else:
            model = project.Trainer.build_model(cfg).eval()
            if models:  # random weights: the baseline's, so every setting computes on the same
                model.load_state_dict(next(iter(models.values())).state_dict())
        models[point.id] = model
    return models


def _caller(model, inputs: list[dict], device, amp):
    """A function calling ``model(inputs)`` as a user's inference does (inference mode, autocast)."""
    def run():
        with torch.inference_mode(), autocast(device, amp):
            return model(inputs)
    return run


def batch_throughput(runners: dict, image: torch.Tensor, batches, device, repeats: int, warmup: int,
                     amp: str | None = None, base: str = "baseline") -> dict[str, list[dict]]:
    """{setting id: one dict per batch size b in ``batches``}: every setting called on a batch
    of b copies of ``image`` (one padded size: one batch, :mod:`expedit_d2.batching`), the
    settings interleaved per batch size as the latency is: ``ms`` (median per batch),
    ``images_per_s`` (b over that median), ``latency_ratio`` (median per-round ratio to the
    baseline at the same b, with its 95% interval) and ``speedup_vs_batch_1`` (the setting's
    images/s over its own at the first batch size given)."""
    H, W = (int(s) for s in image.shape[-2:])
    out = {pid: [] for pid in runners}
    for b in batches:
        b = check_positive_int(b, "--batch")
        inputs = [{"image": image, "height": H, "width": W}] * b
        samples = interleaved_samples({pid: _caller(runners[pid], inputs, device, amp) for pid in runners},
                                      device, repeats, warmup)
        ratios = round_ratios(samples, base)
        for pid, ts in samples.items():
            sec = statistics.median(ts)
            out[pid].append({"batch": b, "ms": 1e3 * sec, "ms_rounds": [1e3 * t for t in ts],
                             "images_per_s": b / sec, "latency_ratio": statistics.median(ratios[pid]),
                             "latency_ratio_ci95": list(median_interval(ratios[pid]))})
    for per in out.values():
        for r in per:
            r["speedup_vs_batch_1"] = r["images_per_s"] / per[0]["images_per_s"]
    return out


def benchmark(spec: SweepSpec, device: str, repeats: int, warmup: int, amp: str | None = None,
              compile_part: str | None = None, allow_partial: bool = False, log=print,
              batches=None) -> list[dict]:
    """One row per setting (baseline first): the fields are those ``tools/benchmark_model.py``'s
    docstring describes; with ``batches`` (batch sizes), each row's ``batches`` holds
    :func:`batch_throughput`'s dicts."""
    batches = [check_positive_int(b, "--batch") for b in batches] if batches else None
    if batches and spec.frames:
        raise SweepError("--batch and --frames: a video model takes one video (clip) per forward")
    project = load_project(spec.project)
    project.register_datasets()
    points = _points(spec)
    cfgs = validate_points(project, spec, points)
    models = build_models(project, cfgs, points, allow_partial)
    H, W = spec.input_size
    image = sweep_image(cfgs["baseline"][0], (H, W)).to(device)  # the sweep's image: uniform 0..255, seed 0
    # a video model (spec.frames): one clip of that many copies of the image, per forward
    inputs = model_inputs(image, spec.frames)
    for m in models.values():
        m.to(device)

    log("counting GMACs (fvcore)" + ("" if spec.frames is None else f", per clip of {spec.frames} frames"))
    macs = {pid: gmacs(m, image, frames=spec.frames) for pid, m in models.items()}
    runners = models
    if compile_part == "model":
        runners = {pid: torch.compile(m, dynamic=False) for pid, m in models.items()}
    elif compile_part == "backbone":
        for p in points:
            names = compile_entry_points(models[p.id].backbone, dynamic=False)
            log(f"{_label(p)}: torch.compile of the backbone's {', '.join(names)}")

    log(f"timing {len(points)} settings interleaved (warm-up {warmup}, {repeats} repeats)")
    base = "baseline"
    runs = {p.id: _caller(runners[p.id], inputs, device, amp) for p in points}
    samples = interleaved_samples(runs, device, repeats, warmup)
    counts = {pid: output_counts(run()) for pid, run in runs.items()}
    secs = {pid: statistics.median(ts) for pid, ts in samples.items()}
    ratios = round_ratios(samples, base)
    log("per-part breakdown (instrumented pass, interleaved)")
    part_secs, part_faults = part_seconds(models, runs, device, repeats, warmup=warmup if compile_part else 0)
    part_rounds = {pid: with_rest(per) for pid, per in part_secs.items()}
    fault_rounds = {pid: {k: [int(n) for n in ns] for k, ns in with_rest(per).items()}
                    for pid, per in part_faults.items()}
    count_faults = minor_page_faults() is not None
    parts = {pid: {k: statistics.median(ts) for k, ts in per.items()} for pid, per in part_rounds.items()}
    throughput = None
    if batches:
        log(f"throughput at batch sizes {list(batches)} (interleaved per batch size)")
        throughput = batch_throughput(runners, image, batches, device, repeats, warmup, amp, base)
    rows = []
    for p in points:
        pid = p.id
        breakdown = {k: 1e3 * v for k, v in parts[pid].items() if k != "total"}
        row = {
            "setting": _label(p), "overrides": dict(p.overrides), "opts": cfgs[pid][1],
            "input": [H, W], "frames": spec.frames, "device": str(device), "threads": torch.get_num_threads(), "amp": amp,
            "compile": compile_part, "cpu_linear": cfgs[pid][0].MODEL.CPU_LINEAR,
            "ms": 1e3 * secs[pid], "ms_rounds": [1e3 * t for t in samples[pid]],
            "latency_ratio": statistics.median(ratios[pid]),
            "latency_ratio_range": [min(ratios[pid]), max(ratios[pid])],
            "latency_ratio_ci95": list(median_interval(ratios[pid])),
            "ratio_of_medians": secs[pid] / secs[base],
            "ratio_of_minimums": min(samples[pid]) / min(samples[base]),
            "backbone_gmacs": macs[pid]["backbone"], "model_gmacs": macs[pid]["model"],
            "backbone_gmacs_ratio": macs[pid]["backbone"] / macs[base]["backbone"],
            "model_gmacs_ratio": macs[pid]["model"] / macs[base]["model"],
            "parts_ms": breakdown, "parts_ms_rounds": {k: [1e3 * t for t in ts] for k, ts in part_rounds[pid].items()},
            "outputs": counts[pid],
        }
        if count_faults:
            row["faults"] = statistics.median(fault_rounds[pid]["total"])
            row["parts_faults"] = {k: statistics.median(ns) for k, ns in fault_rounds[pid].items() if k != "total"}
            row["parts_faults_rounds"] = fault_rounds[pid]
        row["gap"] = row["latency_ratio"] - row["model_gmacs_ratio"]
        row["gap_ci95"] = [v - row["model_gmacs_ratio"] for v in row["latency_ratio_ci95"]]
        # each part's median per-round ratio (paired with the baseline's same round, as above)
        row["parts_ratio"] = {k: statistics.median(round_ratios({pid: ts, base: part_rounds[base][k]}, base)[pid])
                              for k, ts in part_rounds[pid].items()
                              if k != "total" and min(part_rounds[base][k]) > 0}
        if throughput is not None:
            row["batches"] = throughput[pid]
        rows.append(row)
    return rows


#: what a run recorded before the key was: ``cpu_linear`` (MODEL.CPU_LINEAR) was "blas"
POOL_DEFAULTS = {"cpu_linear": "blas"}


def _recorded(row: dict, key: str):
    """What a run's row says of ``key``, or what runs recorded before the key was had."""
    return row.get(key, POOL_DEFAULTS.get(key))


def _backbone_rounds(row: dict, baseline: dict):
    """The per-part pass's backbone rounds of a row and of its run's baseline (None in runs
    before that pass kept its rounds)."""
    parts = [r.get("parts_ms_rounds", {}).get("backbone") for r in (row, baseline)]
    return None if None in parts else tuple(parts)


def _pooled_row(p: Pooled) -> dict:
    ref, ratio, (lo, hi) = p.ref, p.latency_ratio, p.ci95
    gmacs_ratio = ref["model_gmacs_ratio"]
    row = {"setting": ref["setting"], "overrides": ref.get("overrides", {}), "input": ref["input"],
           "device": ref["device"], "amp": ref.get("amp"), "compile": ref.get("compile"),
           "cpu_linear": _recorded(ref, "cpu_linear"),
           "runs": p.runs, "rounds": len(p.ratios), "latency_ratio": ratio,
           "latency_ratio_ci95": [lo, hi], "model_gmacs_ratio": gmacs_ratio,
           "gap": ratio - gmacs_ratio, "gap_ci95": [lo - gmacs_ratio, hi - gmacs_ratio],
           "run_gaps": [r["gap"] for r in p.rows]}
    backbone = p.also["backbone"]
    if backbone is not None:
        row["backbone_latency_ratio"] = statistics.median(backbone)
        row["backbone_latency_ratio_ci95"] = list(median_interval(backbone))
        row["backbone_gmacs_ratio"] = ref.get("backbone_gmacs_ratio")
    return row


#: ``--pool`` of this benchmark's runs (:func:`expedit_d2.benchmark.pool.pool_runs`): a row per
#: setting, each round's time over the baseline's (the run's first row) in the same round; the
#: settings, their input, device, amp, compile, MODEL.CPU_LINEAR, overrides and model GMACs
#: must agree (``threads`` only where both runs recorded it: runs before it was recorded pool
#: with any); the backbone's rounds of the per-part pass pooled the same way where every run
#: kept them
POOL = PoolSpec(
    tool="benchmark_model.py",
    fields=frozenset({"setting", "input", "device", "ms_rounds", "model_gmacs", "model_gmacs_ratio", "gap"}),
    name="setting", keys=("input", "device", "amp", "compile", "cpu_linear", "overrides", "threads"),
    defaults=POOL_DEFAULTS, optional=("threads",), gmacs=("model_gmacs",), same="model",
    rounds=lambda row, baseline: (row["ms_rounds"], baseline["ms_rounds"]), labels=("baseline", "own"),
    row=_pooled_row, also={"backbone": _backbone_rounds})


def format_pooled(rows: list[dict]) -> str:
    r0 = rows[0]
    lines = [f"Whole model, input {r0['input'][1]}x{r0['input'][0]} (WxH), {r0['device']}, amp {r0['amp'] or 'off'}, "
             f"compile {r0['compile'] or 'off'}, linear layers {r0['cpu_linear']}; "
             f"{len(r0['runs'])} runs pooled ({', '.join(r0['runs'])}): latency "
             "ratio = median of every round's ratio to the baseline of the same round [its 95% confidence "
             "interval, distribution-free]; gap = latency ratio - model GMACs ratio", "",
             "| setting | rounds | latency ratio [95% CI] | model GMACs ratio | gap [95% CI] | each run's gap | "
             "backbone latency ratio [95% CI] (per-part pass) | backbone GMACs ratio |",
             "|---|---:|---:|---:|---:|---|---:|---:|"]
    for r in rows:
        (lo, hi), (glo, ghi) = r["latency_ratio_ci95"], r["gap_ci95"]
        if "backbone_latency_ratio" in r:
            blo, bhi = r["backbone_latency_ratio_ci95"]
            bb = f"{r['backbone_latency_ratio']:.3f} [{blo:.3f}, {bhi:.3f}]"
        else:
            bb = "-"
        bg = r.get("backbone_gmacs_ratio")
        lines.append(f"| {r['setting']} | {r['rounds']} | {r['latency_ratio']:.3f} [{lo:.3f}, {hi:.3f}] | "
                     f"{r['model_gmacs_ratio']:.3f} | {r['gap']:+.3f} [{glo:+.3f}, {ghi:+.3f}] | "
                     + ", ".join(f"{g:+.3f}" for g in r["run_gaps"]) + f" | {bb} | "
                     + ("-" if bg is None else f"{bg:.3f}") + " |")
    return "\n".join(lines) + "\n"


def _linear_layers(rows: list[dict]) -> str:
    """The rows' MODEL.CPU_LINEAR: the one value, or each setting's where they differ."""
    modes = [_recorded(r, "cpu_linear") for r in rows]
    if len(set(modes)) == 1:
        return modes[0]
    return ", ".join(f"{r['setting']}: {m}" for r, m in zip(rows, modes))


def format_table(rows: list[dict], threads: int) -> str:
    r0 = rows[0]
    clip = f", clips of {r0['frames']} frames (GMACs per clip)" if r0.get("frames") else ""
    head = (f"Whole model, input {r0['input'][1]}x{r0['input'][0]} (WxH){clip}, batch 1, {r0['device']}"
            f" ({threads} threads), amp {r0['amp'] or 'off'}, compile {r0['compile'] or 'off'}, "
            f"linear layers {_linear_layers(rows)} (MODEL.CPU_LINEAR); "
            "latency: median, interleaved in one run; latency ratio: median of the per-round ratios "
            "[its 95% confidence interval, distribution-free, from the rounds' order statistics]; "
            "fastest-round ratio: the setting's fastest round over the baseline's (interference only "
            "slows a call down); GMACs: fvcore multiply-adds; gap = latency ratio - model GMACs ratio; "
            "backbone latency ratio: median of its per-round ratios in the per-part pass; page faults: "
            "minor page faults per call in the per-part pass, thousands, median (first touches of fresh "
            "memory; the JSON has them per part)")
    part_names = list(r0["parts_ms"])
    lines = [head, "",
             "| setting | ms | latency ratio [95% CI] | fastest-round ratio | model GMACs (ratio) | "
             "backbone GMACs (ratio) | gap [95% CI] | backbone latency ratio | "
             + " | ".join(f"{n} ms" for n in part_names) + " | page faults (k) | outputs |",
             "|---|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * len(part_names) + "---:|---|"]
    for r in rows:
        lo, hi = r["latency_ratio_ci95"]
        glo, ghi = r["gap_ci95"]
        lines.append(
            f"| {r['setting']} | {r['ms']:.0f} | {r['latency_ratio']:.3f} [{lo:.3f}, {hi:.3f}] | "
            f"{r['ratio_of_minimums']:.3f} | "
            f"{r['model_gmacs']:.1f} ({r['model_gmacs_ratio']:.3f}) | "
            f"{r['backbone_gmacs']:.1f} ({r['backbone_gmacs_ratio']:.3f}) | {r['gap']:+.3f} [{glo:+.3f}, {ghi:+.3f}] | "
            f"{r['parts_ratio'].get('backbone', float('nan')):.3f} | "
            + " | ".join(f"{r['parts_ms'][n]:.0f}" for n in part_names) + " | "
            + (f"{r['faults'] / 1e3:.1f}" if "faults" in r else "-") + " | "
            + (", ".join(f"{v} {k}" for k, v in r["outputs"].items()) or "-") + " |")
    if "batches" in r0:
        lines += ["", f"Throughput by batch size: a batch of copies of the image, the settings interleaved per "
                  "batch size; ms: median per batch; latency ratio: median of the per-round ratios to the "
                  "baseline at the same batch size [95% CI]; speed-up: images/s over the setting's own at "
                  f"batch {r0['batches'][0]['batch']}", "",
                  "| setting | batch | ms per batch | images/s | latency ratio [95% CI] | speed-up |",
                  "|---|---:|---:|---:|---:|---:|"]
        for r in rows:
            for t in r["batches"]:
                lo, hi = t["latency_ratio_ci95"]
                lines.append(f"| {r['setting']} | {t['batch']} | {t['ms']:.0f} | {t['images_per_s']:.2f} | "
                             f"{t['latency_ratio']:.3f} [{lo:.3f}, {hi:.3f}] | {t['speedup_vs_batch_1']:.2f} |")
    return "\n".join(lines) + "\n"


