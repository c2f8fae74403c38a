#!/usr/bin/env python
"""Base vs reduced backbone on the same weights, measured in one run.

    python tools/benchmark_backbone.py                        # built-in cases, expedit
    python tools/benchmark_backbone.py --cases swin_l_640 --repeats 5
    python tools/benchmark_backbone.py --config-file my.yaml --input-size 800 1216 \\
        MODEL.EXPEDIT.CLUSTERING_LOCATION 8
    python tools/benchmark_backbone.py --cases vit_hybrid_640x480 --method tome evit pool expedit
    python tools/benchmark_backbone.py --cases sam_vit_b_1024_a8_81 --method expedit pool tome
    python tools/benchmark_backbone.py --cases sam_vit_h_1024_a6_81 --repeats 0   # GMACs only

``--method`` picks the token-reduction method(s) (``MODEL.TOKEN_REDUCTION.METHOD``); each
built-in ViT case has a setting of every method at roughly the GMACs of its expedit setting
(:data:`METHOD_SETTINGS`), and KEY VALUE overrides change any of them.

For each case: backbone GMACs of both (fvcore multiply-adds, one image of the stated size, with
expedit-d2's handles for fused attention and the operators), their ratio; latency of
both (warm-up, median of repeats, interleaved, synchronised on CUDA) and the latency ratio
(the median over rounds of the expedited time over the base time of the same round, with
its distribution-free 95% confidence interval, as ``tools/benchmark_model.py`` gives it;
the ratio of the medians beside it); the gap between the latency and GMACs ratios; the time spent inside the clustering/reconstruction
operators as a share of the base backbone's time (their overhead: the gap also holds
FLOP-efficiency differences between layers); peak extra memory of one forward (each
model in a fresh subprocess);
and the cosine similarity of each output level, expedited vs base. ``--repeats 0`` runs
nothing but the GMACs count and the memory children: latency, gap, operator share and
cosines are n/a (ViT-H at 1024 on a CPU: minutes per forward).

SAM cases (``sam_<model>_1024_<row>``, named only, not in the default list) measure
segment-anything's own ``ImageEncoderViT`` (not a Detectron2 backbone: built with
``sam_model_registry``'s encoder arguments, random weights unless ``--sam-checkpoint``) at the
published Expedit-SAM rows of :data:`expedit_d2.sam.PUBLISHED_SPEED`, patched in place by
``expedit_d2.apply_patch``; the measuring is the same. ViT-H takes the rows as published,
ViT-B their depth-scaled versions (:func:`expedit_d2.sam.sam_settings`: alpha x 12 / 32,
rounded); ``--method pool tome`` reduce every window to the row's s x s from the same block
(:data:`SAM_METHODS`). ``sam_tiny_416_a8_81`` is a 4-block encoder of SAM's layout, for smoke
runs (seconds).

``--pool RUN.json ...`` measures nothing: it pools earlier runs of the same cases (same
input, device, threads, linear layers and GMACs; refused otherwise, naming the file) into one
latency ratio per case over every run's rounds, each round's expedited time over the base
time of the same round, with that median's interval and each run's own gap. On a noisy
machine several short runs pooled pin the ratio better than any one of them:

    python tools/benchmark_backbone.py --pool results/hybrid_a.json results/hybrid_b.json \
        --output results/hybrid_pooled

Weights are random unless ``MODEL.WEIGHTS`` is given: speed and FLOPs do not depend on
them, but the cosine similarities are only meaningful with trained weights. Given weights
load strictly into the backbone (a whole-model file's other keys are ignored): backbone keys
missing from the file, backbone keys the model lacks, shape mismatches, a missing or
unreadable file are errors naming the file and the keys, unless ``--allow-partial-weights``.
"""
from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
from functools import partial
from pathlib import Path
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.modeling import build_backbone
from torch import nn

from expedit_d2 import add_expedit_config, apply_patch
from expedit_d2.cli import HelpFormatter, add_timing_arguments, apply_timing_arguments, emit_report
from expedit_d2.engine import config_from_file
from expedit_d2.checkpoint import PARTIAL_FLAG, load_weights
from expedit_d2.cpu_linear import use_cpu_linear
from expedit_d2.flops import backbone_flops
from expedit_d2.methods import PoolSettings, ToMeSettings
from expedit_d2.measure import (
    child_peak_mb, forward_peak_bytes, interleaved_samples, median_interval, print_child_peak,
    pool_mismatch, read_runs, round_ratios, sync, write_report)
from expedit_d2.ops import TokenClustering, TokenReconstruction
from expedit_d2.reduction.config import METHOD_KEY, as_opts, point_overrides
from expedit_d2.sam import PUBLISHED_SPEED, SAM_PRESETS, build_tiny_sam, sam_settings


def swin_l_cfg():
    """Swin-L (Mask2Former, 384 pretraining) with the COCO panoptic setting (docs/fidelity.md, "Published settings and official configs")."""
    cfg = get_cfg()
    add_expedit_config(cfg)
    s = cfg.MODEL.SWIN
    s.EMBED_DIM, s.DEPTHS, s.NUM_HEADS = 192, [2, 2, 18, 2], [6, 12, 24, 48]
    s.WINDOW_SIZE, s.PRETRAIN_IMG_SIZE = 12, 384
    cfg.MODEL.BACKBONE.NAME = "ExpeditD2SwinTransformer"
    e = cfg.MODEL.EXPEDIT
    e.BASE, e.CLUSTERING_LOCATION, e.NUM_CLUSTERS = "ExpeditD2SwinTransformer", 10, [8, 8]
    e.ITERS, e.WINDOW, e.TEMPERATURE, e.RECON_K, e.RECON_TEMPERATURE = 5, 7, 0.05, 10, 0.05
    return cfg


def _vit_cfg(name, taps, alpha, clusters, **vit):
    cfg = get_cfg()
    add_expedit_config(cfg)
    cfg.MODEL.BACKBONE.NAME = name
    for k, v in vit.items():
        setattr(cfg.MODEL.VIT, k, v)
    cfg.MODEL.VIT.TAPS = taps
    e = cfg.MODEL.EXPEDIT
    e.BASE, e.CLUSTERING_LOCATION, e.NUM_CLUSTERS = name, alpha, clusters
    e.ITERS, e.WINDOW, e.TEMPERATURE, e.RECON_K, e.RECON_TEMPERATURE = 5, 5, 1.0, 20, 1.0
    e.RECONSTRUCTION = "nearest"  # what the official DPT release runs (docs/fidelity.md)
    return cfg


def vit_hybrid_cfg():
    """DPT-Hybrid (R50 + ViT-B/16) with the NYUv2 setting alpha 4, 16x16 (docs/fidelity.md, "Published settings and official configs")."""
    return _vit_cfg("D2ViTHybrid", [0, 1, 8, 11], 4, [16, 16])


def vit_l16_cfg():
    """ViT-L/16 (DPT-Large taps); the DPT clustering settings with alpha 8, 16x16 (no
    published setting for ViT-L: one third of the depth, like alpha 4 of 12)."""
    return _vit_cfg("D2ViT", [5, 11, 17, 23], 8, [16, 16], EMBED_DIM=1024, DEPTH=24, NUM_HEADS=16)


#: per method, a setting of the built-in ViT cases with about the GMACs of their expedit
#: setting (DPT-Hybrid alpha 4, 16x16: ratio 0.61 at 640x480): pool to the same grid at the
#: same block, ToMe merging from block 0, EViT keeping half the tokens at blocks 3, 6, 9
METHOD_SETTINGS = {
    "vit": {
        "tome": {"MODEL.TOKEN_REDUCTION.TOME.R": 90, "MODEL.TOKEN_REDUCTION.TOME.START_BLOCK": 0},
        "evit": {"MODEL.TOKEN_REDUCTION.EVIT.LOCATIONS": [3, 6, 9], "MODEL.TOKEN_REDUCTION.EVIT.KEEP_RATE": 0.5},
        "pool": {"MODEL.TOKEN_REDUCTION.POOL.LOCATION": 4, "MODEL.TOKEN_REDUCTION.POOL.SIZE": [16, 16]},
    },
    "swin": {
        "pool": {"MODEL.TOKEN_REDUCTION.POOL.LOCATION": 10, "MODEL.TOKEN_REDUCTION.POOL.SIZE": [8, 8]},
    },
}
METHODS = ("expedit", "tome", "evit", "pool")

# --------------------------------------------------------------------------------------
# SAM image encoders: segment-anything's ImageEncoderViT, built as sam_model_registry builds
# it (not a Detectron2 backbone), at the published Expedit-SAM rows
# --------------------------------------------------------------------------------------
#: ImageEncoderViT's arguments per model type, as segment-anything's build_sam.py gives them
SAM_ENCODERS = {
    "vit_b": dict(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11)),
    "vit_l": dict(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23)),
    "vit_h": dict(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31)),
}
#: the arguments build_sam.py gives every model type (norm_layer: LayerNorm, eps 1e-6)
SAM_ENCODER_COMMON = dict(img_size=1024, patch_size=16, mlp_ratio=4, qkv_bias=True, use_rel_pos=True,
                          window_size=14, out_chans=256)
#: depth of the "tiny" encoder (expedit_d2.sam.build_tiny_sam's default: SAM's layout, 4 blocks)
SAM_TINY_DEPTH = 4
#: the published Expedit-SAM rows (official README speed table, ViT-H on a V100)
SAM_ROWS = tuple(PUBLISHED_SPEED)

#: per method, the setting of a SAM case at about the GMACs of its expedit row: every 14 x 14
#: window reduced to the row's s x s right before the row's block alpha (pool: average pooling;
#: ToMe: merging 196 - s*s tokens of each window at once)
SAM_METHODS = {
    "expedit": lambda e: e,
    "pool": lambda e: PoolSettings(location=e.clustering_location, size=tuple(e.num_clusters)),
    "tome": lambda e: ToMeSettings(r=SAM_ENCODER_COMMON["window_size"] ** 2 - e.num_clusters[0] ** 2,
                                   start_block=e.clustering_location),
}


def sam_setting_text(settings) -> str:
    """A SAM case's setting in a few words (the table's)."""
    if isinstance(settings, PoolSettings):
        return f"pool before block {settings.location} to {settings.size[0]}x{settings.size[1]}/window"
    if isinstance(settings, ToMeSettings):
        side = math.isqrt(SAM_ENCODER_COMMON["window_size"] ** 2 - settings.r)
        return f"tome r {settings.r}/window before block {settings.start_block} ({side}x{side}/window)"
    (h, w), e = settings.num_clusters, settings
    return (f"expedit alpha {e.clustering_location}, {h}x{w}/window (iters {e.iters}, temperature "
            f"{e.temperature:g}, window {e.window}, k {e.recon_k})")


def build_sam_encoder(model_type: str, img_size: int = 1024, seed: int = 0) -> nn.Module:
    """segment-anything's ``ImageEncoderViT`` of ``model_type`` ("vit_b", "vit_l", "vit_h" with
    ``sam_model_registry``'s arguments; "tiny": :func:`expedit_d2.sam.build_tiny_sam`'s
    encoder) for ``img_size`` x ``img_size`` inputs, random weights (seeded)."""
    if model_type == "tiny":
        return build_tiny_sam(img_size=img_size, depth=SAM_TINY_DEPTH, seed=seed).image_encoder
    from segment_anything.modeling import ImageEncoderViT

    torch.manual_seed(seed)
    return ImageEncoderViT(**{**SAM_ENCODER_COMMON, "img_size": img_size}, **SAM_ENCODERS[model_type],
                           norm_layer=partial(nn.LayerNorm, eps=1e-6))


class SamCase(NamedTuple):
    """A SAM image encoder at a published Expedit-SAM row (a name in
    :data:`expedit_d2.sam.SAM_PRESETS`), scaled to the encoder's depth by
    :func:`expedit_d2.sam.sam_settings`."""

    model_type: str
    row: str
    size: int = 1024

    @property
    def depth(self) -> int:
        return SAM_TINY_DEPTH if self.model_type == "tiny" else SAM_ENCODERS[self.model_type]["depth"]

    def settings(self, method: str):
        """The settings of ``method`` (a key of :data:`SAM_METHODS`) for this case."""
        return SAM_METHODS[method](sam_settings(self.row, self.depth))

    @property
    def what(self) -> str:
        e, published = sam_settings(self.row, self.depth), SAM_PRESETS[self.row]
        s = e.num_clusters[0]
        scaled = "" if self.depth == 32 else (
            f", ViT-H row alpha {published.clustering_location} scaled to {self.depth} blocks")
        return f"SAM {self.model_type} image encoder, Expedit-SAM row {self.row} (alpha {e.clustering_location}, " \
               f"{s}x{s}/window{scaled})"


CASES = {
    "swin_l_640": (swin_l_cfg, (640, 640), "Swin-L, COCO panoptic setting (alpha 10, 8x8/window)"),
    "swin_l_1024": (swin_l_cfg, (1024, 1024), "Swin-L, COCO panoptic setting (alpha 10, 8x8/window)"),
    "vit_hybrid_640x480": (vit_hybrid_cfg, (480, 640), "DPT-Hybrid backbone, NYUv2 setting (alpha 4, 16x16)"),
    "vit_l16_640x480": (vit_l16_cfg, (480, 640), "ViT-L/16 DPT taps (alpha 8, 16x16)"),
}
#: what runs without --cases: the Detectron2 backbones (the SAM cases run when named)
DEFAULT_CASES = tuple(CASES)
CASES.update({f"sam_{model_type}_1024_{row[2:]}": SamCase(model_type, row)
              for model_type in ("vit_b", "vit_h") for row in SAM_ROWS})
CASES["sam_tiny_416_a8_81"] = SamCase("tiny", "h_a8_81", 416)  # smoke runs: seconds on a CPU


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
    """(base, reduced) SAM image encoders of ``case`` on the same weights, shared (``checkpoint``: a
    segment-anything checkpoint, whose ``image_encoder.*`` keys load strictly; random
    otherwise), for ``size`` x ``size`` inputs; the reduced one patched in place with
    ``method``'s setting of the case (:data:`SAM_METHODS`)."""
    base = build_sam_encoder(case.model_type, size)
    if checkpoint:
        holder = nn.Module()
        holder.image_encoder = base
        load_weights(DetectionCheckpointer(holder), checkpoint, allow_partial=allow_partial,
                     source="--sam-checkpoint", ignore_unexpected=lambda key: not key.startswith("image_encoder."))
    # new modules on the same parameter tensors (ViT-H: 2.5 GB once, not twice)
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


def measure_memory(argv, job_index, variant) -> float | None:
    """Run this script again as a child that measures one model's peak memory, with
    glibc's mmap threshold fixed so freed blocks leave the resident set (in the parent
    that setting would slow every allocation and skew the timings)."""
    return child_peak_mb([sys.executable, __file__, "--_memory-child", str(job_index), variant, *argv])


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


def run_case(name, cfg, size, repeats, warmup, log, memory, taps_only=False, allow_partial=False,
             checkpointer=DetectionCheckpointer):
    """Measure a Detectron2 backbone config (see :func:`measure_job`)."""
    return measure_job(cfg_job(name, cfg, size, taps_only, allow_partial, checkpointer), repeats, warmup, log, memory)


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


#: what runs pooled together must agree on per case (beside its name and GMACs); ``threads``
#: and ``cpu_linear`` only where both runs recorded them (runs before that pool with any)
POOL_KEYS = ("input", "device", "threads", "cpu_linear")
#: the fields of a run's row that ``--pool`` reads
POOL_FIELDS = frozenset({"case", "input", "device", "gmacs_base", "gmacs_expedited", "gmacs_ratio",
                         "ms_rounds_base", "ms_rounds_expedited", "ratio_gap", "operator_share"})


def pool_runs(runs: dict[str, list[dict]]) -> list[dict]:
    """{file name: the rows of one run's JSON} -> one row per case: the latency ratio over
    every run's rounds (each round's expedited over base time), the 95% interval of that
    median, the gap to the GMACs ratio and each run's own gap and operator share. Raises
    ValueError naming the file where a run's cases, input, device, threads, linear layers or
    GMACs differ from the first run's."""
    if not runs:
        raise ValueError("--pool: no runs given")
    names = list(runs)
    first = runs[names[0]]
    cases = [r["case"] for r in first]
    for name, rows in runs.items():
        if [r["case"] for r in rows] != cases:
            raise ValueError(f"--pool: {name} has cases {[r['case'] for r in rows]}, {names[0]} has {cases}")
    pooled = []
    for i, case in enumerate(cases):
        ref, ratios = first[i], []
        for name in names:
            row = runs[name][i]
            differs = pool_mismatch(row, ref, POOL_KEYS, optional=("threads", "cpu_linear"))
            if differs:
                key, ours, theirs = differs
                raise ValueError(f"--pool: {name}: {case} has {key}={ours!r}, {names[0]} has {theirs!r}")
            for key in ("gmacs_base", "gmacs_expedited"):
                if not math.isclose(row[key], ref[key], rel_tol=1e-6):
                    raise ValueError(f"--pool: {name}: {case} has {key}={row[key]:.3f}, {names[0]} has "
                                     f"{ref[key]:.3f} (not the same backbones)")
            base, exp = row["ms_rounds_base"], row["ms_rounds_expedited"]
            if len(base) != len(exp) or not base:
                raise ValueError(f"--pool: {name}: {case} has {len(base)} base and {len(exp)} expedited rounds")
            ratios += round_ratios({"base": base, "expedited": exp}, "base")["expedited"]
        ratio, lo_hi = statistics.median(ratios), median_interval(ratios)
        pooled.append({
            "case": case, "input": ref["input"], "device": ref["device"], "threads": ref.get("threads"),
            "cpu_linear": ref.get("cpu_linear"), "runs": names, "rounds": len(ratios),
            "gmacs_base": ref["gmacs_base"], "gmacs_expedited": ref["gmacs_expedited"],
            "gmacs_ratio": ref["gmacs_ratio"], "latency_ratio": ratio, "latency_ratio_ci95": list(lo_hi),
            "ratio_gap": ratio - ref["gmacs_ratio"], "ratio_gap_ci95": [v - ref["gmacs_ratio"] for v in lo_hi],
            "run_gaps": [runs[name][i]["ratio_gap"] for name in names],
            "run_operator_shares": [runs[name][i]["operator_share"] for name in names]})
    return pooled


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


def _sam_cpu_linear(opts) -> str:
    """``MODEL.CPU_LINEAR`` from the KEY VALUE overrides, the only one a SAM case takes (it
    has no config: other keys would be silently ignored, so they are refused)."""
    keys = opts[0::2]
    others = [k for k in keys if k != "MODEL.CPU_LINEAR"]
    if others:
        raise ValueError(f"SAM cases take no config overrides but MODEL.CPU_LINEAR (got {', '.join(others)}); "
                         "their settings are the published rows (SAM_METHODS)")
    cfg = get_cfg()
    add_expedit_config(cfg)
    cfg.merge_from_list(list(opts))
    return cfg.MODEL.CPU_LINEAR


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--cases", nargs="+", choices=list(CASES), metavar="CASE",
                        help="built-in cases (default: the Detectron2 backbones, " + ", ".join(DEFAULT_CASES)
                        + "); SAM image encoders at the published Expedit-SAM rows: "
                        + ", ".join(n for n in CASES if n not in DEFAULT_CASES))
    parser.add_argument("--config-file", help="benchmark this config instead of the built-in cases "
                        "(a project's config is built as its train_net.py builds it)")
    parser.add_argument("--project", help="project folder of --config-file (default: found from its path)")
    parser.add_argument("--input-size", nargs=2, type=int, metavar=("H", "W"), default=None,
                        help="SAM cases: square, a multiple of 16 (the encoder is built for it)")
    parser.add_argument("--method", nargs="+", choices=METHODS, default=["expedit"],
                        help="token-reduction method(s), each against the base (built-in ViT cases: "
                        "settings of about equal GMACs, see METHOD_SETTINGS; KEY VALUE overrides win; "
                        "SAM cases: expedit, pool, tome at the row's s x s per window, see SAM_METHODS)")
    add_timing_arguments(parser, repeats=3, warmup=1)
    parser._option_string_actions["--repeats"].help += "; 0: not timed, GMACs and memory only"
    parser.add_argument("--output", type=Path, help="also write <output>.md and <output>.json")
    parser.add_argument("--pool", nargs="+", type=Path, metavar="RUN.json",
                        help="measure nothing: pool the rounds of earlier runs' JSON files (same cases, "
                        "input, device, threads, linear layers and GMACs)")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    parser.add_argument("--taps-only", action="store_true",
                        help="ViT: measure forward_taps (token taps) instead of forward (maps at strides 4..32)")
    parser.add_argument("--sam-checkpoint", metavar="PATH",
                        help="SAM cases: a segment-anything checkpoint of the case's model type (its "
                        "image_encoder.* keys load strictly; default: random weights)")
    parser.add_argument(PARTIAL_FLAG, action="store_true",
                        help="with MODEL.WEIGHTS or --sam-checkpoint: accept a file that covers only part "
                        "of the backbone")
    parser.add_argument("--_memory-child", nargs=2, metavar=("JOB", "VARIANT"), help=argparse.SUPPRESS)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = parser.parse_args(argv)
    if args.pool:
        rows = pool_runs(read_runs(args.pool, POOL_FIELDS, "benchmark_backbone.py"))
        emit_report(format_pooled(rows), rows, args.output)
        return
    if args.repeats < 0:
        parser.error(f"--repeats must be >= 0 (0: GMACs and memory only), got {args.repeats}")
    apply_timing_arguments(args)

    def log(msg):
        print(f"[benchmark_backbone] {msg}", file=sys.stderr, flush=True)

    cases = []
    checkpointer = DetectionCheckpointer
    if args.config_file:  # any config: a project's (found above the file, or --project) or ours
        cfg, project = config_from_file(args.config_file, args.project)
        if project is not None:
            checkpointer = project.Checkpointer  # the project's formats (e.g. official DPT .pt)
        cases.append((Path(args.config_file).stem, cfg, tuple(args.input_size or (640, 640)), None))
    else:
        for name in args.cases or DEFAULT_CASES:
            case = CASES[name]
            if isinstance(case, SamCase):
                log(f"{name}: {case.what}")
                cases.append((name, case, args.input_size or (case.size, case.size), "sam"))
                continue
            make, size, what = case
            log(f"{name}: {what}")
            cases.append((name, make(), tuple(args.input_size or size), name.split("_")[0]))
    sam = [name for name, _, _, family in cases if family == "sam"]
    if sam:
        problems = []
        if args.taps_only:
            problems.append("--taps-only is for the ViT backbones' token taps")
        unknown = [m for m in args.method if m not in SAM_METHODS]
        if unknown:
            problems.append(f"--method {' '.join(unknown)} has no setting for SAM's windows (SAM_METHODS: "
                            f"{', '.join(SAM_METHODS)})")
        H, W = args.input_size or (1024, 1024)
        if H != W or H % 16:
            problems.append(f"--input-size {H} {W}: a SAM encoder takes square inputs, a multiple of its "
                            "16-pixel patches")
        try:
            sam_cpu_linear = _sam_cpu_linear(args.opts)
        except ValueError as e:
            problems.append(str(e))
        if problems:
            parser.error(f"SAM cases ({', '.join(sam)}): " + "; ".join(problems))
    elif args.sam_checkpoint:
        parser.error("--sam-checkpoint is for the SAM cases (sam_*)")
    jobs = []  # one per (case, method), in a fixed order (memory children find theirs by index)
    for name, cfg, size, family in cases:
        for method in args.method:
            label = name if args.method == ["expedit"] else f"{name} {method}"
            if family == "sam":
                jobs.append(sam_job(label, cfg, method, size[0], args.device, sam_cpu_linear, args.sam_checkpoint,
                                    args.allow_partial_weights))
                continue
            settings = METHOD_SETTINGS.get(family, {}).get(method, {}) if family else {}
            job = _with(cfg, {METHOD_KEY: method, **settings})
            job.merge_from_list(args.opts)
            job.MODEL.DEVICE = args.device
            jobs.append(cfg_job(label, job, size, args.taps_only, args.allow_partial_weights, checkpointer))
    if args._memory_child:
        index, variant = args._memory_child
        print_child_peak(memory_child(jobs[int(index)], variant))
        return
    argv = sys.argv[1:] if argv is None else list(argv)
    rows, base_gmacs = [], {}
    for index, job in enumerate(jobs):
        def memory(variant, index=index, name=job.label):
            if args.no_memory:
                return None
            log(f"{name}: peak memory of the {variant} backbone (subprocess)")
            return measure_memory(argv, index, variant)

        rows.append(measure_job(job, args.repeats, args.warmup, log, memory, base_gmacs))
        if args.output:  # after every case, so a long run keeps what it measured
            write_report(args.output, format_table(rows, args.threads), rows)
    print(format_table(rows, args.threads))


if __name__ == "__main__":
    main()
