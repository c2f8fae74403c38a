#!/usr/bin/env python
"""Whole-model latency of base vs expedited settings: what users feel, measured in one run.

    python tools/benchmark_model.py --config-file \\
        projects/Mask2Former/configs/coco/panoptic-segmentation/swin/maskformer2_hourglass_swin_large_IN21k_384_bs16_100ep.yaml \\
        --input-size 640 640 --output results/model_m2f_640
    python tools/benchmark_model.py --config-file projects/DPT/configs/dpt_hybrid_nyuv2.yaml \\
        --input-size 480 640 --grid "MODEL.EXPEDIT.CLUSTERING_LOCATION=[4, 6]" \\
        --grid "MODEL.EXPEDIT.NUM_CLUSTERS=[[16, 16], [24, 24]]" --amp bf16

Settings are given as the sweep takes them (``--grid KEY=[...]``, ``--point KEY=VALUE ...``,
the official Expedit keys accepted; :mod:`expedit_d2.sweep`); without any, the config as
given is compared with its un-expedited baseline. Every model has the same weights
(``MODEL.WEIGHTS`` loaded strictly into each, else the baseline's random weights copied).

For each setting, on one image of ``--input-size`` (batch 1, the project's own
``model([{"image", "height", "width"}])``: preprocessing and post-processing included):

* latency: warm-up, then ``--repeats`` rounds, each timing every setting once in turn in
  the same process (forwards, then backwards the next round), synchronised on CUDA; ``ms``
  is the median, the latency ratio is the median over rounds of the setting's time over
  the baseline's in that round (drift slower than a round cancels), shown with its 95%
  confidence interval (distribution-free: the rounds' order statistics; the JSON also
  holds the rounds' lowest and highest ratio), the same interval shifted for the gap, and
  the ratio of the fastest rounds (on a shared machine interference only ever slows a call
  down, so the fastest round is the least disturbed);
* a per-part breakdown from a second, instrumented pass, interleaved the same way
  (medians): the backbone, each head part
  (a meta-architecture's ``benchmark_parts()``, else its top-level children: Mask2Former's
  pixel decoder and transformer decoder, DPT's reassemble and scratch), and the rest (pre-
  and post-processing: each round's call less its parts); each part's ratio to the baseline
  (the rest's included) is the median of its per-round ratios, as the latency ratio; the
  JSON holds every round of every part (``parts_ms_rounds``); where the platform counts
  them, the same pass counts the minor page faults of each part and call (``faults``: the
  median per call; ``parts_faults`` and ``parts_faults_rounds`` as the times), which tells
  the cost of touching freshly allocated memory (~1 us per 4 KB page on a CPU) from compute;
* backbone and whole-model GMACs (fvcore multiply-adds) and their ratios to the baseline,
  beside the latency ratio (``gap`` = latency ratio - model GMACs ratio);
* what post-processing produced (Mask2Former: panoptic segments, instances), whose cost
  depends on it: with random weights the settings' outputs differ, and so may that cost;
* ``--amp fp16|bf16`` runs under autocast; ``--compile backbone|model`` puts that part
  through ``torch.compile`` (the backbone: each entry point the head calls, ``forward`` or
  ``forward_taps``; static shapes, ``dynamic=False``: the settings share their code, and
  torch.compile would otherwise give the settings compiled after the first kernels for
  any size, which a user's one model at one size does not get; warm-up then includes
  compilation, and the instrumented pass, whose timers the compiled model sees, warms up
  again).

``--batch 1 2 4`` adds throughput by batch size: for each N, every setting called on a
batch of N copies of the image (one size, so one batch: ``expedit_d2.batching``), the settings
interleaved as above; per setting and N the median ms per batch, images/s, the latency ratio
to the baseline at the same N [95% interval], and the speed-up in images/s over the setting's
own at the first N (JSON: each row's ``batches``).

Writes ``<output>.md`` and ``<output>.json`` atomically (``--output``).

On a noisy machine one run's interval can be wide, and runs of the same command can differ
by more than their intervals say. ``--pool RUN.json ...`` measures nothing: it pools the
per-round ratios of earlier runs' JSON files (the same settings, input, device, threads,
amp, compile, ``MODEL.CPU_LINEAR`` and GMACs, else an error naming the file) and gives each
setting's latency ratio and gap over all their rounds, with the 95% interval of that
median and each run's own gap, and the backbone's latency ratio pooled the same way from
the per-part pass's rounds::

    python tools/benchmark_model.py --pool results/m2f_1024_a.json results/m2f_1024_b.json \
        --output results/m2f_1024_pooled
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from expedit_d2.benchmark.model import POOL, benchmark, format_pooled, format_table
from expedit_d2.benchmark.pool import pool_files
from expedit_d2.checkpoint import PARTIAL_FLAG
from expedit_d2.cli import HelpFormatter, add_amp_argument, add_timing_arguments, apply_timing_arguments, emit_report
from expedit_d2.sweep import SweepError, SweepSpec, parse_grid, parse_point

__all__ = ["main"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--config-file", help="a project config (baseline or expedited); required unless --pool")
    parser.add_argument("--project", help="project folder (default: found from the config's path)")
    parser.add_argument("--input-size", nargs=2, type=int, metavar=("H", "W"), help="required unless --pool")
    parser.add_argument("--frames", type=int, metavar="T",
                        help="a video model (e.g. --project projects/Mask2Former/train_net_video.py): time and "
                             "count a clip of T frames of --input-size per forward")
    parser.add_argument("--pool", nargs="+", type=Path, metavar="RUN.json",
                        help="measure nothing: pool the rounds of earlier runs' JSON files (same settings, "
                             "input, device, threads, amp, compile and GMACs) into one latency ratio and "
                             "gap per setting")
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=[V, ...]",
                        help="a settings axis, as for the sweep (repeatable; product of the axes)")
    parser.add_argument("--point", action="append", default=[], metavar="KEY=VALUE[;KEY=VALUE]",
                        help="one explicit setting (repeatable)")
    add_timing_arguments(parser, repeats=3, warmup=1)
    add_amp_argument(parser)
    parser.add_argument("--compile", choices=["backbone", "model"], help="torch.compile a part (default: off)")
    parser.add_argument("--batch", nargs="+", type=int, metavar="N",
                        help="also time batches of N copies of the image (e.g. 1 2 4): images/s and the "
                             "latency ratio per batch size (default: batch 1 only)")
    parser.add_argument("--output", type=Path, help="also write <output>.md and <output>.json")
    parser.add_argument(PARTIAL_FLAG, action="store_true",
                        help="with MODEL.WEIGHTS: accept a file that covers only part of the model")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = parser.parse_args(argv)
    if args.pool:
        try:
            rows = pool_files(args.pool, POOL)
        except ValueError as e:
            raise SweepError(str(e)) from e
        emit_report(format_pooled(rows), rows, args.output)
        return 0
    if not args.config_file or not args.input_size:
        parser.error("--config-file and --input-size are required (unless --pool)")
    bad = [n for n in args.batch or () if n < 1]
    if bad:
        parser.error(f"--batch: batch sizes must be >= 1, got {bad[0]}")
    apply_timing_arguments(args)
    opts = list(args.opts) + ["MODEL.DEVICE", args.device]
    spec = SweepSpec(config_file=args.config_file, input_size=tuple(args.input_size), project=args.project,
                     frames=args.frames,
                     grid=parse_grid(args.grid), points=[parse_point(p) for p in args.point], opts=opts)

    def log(msg):
        print(f"[benchmark_model] {msg}", file=sys.stderr, flush=True)

    rows = benchmark(spec, args.device, args.repeats, args.warmup, args.amp, args.compile,
                     args.allow_partial_weights, log, batches=args.batch)
    emit_report(format_table(rows, args.threads), rows, args.output)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except SweepError as e:
        print(f"benchmark_model: error: {e}", file=sys.stderr)
        sys.exit(2)
