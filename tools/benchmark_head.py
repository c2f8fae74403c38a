#!/usr/bin/env python
"""Mask2Former's head and post-processing: ours against the official order, part by part.

    python tools/benchmark_head.py                               # Swin-L COCO panoptic, 640 and 1024
    python tools/benchmark_head.py --parts decoder inference --sides 1024 --amp bf16 \\
        --output results/head

The parts where our computation order differs from the official code, each timed against
that order as :mod:`mask2former.official_order` writes it out (same modules, same weights,
same inputs):

* ``deform_attn`` -- one call of the pixel decoder's multi-scale deformable attention
  (``pixel_decoder.ms_deform_attn``: one ``embedding_bag`` gather) against Deformable DETR's
  pure-PyTorch core (``grid_sample`` per level, stack, weight, sum). The pixel decoder calls
  it once per encoder layer.
* ``decoder`` -- the masked-attention transformer decoder's eval forward against the
  official one (every layer's full-size mask logits, the mask repeated per head,
  ``nn.MultiheadAttention``).
* ``inference`` -- ``MaskFormer.inference`` of one image (semantic, panoptic and instance
  inference as the config turns them on) against the official order (upsample the mask
  logits to the input, ``sem_seg_postprocess``, each rule on the whole tensors).

The model is built from ``--config-file`` (default: Mask2Former Swin-L COCO panoptic) with
random weights; only its head and inference settings are used. Inputs have the shapes of a
``side`` x ``side`` image (levels at the backbone's strides): random features for the
first two parts; for ``inference``, smooth random mask logits (random values at 1/32 of
the image, upsampled, the image shared out between ``--kept`` queries) and class logits in
which those queries are confident of a class (what a trained model's panoptic inference
keeps; the rest say "no object").

Reported per part and side: the median of ``--repeats`` calls of each (interleaved in one
run after warm-up, synchronised on CUDA), the per-round ratio ours / official (median and
range), and how far the outputs differ (largest absolute difference, beside the official
output's largest absolute value; for ``inference`` also whether the panoptic ids and
segments and the instance masks are equal). The decoder's outputs can differ by more than
rounding where a mask logit within rounding of 0 flips an attention-mask entry.
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

from detectron2.structures import ImageList  # noqa: E402

from expedit_d2.cli import (HelpFormatter, add_amp_argument, add_timing_arguments,  # noqa: E402
                            apply_timing_arguments, autocast, emit_report)
from expedit_d2.engine import config_from_file  # noqa: E402
from expedit_d2.measure import interleaved_samples, round_ratios  # noqa: E402
from mask2former import official_order  # noqa: E402
from mask2former.modeling.pixel_decoder import MSDeformAttn, ms_deform_attn  # noqa: E402

__all__ = ["PARTS", "DEFAULT_CONFIG", "build_model", "deform_attn_inputs", "decoder_inputs",
           "inference_inputs", "benchmark", "main"]

PARTS = ("deform_attn", "decoder", "inference")
DEFAULT_CONFIG = (REPO / "projects/Mask2Former/configs/coco/panoptic-segmentation/swin/"
                  "maskformer2_swin_large_IN21k_384_bs16_100ep.yaml")


def build_model(config_file, opts=(), device="cpu"):
    """The config's Mask2Former in eval with random weights (seed 0)."""
    cfg, project = config_from_file(config_file, opts=opts)
    model = None
    if project is not None:
        torch.manual_seed(0)
        model = project.Trainer.build_model(cfg)
    if not hasattr(model, "sem_seg_head") or not hasattr(model, "rules"):
        raise ValueError(f"{config_file}: not a Mask2Former config (projects/Mask2Former/configs/...)")
    return model.eval().to(device)


def _level_strides(model) -> list[int]:
    """Strides of the pixel decoder's deformable-attention levels, coarse to fine."""
    shapes = model.backbone.output_shape()
    strides = [shapes[f].stride for f in model.sem_seg_head.pixel_decoder.transformer_in_features]
    return sorted(strides, reverse=True)


def _check_side(model, side: int) -> None:
    stride = max(_level_strides(model))
    if side <= 0 or side % stride:
        raise ValueError(f"--sides {side}: the image side must be a positive multiple of {stride} "
                         "(the coarsest level's stride)")


def deform_attn_inputs(model, side: int, device):
    """Inputs of one ms_deform_attn call of the pixel decoder on a side x side image: one
    query per pixel of every level, locations spread a little beyond [0, 1]."""
    attn = next(m for m in model.modules() if isinstance(m, MSDeformAttn))
    M, L, P = attn.n_heads, attn.n_levels, attn.n_points
    D = attn.value_proj.out_features // M
    g = torch.Generator().manual_seed(0)
    shapes = torch.tensor([[side // s, side // s] for s in _level_strides(model)][:L])
    S = int(shapes.prod(1).sum())
    value = torch.randn(1, S, M, D, generator=g)
    loc = torch.rand(1, S, M, L, P, 2, generator=g) * 1.2 - 0.1
    weights = torch.randn(1, S, M, L * P, generator=g).softmax(-1).view(1, S, M, L, P)
    return value.to(device), shapes.to(device), loc.to(device), weights.to(device)


def decoder_inputs(model, side: int, device):
    """(multi-scale maps coarse to fine [(1, C, side / s, side / s)], mask features (1, C,
    side / 4, side / 4)), random."""
    g = torch.Generator().manual_seed(1)
    pd = model.sem_seg_head.pixel_decoder
    dec = model.sem_seg_head.predictor
    conv_dim = pd.input_proj[0][0].out_channels
    strides = _level_strides(model)[:dec.num_feature_levels]
    x = [torch.randn(1, conv_dim, side // s, side // s, generator=g).to(device) for s in strides]
    mask_features = torch.randn(1, pd.mask_dim, side // 4, side // 4, generator=g).to(device)
    return x, mask_features


def inference_inputs(model, side: int, kept: int, device):
    """(class logits (1, Q, K + 1), mask logits (1, Q, side / 4, side / 4)): ``kept``
    queries confident of a class (every class in turn), the others of "no object"; smooth
    masks (made at 1/32 of the image, upsampled) in which the kept queries share the image
    out between them, as a trained model's do (logits of about +-6 and noise)."""
    g = torch.Generator().manual_seed(2)
    Q, K = model.num_queries, model.sem_seg_head.num_classes
    kept = max(1, min(kept, Q))
    mask_cls = torch.randn(1, Q, K + 1, generator=g)
    mask_cls[0, torch.arange(kept), torch.arange(kept) % K] += 12.0
    mask_cls[0, kept:, K] += 12.0
    c = max(side // 32, 1)
    owner = torch.randint(kept, (c, c), generator=g)
    coarse = torch.randn(Q, c, c, generator=g) * 2 - 6
    coarse[:kept] += 12.0 * (owner == torch.arange(kept)[:, None, None])
    mask_pred = F.interpolate(coarse[None], size=(side // 4, side // 4), mode="bilinear", align_corners=False)
    return mask_cls.to(device), mask_pred.to(device)


def _max_diff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item() if a.numel() else 0.0


def _max_abs(*ts) -> float:
    return max((t.float().abs().max().item() for t in ts if t.numel()), default=0.0)


def _part(model, part: str, side: int, kept: int, device):
    """(ours, official, difference(ours output, official output) -> dict) for one part."""
    if part == "deform_attn":
        inputs = deform_attn_inputs(model, side, device)
        return (lambda: ms_deform_attn(*inputs), lambda: official_order.ms_deform_attn(*inputs),
                lambda a, b: {"max_abs_diff": _max_diff(a, b), "max_abs": _max_abs(b)})
    if part == "decoder":
        dec = model.sem_seg_head.predictor
        x, mask_features = decoder_inputs(model, side, device)

        def ours():
            out = dec(x, mask_features)
            return out["pred_logits"], out["pred_masks"]

        return (ours, lambda: official_order.decoder(dec, x, mask_features),
                lambda a, b: {"max_abs_diff": max(_max_diff(a[0], b[0]), _max_diff(a[1], b[1])),
                              "max_abs": _max_abs(*b)})
    mask_cls, mask_pred = inference_inputs(model, side, kept, device)
    images = ImageList(torch.zeros(1, 3, side, side, device=device), [(side, side)])
    rules = model.rules()

    def compare(a, b):
        (a,), (b,) = a, b
        d = {"max_abs_diff": 0.0, "max_abs": 0.0}
        if "sem_seg" in a:
            d["max_abs_diff"], d["max_abs"] = _max_diff(a["sem_seg"], b["sem_seg"]), _max_abs(b["sem_seg"])
        if "panoptic_seg" in a:
            d["panoptic_equal"] = bool(torch.equal(a["panoptic_seg"][0], b["panoptic_seg"][0])
                                       and a["panoptic_seg"][1] == b["panoptic_seg"][1])
            d["segments"] = len(b["panoptic_seg"][1])
        if "instances" in a:
            ia, ib = a["instances"], b["instances"]
            d["instances_equal"] = bool(torch.equal(ia.pred_masks, ib.pred_masks)
                                        and torch.equal(ia.pred_classes, ib.pred_classes))
            d["max_abs_diff"] = max(d["max_abs_diff"], _max_diff(ia.scores, ib.scores))
            d["max_abs"] = max(d["max_abs"], _max_abs(ib.scores))
        return d

    return (lambda: model.inference(mask_cls, mask_pred, images, [{}]),
            lambda: official_order.inference(mask_cls, mask_pred, (side, side), [(side, side)], [(side, side)],
                                             rules, model.sem_seg_postprocess_before_inference),
            compare)


def benchmark(model, parts, sides, device, repeats: int, warmup: int, amp: str | None = None,
              kept: int = 30, log=print) -> list[dict]:
    """One row per (part, side); see the module docstring."""
    for side in sides:  # every side before any timing
        _check_side(model, side)
    rows = []
    for side in sides:
        for part in parts:
            ours, official, difference = _part(model, part, side, kept, device)

            def call(fn):
                def run():
                    with torch.inference_mode(), autocast(device, amp):
                        return fn()
                return run

            log(f"{part} at {side}x{side}")
            impls = {"official": call(official), "ours": call(ours)}
            samples = interleaved_samples(impls, device, repeats, warmup)
            ratios = round_ratios(samples, "official")["ours"]
            rows.append({"part": part, "side": side, "device": str(device), "amp": amp,
                         "official_ms": 1e3 * statistics.median(samples["official"]),
                         "ours_ms": 1e3 * statistics.median(samples["ours"]),
                         "ratio": statistics.median(ratios), "ratio_range": [min(ratios), max(ratios)],
                         **difference(impls["ours"](), impls["official"]())})
    return rows


def _difference_text(r: dict) -> str:
    text = f"{r['max_abs_diff']:.1e} (of {r['max_abs']:.1e})"
    if "panoptic_equal" in r:
        text += f"; panoptic {'equal' if r['panoptic_equal'] else 'DIFFERENT'} ({r['segments']} segments)"
    if "instances_equal" in r:
        text += f"; instance masks {'equal' if r['instances_equal'] else 'DIFFERENT'}"
    return text


def format_table(rows: list[dict], threads: int, config: str) -> str:
    r0 = rows[0]
    lines = [f"Mask2Former head parts, ours vs the official order ({config}, random weights); "
             f"{r0['device']} ({threads} threads), amp {r0['amp'] or 'off'}; median ms, interleaved in "
             "one run; ratio: median of the per-round ratios ours / official", "",
             "| part | image side | official ms | ours ms | ratio (rounds' range) | max abs diff (of max abs); equality |",
             "|---|---:|---:|---:|---:|---|"]
    for r in rows:
        lo, hi = r["ratio_range"]
        lines.append(f"| {r['part']} | {r['side']} | {r['official_ms']:.1f} | {r['ours_ms']:.1f} | "
                     f"{r['ratio']:.3f} ({lo:.3f}-{hi:.3f}) | {_difference_text(r)} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--config-file", type=Path, default=DEFAULT_CONFIG.relative_to(REPO))
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    parser.add_argument("--sides", nargs="+", type=int, default=[640, 1024],
                        help="image sides (square images)")
    parser.add_argument("--kept", type=int, default=30,
                        help="inference: queries confident of a class (the segments panoptic inference keeps)")
    add_timing_arguments(parser, repeats=5, warmup=1)
    add_amp_argument(parser)
    parser.add_argument("--output", type=Path, help="also write <output>.md and <output>.json")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, KEY VALUE ...")
    args = parser.parse_args(argv)
    apply_timing_arguments(args)
    log = lambda m: print(f"[benchmark_head] {m}", file=sys.stderr, flush=True)  # noqa: E731
    config = args.config_file if args.config_file.is_file() else REPO / args.config_file
    if not config.is_file():
        raise FileNotFoundError(f"--config-file {args.config_file}: no such file")
    log(f"building {args.config_file} (random weights)")
    model = build_model(config, args.opts, args.device)
    rows = benchmark(model, args.parts, args.sides, args.device, args.repeats, args.warmup, args.amp,
                     args.kept, log)
    emit_report(format_table(rows, args.threads, str(args.config_file)), rows, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
