"""Base vs reduced backbone on the same weights (``tools/benchmark_backbone.py``).

* :func:`build_pair`, :func:`build_sam_pair` -- the (base, reduced) backbones of a
  Detectron2 config or of a SAM case (:mod:`expedit_d2.benchmark.cases`), on the same weights;
* :class:`Job` (:func:`cfg_job`, :func:`sam_job`, :func:`make_jobs`) -- one (case, method) to
  measure; :func:`measure_job` measures it: GMACs, interleaved latency and its per-round
  ratio with a 95% interval, peak memory (a fresh process's, through the caller's
  ``memory``; :func:`memory_child` is what that process runs), the operators' share of the
  time (:func:`operator_seconds`) and the cosine similarity of each output level;
* :data:`POOL` -- what ``--pool`` pools of earlier runs (:func:`expedit_d2.benchmark.pool.pool_runs`);
* :func:`format_table`, :func:`format_pooled` -- the Markdown reports.
"""
from __future__ import annotations

import copy
import statistics
import time
from pathlib import Path
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.modeling import build_backbone
from torch import nn

from ..checkpoint import load_weights
from ..config import add_expedit_config
from ..cpu_linear import use_cpu_linear
from ..engine import config_from_file
from ..flops import backbone_flops
from ..measure import forward_peak_bytes, interleaved_samples, median_interval, round_ratios, sync
from ..ops import TokenClustering, TokenReconstruction
from ..reduction import apply_patch
from ..reduction.config import METHOD_KEY, as_opts, point_overrides
from ..sam import PUBLISHED_SPEED, sam_settings
from .cases import CASES, DEFAULT_CASES, SamCase, build_sam_encoder, method_settings, sam_setting_text
from .pool import Pooled, PoolSpec

__all__ = ["Case", "named_cases", "config_case", "build_pair", "build_sam_pair", "Job", "cfg_job", "sam_job",
           "make_jobs", "memory_child", "operator_seconds", "TapsOnly", "measure_job", "format_table", "POOL",
           "format_pooled", "sam_cpu_linear"]


class Case(NamedTuple):
    """A case to measure: a Detectron2 config (``family`` "swin", "vit", or None for a config
    file, whose methods take no built-in settings) or a :class:`SamCase` (``family`` "sam")."""

    name: str
    cfg: object
    size: tuple[int, int]
    family: str | None


def named_cases(names=None, input_size=None, log=print) -> list[Case]:
    """The built-in cases ``names`` (default :data:`DEFAULT_CASES`), each at ``input_size`` or
    its own size; ``log`` says what each is."""
    cases = []
    for name in names or DEFAULT_CASES:
        case = CASES[name]
        if isinstance(case, SamCase):
            log(f"{name}: {case.what}")
            cases.append(Case(name, case, tuple(input_size or (case.size, case.size)), "sam"))
            continue
        make, size, what = case
        log(f"{name}: {what}")
        cases.append(Case(name, make(), tuple(input_size or size), name.split("_")[0]))
    return cases


def config_case(config_file, project=None, input_size=None) -> tuple[Case, type]:
    """(the case of any config file, at ``input_size`` or 640 x 640; the checkpointer of its
    weights): a project's config (found above the file, or ``project``) is built as its
    train_net.py builds it and read by the project's checkpointer (its formats, e.g. the
    official DPT ``.pt``), any other by Detectron2's."""
    cfg, found = config_from_file(config_file, project)
    checkpointer = DetectionCheckpointer if found is None else found.Checkpointer
    return Case(Path(config_file).stem, cfg, tuple(input_size or (640, 640)), None), checkpointer


def _with(cfg, values: dict):
    out = cfg.clone()
    out.defrost()
    out.merge_from_list(as_opts(values))
    return out


def build_pair(cfg, allow_partial: bool = False, checkpointer=DetectionCheckpointer):
    """(base, reduced) backbones on the same weights (``MODEL.WEIGHTS``, strictly, if set,
    read by ``checkpointer``: the project's, for its checkpoint formats). The reduced one
    uses ``MODEL.TOKEN_REDUCTION.METHOD`` of ``cfg`` (expedit: switched on)."""
    base_cfg = _with(cfg, point_overrides(cfg, {}, baseline=True))
    exp_cfg = _with(cfg, point_overrides(cfg, {METHOD_KEY: cfg.MODEL.TOKEN_REDUCTION.METHOD}))
    torch.manual_seed(0)
    base = build_backbone(base_cfg)
    if cfg.MODEL.WEIGHTS:
        holder = nn.Module()
        holder.backbone = base
        load_weights(checkpointer(holder), cfg.MODEL.WEIGHTS, allow_partial=allow_partial,
                     ignore_unexpected=lambda key: not key.startswith("backbone."))
    expedited = build_backbone(exp_cfg)
    expedited.load_state_dict(base.state_dict())
    for model in (base, expedited):  # as the projects' models do
        use_cpu_linear(model, cfg.MODEL.CPU_LINEAR)
    device = torch.device(cfg.MODEL.DEVICE)
    return base.to(device).eval(), expedited.to(device).eval()


def build_sam_pair(case: SamCase, method: str, size: int, device: str, cpu_linear: str = "blas",
                   checkpoint: str | None = None, allow_partial: bool = False):
    """(base, reduced) SAM image encoders of ``case`` on the same weights (``checkpoint``: a
    segment-anything checkpoint, whose ``image_encoder.*`` keys load strictly; random
    otherwise), for ``size`` x ``size`` inputs; the reduced one patched in place with
    ``method``'s setting of the case (:meth:`SamCase.settings`), sharing the base's parameter
    tensors (ViT-H: 2.5 GB once, not twice)."""
    base = build_sam_encoder(case.model_type, size)
    if checkpoint:
        holder = nn.Module()
        holder.image_encoder = base
        load_weights(DetectionCheckpointer(holder), checkpoint, allow_partial=allow_partial,
                     source="--sam-checkpoint", ignore_unexpected=lambda key: not key.startswith("image_encoder."))
    reduced = apply_patch(copy.deepcopy(base, {id(p): p for p in base.parameters()}), case.settings(method))
    for model in (base, reduced):
        use_cpu_linear(model, cpu_linear)
    return base.to(device).eval(), reduced.to(device).eval()


class Job(NamedTuple):
    """One (case, method) to measure: ``build()`` gives the (base, reduced) modules, each
    taking one (1, 3, H, W) image of ``size`` on ``device``."""

    label: str
    size: tuple[int, int]
    device: str
    cpu_linear: str
    build: Callable[[], tuple[nn.Module, nn.Module]]
    #: extra fields of the job's row (SAM cases: the setting and the published speed-up)
    extra: dict | None = None
    #: jobs with the same key have the same base module (its GMACs are counted once)
    base_key: tuple | None = None


def cfg_job(label, cfg, size, taps_only=False, allow_partial=False, checkpointer=DetectionCheckpointer) -> Job:
    """A Detectron2 backbone config as a :class:`Job` (:func:`build_pair`)."""
    def build():
        base, expedited = build_pair(cfg, allow_partial, checkpointer)
        if taps_only:
            if not hasattr(base, "forward_taps"):
                raise ValueError(f"--taps-only needs a ViT backbone, {label} has {type(base).__name__}")
            base, expedited = TapsOnly(base), TapsOnly(expedited)
        return base, expedited

    return Job(label, tuple(size), cfg.MODEL.DEVICE, cfg.MODEL.get("CPU_LINEAR", "blas"), build)


def sam_job(label, case: SamCase, method, size, device, cpu_linear="blas", checkpoint=None,
            allow_partial=False) -> Job:
    """A SAM case and method as a :class:`Job` (:func:`build_sam_pair`)."""
    settings = case.settings(method)
    e = sam_settings(case.row, case.depth)
    speed = PUBLISHED_SPEED.get(case.row)
    extra = {"sam": {"model_type": case.model_type, "row": case.row, "method": method,
                     "location": e.clustering_location, "side": e.num_clusters[0],
                     "settings": sam_setting_text(settings),
                     "published_speedup_v100_amg_vit_h": None if speed is None else speed[1]}}
    return Job(label, (size, size), device, cpu_linear,
               lambda: build_sam_pair(case, method, size, device, cpu_linear, checkpoint, allow_partial), extra,
               ("sam", case.model_type, size, device, cpu_linear, checkpoint))


def memory_child(job: Job, variant) -> int | None:
    """Peak extra bytes of one forward of ``variant`` (run in a fresh subprocess)."""
    model = dict(zip(("base", "expedited"), job.build()))[variant]
    image = torch.randn(1, 3, *job.size, device=job.device)
    return forward_peak_bytes(lambda: model(image), job.device)


def operator_seconds(model, image, device) -> float:
    """Seconds spent inside the clustering/reconstruction operators in one forward."""
    spent, start = [0.0], {}

    def pre(mod, args):
        sync(device)
        start[mod] = time.perf_counter()

    def post(mod, args, out):
        sync(device)
        spent[0] += time.perf_counter() - start.pop(mod)

    handles = []
    for m in model.modules():
        if isinstance(m, (TokenClustering, TokenReconstruction)):
            handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    try:
        model(image)
    finally:
        for h in handles:
            h.remove()
    return spent[0]


class TapsOnly(nn.Module):
    """A ViT backbone's ``forward_taps`` as a module (token taps, without the resampling of
    ``forward`` to strides 4..32), so FLOPs and time cover the same work."""

    def __init__(self, vit):
        super().__init__()
        self.vit = vit
        self.taps = vit.taps[2:] if vit.patch_embed.backbone is not None else vit.taps

    def forward(self, x):
        taps, _, _ = self.vit.forward_taps(x, self.taps)
        return {f"tap{t}": y for t, y in zip(self.taps, taps)}


def _levels(out) -> dict:
    """A backbone's outputs by level: its dict, or one tensor (a SAM encoder's image
    embeddings) as {"embedding": tensor}."""
    return out if isinstance(out, dict) else {"embedding": out}


def measure_job(job: Job, repeats, warmup, log, memory, base_gmacs: dict | None = None) -> dict:
    """The row of one job: GMACs, interleaved latency, memory (``memory(variant)``), operator
    share, cosine per output level; ``repeats`` 0: GMACs and memory only. ``base_gmacs``: a
    cache {``job.base_key``: GMACs} shared by the jobs of one run."""
    name, size, device = job.label, job.size, job.device
    base, expedited = job.build()
    image = torch.randn(1, 3, *size, device=device)
    with torch.inference_mode():
        log(f"{name}: counting FLOPs")
        cached = base_gmacs is not None and job.base_key is not None and job.base_key in base_gmacs
        gmacs = {k: backbone_flops(m, image).total() / 1e9 for k, m in
                  (("base", base), ("expedited", expedited)) if not (cached and k == "base")}
        if cached:
            gmacs["base"] = base_gmacs[job.base_key]
        elif base_gmacs is not None and job.base_key is not None:
            base_gmacs[job.base_key] = gmacs["base"]
        if repeats:
            log(f"{name}: timing (warm-up {warmup}, {repeats} repeats)")
            rounds = interleaved_samples(
                {"base": lambda: base(image), "expedited": lambda: expedited(image)}, device, repeats,
                warmup)
        else:
            log(f"{name}: --repeats 0, not timed")
            rounds = {"base": [], "expedited": []}
        mem = {k: memory(k) for k in ("base", "expedited")}
        op_secs = cos = None
        if repeats:
            op_secs = operator_seconds(expedited, image, device)
            a, b = _levels(base(image)), _levels(expedited(image))
            cos = {k: F.cosine_similarity(a[k].flatten(1).float(), b[k].flatten(1).float()).mean().item()
                   for k in a}
    row = {
        "case": name, "input": list(size), "device": str(device),
        "gmacs_base": gmacs["base"], "gmacs_expedited": gmacs["expedited"],
        "gmacs_ratio": gmacs["expedited"] / gmacs["base"],
    }
    if repeats:
        secs = {k: statistics.median(v) for k, v in rounds.items()}
        ratios = round_ratios(rounds, "base")["expedited"]
        row.update({
            "ms_base": secs["base"] * 1e3, "ms_expedited": secs["expedited"] * 1e3,
            "ms_rounds_base": [t * 1e3 for t in rounds["base"]],
            "ms_rounds_expedited": [t * 1e3 for t in rounds["expedited"]],
            "latency_ratio": statistics.median(ratios),
            "latency_ratio_ci95": list(median_interval(ratios)),
            "ratio_of_medians": secs["expedited"] / secs["base"],
        })
    else:
        row.update({"ms_base": None, "ms_expedited": None, "ms_rounds_base": [], "ms_rounds_expedited": [],
                    "latency_ratio": None, "latency_ratio_ci95": None, "ratio_of_medians": None})
    row.update({
        "peak_mb_base": mem["base"],
        "peak_mb_expedited": mem["expedited"],
        "cosine": cos,
        "threads": torch.get_num_threads(),
        "cpu_linear": job.cpu_linear,
    })
    if repeats:
        row["ratio_gap"] = row["latency_ratio"] - row["gmacs_ratio"]
        row["ratio_gap_ci95"] = [v - row["gmacs_ratio"] for v in row["latency_ratio_ci95"]]
        row["operator_share"] = op_secs / secs["base"]
    else:
        row["ratio_gap"] = row["ratio_gap_ci95"] = row["operator_share"] = None
    if job.extra:
        row.update(job.extra)
    return row


def format_table(rows, threads) -> str:
    dev = rows[0]["device"] if rows else "?"
    out = [f"Backbone, base vs expedited (same weights); device {dev}, {threads} threads, "
           f"torch {torch.__version__}", "",
           "latency ratio: median of the per-round ratios [its 95% confidence interval, "
           "distribution-free]; ratio of medians: ms exp / ms base", "",
           "| case | input WxH | GMACs base | GMACs exp | GMACs ratio | ms base | ms exp "
           "| latency ratio [95% CI] | ratio of medians | gap [95% CI] | operators / base time "
           "| peak MB base | peak MB exp | cosine per level |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        mb = lambda v: "n/a" if v is None else f"{v:.0f}"  # noqa: E731
        cos = "n/a" if r["cosine"] is None else " ".join(f"{k} {v:.3f}" for k, v in r["cosine"].items())
        if r["latency_ratio"] is None:  # --repeats 0: GMACs only
            timed = "| n/a | n/a | n/a | n/a | n/a | n/a |"
        else:
            (lo, hi), (glo, ghi) = r["latency_ratio_ci95"], r["ratio_gap_ci95"]
            timed = (f"| {r['ms_base']:.0f} | {r['ms_expedited']:.0f} | "
                     f"{r['latency_ratio']:.3f} [{lo:.3f}, {hi:.3f}] | {r['ratio_of_medians']:.3f} | "
                     f"{r['ratio_gap']:+.3f} [{glo:+.3f}, {ghi:+.3f}] | "
                     f"{r['operator_share']:.1%} |")
        out.append(
            f"| {r['case']} | {r['input'][1]}x{r['input'][0]} | {r['gmacs_base']:.1f} | "
            f"{r['gmacs_expedited']:.1f} | {r['gmacs_ratio']:.3f} {timed} "
            f"{mb(r['peak_mb_base'])} | {mb(r['peak_mb_expedited'])} | {cos} |")
    sam = [r for r in rows if "sam" in r]
    if sam:
        out += ["", "SAM cases: the setting, and the official Expedit-SAM speed-up of the row (ViT-H at 1024, "
                "one V100, the whole automatic mask generation pipeline; this table: the encoder alone) "
                "beside this run's, 1 / latency ratio", "",
                "| case | setting | official V100 AMG speed-up | speed-up here (1 / latency ratio) |",
                "|---|---|---:|---:|"]
        for r in sam:
            published = r["sam"]["published_speedup_v100_amg_vit_h"]
            here = "n/a" if r["latency_ratio"] is None else f"{1 / r['latency_ratio']:.2f}x"
            out.append(f"| {r['case']} | {r['sam']['settings']} | "
                       f"{'n/a' if published is None else f'{published:.2f}x'} | {here} |")
    return "\n".join(out) + "\n"


def _pooled_row(p: Pooled) -> dict:
    ref, ratio, lo_hi = p.ref, p.latency_ratio, p.ci95
    return {
        "case": ref["case"], "input": ref["input"], "device": ref["device"], "threads": ref.get("threads"),
        "cpu_linear": ref.get("cpu_linear"), "runs": p.runs, "rounds": len(p.ratios),
        "gmacs_base": ref["gmacs_base"], "gmacs_expedited": ref["gmacs_expedited"],
        "gmacs_ratio": ref["gmacs_ratio"], "latency_ratio": ratio, "latency_ratio_ci95": list(lo_hi),
        "ratio_gap": ratio - ref["gmacs_ratio"], "ratio_gap_ci95": [v - ref["gmacs_ratio"] for v in lo_hi],
        "run_gaps": [r["ratio_gap"] for r in p.rows],
        "run_operator_shares": [r["operator_share"] for r in p.rows]}


#: ``--pool`` of this benchmark's runs (:func:`expedit_d2.benchmark.pool.pool_runs`): a row per
#: case, each round's expedited time over the base time of the same round; the cases, their
#: input, device and GMACs must agree, and ``threads`` and ``cpu_linear`` where both runs
#: recorded them (runs before that pool with any)
POOL = PoolSpec(
    tool="benchmark_backbone.py",
    fields=frozenset({"case", "input", "device", "gmacs_base", "gmacs_expedited", "gmacs_ratio",
                      "ms_rounds_base", "ms_rounds_expedited", "ratio_gap", "operator_share"}),
    name="case", keys=("input", "device", "threads", "cpu_linear"), optional=("threads", "cpu_linear"),
    gmacs=("gmacs_base", "gmacs_expedited"), same="backbones",
    rounds=lambda row, first: (row["ms_rounds_expedited"], row["ms_rounds_base"]), labels=("base", "expedited"),
    row=_pooled_row)


def format_pooled(rows) -> str:
    r0 = rows[0]
    out = [f"Backbone, base vs expedited, {len(r0['runs'])} runs pooled ({', '.join(r0['runs'])}); "
           f"device {r0['device']}" + (f", {r0['threads']} threads" if r0["threads"] else "")
           + (f", linear layers {r0['cpu_linear']}" if r0["cpu_linear"] else ""), "",
           "latency ratio: median of every round's expedited / base time [its 95% confidence interval, "
           "distribution-free]; gap = latency ratio - GMACs ratio", "",
           "| case | input WxH | rounds | GMACs ratio | latency ratio [95% CI] | gap [95% CI] | each run's gap "
           "| each run's operators / base time |",
           "|---|---|---:|---:|---:|---:|---|---|"]
    for r in rows:
        (lo, hi), (glo, ghi) = r["latency_ratio_ci95"], r["ratio_gap_ci95"]
        out.append(f"| {r['case']} | {r['input'][1]}x{r['input'][0]} | {r['rounds']} | {r['gmacs_ratio']:.3f} | "
                   f"{r['latency_ratio']:.3f} [{lo:.3f}, {hi:.3f}] | {r['ratio_gap']:+.3f} [{glo:+.3f}, {ghi:+.3f}] | "
                   + ", ".join(f"{g:+.3f}" for g in r["run_gaps"]) + " | "
                   + ", ".join(f"{s:.1%}" for s in r["run_operator_shares"]) + " |")
    return "\n".join(out) + "\n"


def sam_cpu_linear(opts) -> str:
    """``MODEL.CPU_LINEAR`` from the KEY VALUE overrides, the only one a SAM case takes (it
    has no config: other keys would be silently ignored, so they are refused)."""
    keys = opts[0::2]
    others = [k for k in keys if k != "MODEL.CPU_LINEAR"]
    if others:
        raise ValueError(f"SAM cases take no config overrides but MODEL.CPU_LINEAR (got {', '.join(others)}); "
                         "their settings are the published rows (expedit_d2.benchmark.cases.sam_method_settings)")
    cfg = get_cfg()
    add_expedit_config(cfg)
    cfg.merge_from_list(list(opts))
    return cfg.MODEL.CPU_LINEAR




def make_jobs(cases: list[Case], methods, opts=(), device="cpu", taps_only=False, allow_partial=False,
              checkpointer=None, sam_checkpoint=None, cpu_linear="blas") -> list[Job]:
    """One :class:`Job` per (case, method), in a fixed order (memory children find theirs by
    index): a config with ``MODEL.TOKEN_REDUCTION.METHOD`` set to the method, the method's
    registered example for the case (:func:`~expedit_d2.benchmark.cases.method_settings`), then the KEY VALUE ``opts``; a SAM case at
    the method's setting of its row (:func:`~expedit_d2.benchmark.cases.sam_method_settings`), with ``cpu_linear`` (its only
    option, :func:`sam_cpu_linear`). Labels are the case's name, with the method where
    ``methods`` is not just expedit. ``checkpointer`` reads ``MODEL.WEIGHTS`` (default:
    Detectron2's; a project's for its formats, :func:`config_case`)."""
    checkpointer = checkpointer or DetectionCheckpointer
    jobs = []
    for case in cases:
        for method in methods:
            label = case.name if list(methods) == ["expedit"] else f"{case.name} {method}"
            if case.family == "sam":
                jobs.append(sam_job(label, case.cfg, method, case.size[0], device, cpu_linear, sam_checkpoint,
                                    allow_partial))
                continue
            settings = method_settings(case.family, case.cfg, case.size).get(method, {}) if case.family else {}
            cfg = _with(case.cfg, {METHOD_KEY: method, **settings})
            cfg.merge_from_list(list(opts))
            cfg.MODEL.DEVICE = device
            jobs.append(cfg_job(label, cfg, case.size, taps_only, allow_partial, checkpointer))
    return jobs
