"""Accuracy versus GMACs and speed over token-reduction settings: the sweep every project uses.

The command line of :mod:`expedit_d2.sweep` (``python -m expedit_d2.sweep``, ``tools/sweep.py``);
``--help`` shows the first paragraph above."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ..checkpoint import PARTIAL_FLAG, WeightsError
from ..cli import HelpFormatter
from ..flops import FLOPS_PER_MAC
from .measure import memory_child
from .report import write_report
from .run import run_sweep
from .spec import SweepError, SweepSpec, load_sweep_file, parse_grid
from .store import merge, read_rows

__all__ = ["build_parser", "spec_from_args", "parse_shard", "main", "cli"]

logger = logging.getLogger("expedit_d2.sweep")


def parse_shard(text):
    """``I/N`` -> (I, N), None -> None."""
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
    p.add_argument("--project", help="project folder (default: found from the config's path), or its script "
                                     "(e.g. projects/Mask2Former/train_net_video.py for the video configs)")
    p.add_argument("--input-size", nargs=2, type=int, metavar=("H", "W"), help="image size for GMACs/latency")
    p.add_argument("--frames", type=int, metavar="T",
                   help="a video model: GMACs, latency and memory of a clip of T frames of --input-size")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=[V, ...]",
                   help="a grid axis (repeatable); the sweep is the product of the axes")
    p.add_argument("--output-dir", default="output/sweep", help="results, table and plot go here")
    p.add_argument("--num-gpus", type=int, default=1, help="per point evaluation (Detectron2 launch)")
    p.add_argument("--shard", help="I/N: evaluate every N-th point starting at I")
    p.add_argument("--merge", action="store_true", help="join the shards' results, write the report")
    p.add_argument("--report-only", action="store_true", help="write the report from existing results")
    p.add_argument("--metric", help="primary metric, e.g. panoptic_seg/PQ (default: the project's SWEEP)")
    p.add_argument("--metric-mode", choices=["max", "min"])
    p.add_argument("--repeats", type=int,
                   help=f"timed forwards per point (default: the sweep file's, else {SweepSpec.repeats})")
    p.add_argument("--warmup", type=int,
                   help=f"untimed forwards first (default: the sweep file's, else {SweepSpec.warmup})")
    p.add_argument("--no-memory", action="store_true", help="skip peak-memory measurement")
    p.add_argument(PARTIAL_FLAG, action="store_true",
                   help="evaluate even if MODEL.WEIGHTS does not cover the whole model (passed on to "
                        "train_net.py --eval-only; see its --help); without it that is an error")
    p.add_argument("--budget-gmacs", type=float,
                   help="report the best point (and each method's) within this backbone GMACs")
    p.add_argument("--budget-gflops", type=float,
                   help="the same in GFLOPs, counting two flops per multiply-add (= 2 x GMACs)")
    p.add_argument("--budget-ms", type=float, help="report the best point (and each method's) within this latency (ms)")
    p.add_argument("--memory-child", help=argparse.SUPPRESS)
    p.add_argument("opts", nargs=argparse.REMAINDER, help="base config overrides KEY VALUE ...")
    return p


def spec_from_args(args) -> SweepSpec:
    """The sweep file's settings (if any), overridden by the flags."""
    data = load_sweep_file(args.sweep_file) if args.sweep_file else {}
    for name in ("config_file", "project", "metric", "metric_mode", "repeats", "warmup", "frames"):
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
    from detectron2.utils.logger import setup_logger

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
        run_sweep(spec, out_dir, parse_shard(args.shard), args.num_gpus)  # writes the report
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
