#!/usr/bin/env python
"""Mask2Former's multi-scale deformable attention: ours against the official order.

    python tools/benchmark_deform_attn.py                        # Swin-L levels at 640 and 1024
    python tools/benchmark_deform_attn.py --cases 1024 --amp bf16 --output results/deform_attn

Ours is ``mask2former.modeling.pixel_decoder.ms_deform_attn`` (one ``embedding_bag``
gather). The official order (Deformable DETR's pure-PyTorch core, which Mask2Former runs
on CPU and in its own tests) is :func:`grid_sample_order`: one ``grid_sample`` per level of
all heads and points, the samples stacked, multiplied by the attention weights and
summed. Both get the same inputs: the pixel decoder's shapes (8 heads of 32 channels, 3
levels at strides 32, 16 and 8, 4 points, one query per pixel of every level), sampling
locations spread a little beyond [0, 1], softmaxed attention weights.

Reported per case: the median of ``--repeats`` calls of each (interleaved in one run after
warm-up, synchronised on CUDA), the per-round ratio ours / official (median and range),
and the largest absolute difference of the outputs.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "projects" / "Mask2Former"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from expedit_d2.cli import (HelpFormatter, add_amp_argument, add_timing_arguments,  # noqa: E402
                            apply_timing_arguments, autocast, emit_report)
from expedit_d2.measure import interleaved_samples, round_ratios  # noqa: E402
from mask2former.modeling.pixel_decoder import ms_deform_attn  # noqa: E402

__all__ = ["CASES", "grid_sample_order", "make_inputs", "benchmark", "main"]

#: image side -> the pixel decoder's level sizes (strides 32, 16, 8), coarse to fine
CASES = {"640": 640, "1024": 1024}


def grid_sample_order(value, spatial_shapes, sampling_locations, attention_weights):
    """The official order: value (N, S, M, D), sampling_locations (N, Lq, M, L, P, 2) in
    [0, 1], attention_weights (N, Lq, M, L, P) -> (N, Lq, M * D)."""
    N, S, M, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    sizes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    per_level = value.split([h * w for h, w in sizes], dim=1)
    grids = 2 * sampling_locations - 1  # grid_sample's [-1, 1]
    samples = []
    for lvl, (h, w) in enumerate(sizes):
        v = per_level[lvl].flatten(2).transpose(1, 2).reshape(N * M, D, h, w)
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)  # (N * M, Lq, P, 2)
        samples.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    stacked = torch.stack(samples, dim=-2).flatten(-2)  # (N * M, D, Lq, L * P)
    weights = attention_weights.transpose(1, 2).reshape(N * M, 1, Lq, L * P)
    out = (stacked * weights).sum(-1).view(N, M * D, Lq)
    return out.transpose(1, 2).contiguous()


def make_inputs(side: int, device, heads: int = 8, channels: int = 32, points: int = 4):
    """Inputs of one image's deformable attention at the pixel decoder's three levels."""
    g = torch.Generator().manual_seed(0)
    shapes = torch.tensor([[side // s, side // s] for s in (32, 16, 8)])
    S, L = int(shapes.prod(1).sum()), len(shapes)
    value = torch.randn(1, S, heads, channels, generator=g)
    loc = torch.rand(1, S, heads, L, points, 2, generator=g) * 1.2 - 0.1
    weights = torch.randn(1, S, heads, L * points, generator=g).softmax(-1).view(1, S, heads, L, points)
    return value.to(device), shapes.to(device), loc.to(device), weights.to(device)


def benchmark(cases, device, repeats: int, warmup: int, amp: str | None = None, log=print) -> list[dict]:
    """One row per case (see the module docstring)."""
    rows = []
    for name in cases:
        inputs = make_inputs(CASES[name], device)

        def call(fn):
            def run():
                with torch.inference_mode(), autocast(device, amp):
                    return fn(*inputs)
            return run

        log(f"case {name}: {int(inputs[0].shape[1])} queries")
        impls = {"official": call(grid_sample_order), "ours": call(ms_deform_attn)}
        samples = interleaved_samples(impls, device, repeats, warmup)
        ratios = round_ratios(samples, "official")["ours"]
        diff = (impls["ours"]().float() - impls["official"]().float()).abs().max().item()
        rows.append({"case": name, "device": str(device), "amp": amp,
                     "official_ms": 1e3 * statistics.median(samples["official"]),
                     "ours_ms": 1e3 * statistics.median(samples["ours"]),
                     "ratio": statistics.median(ratios), "ratio_range": [min(ratios), max(ratios)],
                     "max_abs_diff": diff})
    return rows


def format_table(rows: list[dict], threads: int) -> str:
    r0 = rows[0]
    lines = [f"Multi-scale deformable attention, ours vs the official grid_sample order; {r0['device']} "
             f"({threads} threads), amp {r0['amp'] or 'off'}; median ms, interleaved in one run; ratio: "
             "median of the per-round ratios ours / official", "",
             "| image side | official ms | ours ms | ratio (rounds' range) | max abs diff |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        lo, hi = r["ratio_range"]
        lines.append(f"| {r['case']} | {r['official_ms']:.1f} | {r['ours_ms']:.1f} | {r['ratio']:.3f} "
                     f"({lo:.3f}-{hi:.3f}) | {r['max_abs_diff']:.2e} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES),
                        help="image sides (Swin-L pixel-decoder levels at strides 32, 16, 8)")
    add_timing_arguments(parser, repeats=7, warmup=2)
    add_amp_argument(parser)
    parser.add_argument("--output", type=Path, help="also write <output>.md and <output>.json")
    args = parser.parse_args(argv)
    apply_timing_arguments(args)
    rows = benchmark(args.cases, args.device, args.repeats, args.warmup, args.amp,
                     log=lambda m: print(f"[benchmark_deform_attn] {m}", file=sys.stderr, flush=True))
    emit_report(format_table(rows, args.threads), rows, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
