#!/usr/bin/env python
"""Export a config's expedited backbone, or DPT's whole image-to-depth network, to ONNX.

    python tools/export_onnx.py --config-file projects/DPT/configs/demo/tiny_vit_nyuv2.yaml \\
        --input-size 480 640 --output results/tiny_dpt.onnx --what model \\
        MODEL.EXPEDIT.CLUSTERING_LOCATION 1 MODEL.EXPEDIT.NUM_CLUSTERS "[12, 12]"
    python tools/export_onnx.py --config-file configs/backbones/vit_hybrid_expedit_nyuv2.yaml \\
        --input-size 384 384 --output results/hybrid_backbone.onnx

For one fixed input size (batch 1), in eval mode, with PyTorch's dynamo exporter (opset 18):
``--what backbone`` exports the backbone (outputs: its maps in ``output_shape()`` order, e.g.
res2..res5), ``--what model`` DPT's whole network (input: the image in the model's pixel
format, normalised inside the graph; output: the depth map). The clustering iterations unroll
into graph ops, the reconstruction's top-k / nearest centre become ``TopK`` / ``ArgMin``.

Both the reduced model (``--output``) and its un-reduced base (``<output stem>_base.onnx``,
the same weights) are exported, then run with onnxruntime (CPU) on a random image: the report
gives, per output, the largest |onnxruntime - PyTorch| relative to the output's largest
absolute value (the run fails above ``--tolerance``), and the latency of onnxruntime and of
PyTorch eager for base and reduced, interleaved in one loop (medians of ``--repeats`` rounds;
ratios per round). ``--repeats 0``: parity only.

Mask2Former (and any meta-architecture but DPT) does not export whole: its inputs are lists of
dicts of images of any size, its post-processing builds per-image results of data-dependent
size; ``--what model`` refuses it by name, ``--what backbone`` exports its backbone.
Needs the optional extra: ``pip install -e .[onnx]`` (``onnx``, ``onnxruntime``, ``onnxscript``).
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

from expedit_d2.checks import check_positive_int
from expedit_d2.checkpoint import PARTIAL_FLAG
from expedit_d2.cli import HelpFormatter, add_timing_arguments, apply_timing_arguments, emit_report
from expedit_d2.export import (OPSET, build_export_pair, export_onnx, onnx_latency, onnx_parity, onnx_session,
                               require_onnx)
from expedit_d2.measure import median_interval, round_ratios

__all__ = ["main", "format_table"]

VARIANTS = ("base", "expedited")


def format_table(data: dict) -> str:
    lines = [f"ONNX export of {data['config_file']} ({data['what']}, {data['input_size'][0]}x{data['input_size'][1]}, "
             f"opset {data['opset']}, onnxruntime {data['onnxruntime']}, {data['threads']} threads)", "",
             "| model | file | output | max rel. diff (onnxruntime vs PyTorch) |", "|---|---|---|---|"]
    for v in VARIANTS:
        for name, d in data["parity"][v].items():
            lines.append(f"| {v} | {data['files'][v]} | {name} | {d:.2e} |")
    lines.append("\nexpedited vs base (PyTorch, max rel. diff): "
                 + ", ".join(f"{n} {d:.2e}" for n, d in data["expedited_vs_base"].items()))
    if data.get("ms"):
        lines += ["", "| model | eager ms | onnxruntime ms | onnxruntime / eager (95% CI) |", "|---|---|---|---|"]
        for v in VARIANTS:
            r = data["ratio_ort_over_eager"][v]
            lines.append(f"| {v} | {data['ms'][f'{v} eager']:.2f} | {data['ms'][f'{v} onnxruntime']:.2f} | "
                         f"{r['median']:.3f} ({r['ci'][0]:.3f}-{r['ci'][1]:.3f}) |")
        for rt in ("eager", "onnxruntime"):
            r = data["ratio_expedited_over_base"][rt]
            lines.append(f"\nexpedited / base latency, {rt}: {r['median']:.3f} ({r['ci'][0]:.3f}-{r['ci'][1]:.3f})")
    return "\n".join(lines)


def _ratio(values):
    return {"median": statistics.median(values), "ci": list(median_interval(values))}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--config-file", required=True, help="a project's config or one of configs/")
    parser.add_argument("--input-size", nargs=2, type=int, metavar=("H", "W"), required=True,
                        help="the fixed input size of the graph (batch 1)")
    parser.add_argument("--what", choices=("backbone", "model"), default="backbone",
                        help="backbone: the backbone's maps; model: DPT's whole image-to-depth network")
    parser.add_argument("--output", type=Path, required=True,
                        help="the reduced model's .onnx (the base goes to <stem>_base.onnx beside it)")
    parser.add_argument("--report", type=Path, help="also write <report>.md and <report>.json")
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="largest allowed relative difference of onnxruntime from PyTorch")
    add_timing_arguments(parser, repeats=5, warmup=1)
    parser._option_string_actions["--repeats"].help += "; 0: parity only"
    parser.set_defaults(device="cpu")  # onnxruntime runs on the CPU here, and so does the eager side
    parser.add_argument(PARTIAL_FLAG, action="store_true",
                        help="with MODEL.WEIGHTS: accept a file that covers only part of the model")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = parser.parse_args(argv)
    if args.output.suffix != ".onnx":
        parser.error(f"--output {args.output}: name an .onnx file")
    if args.device != "cpu":
        parser.error(f"--device {args.device}: the export and onnxruntime check run on the CPU")
    if args.repeats < 0:
        parser.error(f"--repeats must be >= 0 (0: parity only), got {args.repeats}")
    H, W = (check_positive_int(s, "--input-size") for s in args.input_size)
    require_onnx()
    apply_timing_arguments(args)
    import onnxruntime

    def log(msg):
        print(f"[export_onnx] {msg}", file=sys.stderr, flush=True)

    opts = [*args.opts, "MODEL.DEVICE", "cpu"]
    base, reduced, cfg = build_export_pair(args.config_file, opts, args.what, args.allow_partial_weights)
    gen = torch.Generator().manual_seed(0)
    if args.what == "model":  # an image in the model's pixel range
        image = torch.rand(1, 3, H, W, generator=gen) * 255.0
    else:
        image = torch.randn(1, 3, H, W, generator=gen)
    files = {"expedited": args.output, "base": args.output.with_name(f"{args.output.stem}_base.onnx")}
    modules = {"base": base, "expedited": reduced}
    sessions, parity = {}, {}
    for v in VARIANTS:
        log(f"exporting the {v} {args.what} to {files[v]}")
        export_onnx(modules[v], image, files[v])
        sessions[v] = onnx_session(files[v], args.threads)
        parity[v] = onnx_parity(sessions[v], modules[v], image)
    with torch.no_grad():  # how far the reduction moves the outputs (0: nothing was reduced)
        moved = {n: float((x - b).abs().max() / b.abs().max().clamp_min(1e-30))
                 for n, b, x in zip(base.names, base(image), reduced(image))}
    if not any(moved.values()):
        log("warning: the expedited outputs equal the base's: does the config reduce any tokens "
            "(e.g. MODEL.EXPEDIT.CLUSTERING_LOCATION -1 is off)?")
    data = {"config_file": str(args.config_file), "opts": args.opts, "what": args.what, "input_size": [H, W],
            "opset": OPSET, "onnxruntime": onnxruntime.__version__, "threads": args.threads,
            "files": {v: str(p) for v, p in files.items()}, "parity": parity, "expedited_vs_base": moved, "tolerance": args.tolerance,
            "command": "python tools/export_onnx.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    if args.repeats:
        log(f"latency: {args.repeats} interleaved rounds of eager and onnxruntime, base and expedited")
        rounds = onnx_latency({v: (modules[v], sessions[v]) for v in VARIANTS}, image, args.repeats, args.warmup)
        data["ms_rounds"] = {k: [t * 1e3 for t in ts] for k, ts in rounds.items()}
        data["ms"] = {k: statistics.median(ts) * 1e3 for k, ts in rounds.items()}
        data["ratio_ort_over_eager"] = {
            v: _ratio(round_ratios({"e": rounds[f"{v} eager"], "o": rounds[f"{v} onnxruntime"]}, "e")["o"])
            for v in VARIANTS}
        data["ratio_expedited_over_base"] = {
            rt: _ratio(round_ratios({"b": rounds[f"base {rt}"], "x": rounds[f"expedited {rt}"]}, "b")["x"])
            for rt in ("eager", "onnxruntime")}
    emit_report(format_table(data), data, args.report)
    worst = {f"{v} {name}": d for v in VARIANTS for name, d in parity[v].items() if not d <= args.tolerance}
    if worst:
        sys.exit(f"[export_onnx] onnxruntime differs from PyTorch beyond --tolerance {args.tolerance}: "
                 + ", ".join(f"{k}: {d:.2e}" for k, d in worst.items()))


if __name__ == "__main__":
    main()
