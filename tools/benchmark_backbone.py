#!/usr/bin/env python
"""Base vs reduced backbone on the same weights, measured in one run.

    python tools/benchmark_backbone.py                        # built-in cases, expedit
    python tools/benchmark_backbone.py --cases swin_l_640 --repeats 5
    python tools/benchmark_backbone.py --config-file my.yaml --input-size 800 1216 \\
        MODEL.EXPEDIT.CLUSTERING_LOCATION 8
    python tools/benchmark_backbone.py --cases vit_hybrid_640x480 --method tome evit pool expedit
    python tools/benchmark_backbone.py --cases sam_vit_b_1024_a8_81 --method expedit pool tome
    python tools/benchmark_backbone.py --cases sam_vit_h_1024_a6_81 --repeats 0   # GMACs only

``--method`` picks the token-reduction method(s) (``MODEL.TOKEN_REDUCTION.METHOD``); on each
built-in case every registered method takes its registered example for the case's expedit
setting, at about the same mean tokens per block and so roughly the same GMACs
(:func:`expedit_d2.benchmark.cases.method_settings`), and KEY VALUE overrides change any of them.

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
(:func:`expedit_d2.benchmark.cases.sam_method_settings`). ``sam_tiny_416_a8_81`` is a 4-block encoder of SAM's layout, for smoke
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
import sys
from pathlib import Path

from expedit_d2.benchmark.backbone import (POOL, config_case, format_pooled, format_table, make_jobs,
                                           measure_job, memory_child, named_cases, sam_cpu_linear)
from expedit_d2.benchmark.cases import CASES, DEFAULT_CASES, methods, sam_methods
from expedit_d2.benchmark.pool import pool_files
from expedit_d2.checkpoint import PARTIAL_FLAG
from expedit_d2.cli import HelpFormatter, add_timing_arguments, apply_timing_arguments, emit_report
from expedit_d2.measure import child_peak_mb, print_child_peak, write_report

__all__ = ["main"]


def measure_memory(argv, job_index, variant) -> float | None:
    """Run this script again as a child that measures one model's peak memory, with
    glibc's mmap threshold fixed so freed blocks leave the resident set (in the parent
    that setting would slow every allocation and skew the timings)."""
    return child_peak_mb([sys.executable, __file__, "--_memory-child", str(job_index), variant, *argv])


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
    parser.add_argument("--method", nargs="+", choices=methods(), default=["expedit"],
                        help="token-reduction method(s), each against the base (built-in ViT cases: "
                        "settings of about equal GMACs: each method's registered example for the case's expedit setting; KEY VALUE overrides win; "
                        "SAM cases: expedit, pool, tome at the row's s x s per window)")
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
        rows = pool_files(args.pool, POOL)
        emit_report(format_pooled(rows), rows, args.output)
        return
    if args.repeats < 0:
        parser.error(f"--repeats must be >= 0 (0: GMACs and memory only), got {args.repeats}")
    apply_timing_arguments(args)

    def log(msg):
        print(f"[benchmark_backbone] {msg}", file=sys.stderr, flush=True)

    if args.config_file:  # any config: a project's (found above the file, or --project) or ours
        case, checkpointer = config_case(args.config_file, args.project, args.input_size)
        cases = [case]
    else:
        cases, checkpointer = named_cases(args.cases, args.input_size, log), None
    sam = [case.name for case in cases if case.family == "sam"]
    sam_linear = "blas"
    if sam:
        problems = []
        if args.taps_only:
            problems.append("--taps-only is for the ViT backbones' token taps")
        unknown = [m for m in args.method if m not in sam_methods()]
        if unknown:
            problems.append(f"--method {' '.join(unknown)} has no setting for SAM's windows (methods: "
                            f"{', '.join(sam_methods())})")
        H, W = args.input_size or (1024, 1024)
        if H != W or H % 16:
            problems.append(f"--input-size {H} {W}: a SAM encoder takes square inputs, a multiple of its "
                            "16-pixel patches")
        try:
            sam_linear = sam_cpu_linear(args.opts)
        except ValueError as e:
            problems.append(str(e))
        if problems:
            parser.error(f"SAM cases ({', '.join(sam)}): " + "; ".join(problems))
    elif args.sam_checkpoint:
        parser.error("--sam-checkpoint is for the SAM cases (sam_*)")
    jobs = make_jobs(cases, args.method, args.opts, args.device, args.taps_only, args.allow_partial_weights,
                     checkpointer, args.sam_checkpoint, sam_linear)
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
