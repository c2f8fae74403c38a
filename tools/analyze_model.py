#!/usr/bin/env python
"""Backbone and whole-model GMACs of a config at a stated input size (Detectron2 style).

    python tools/analyze_model.py --config-file cfg.yaml --input-size 1024 1024 [KEY VALUE ...]
    python tools/analyze_model.py --config-file cfg.yaml --tasks flop parameter

Counts are fvcore's multiply-adds (GMACs; printed with GFLOPs = 2 x GMACs beside them,
the convention of the DPT paper -- Mask2Former's published "GFLOPs" are the GMACs) on one image of the stated size
(channels from the config), with expedit-d2's handles for fused attention and the
clustering/reconstruction operators (:mod:`expedit_d2.flops`). The whole model is run in
inference mode on that image. ``parameter`` prints the parameter count per module.
Projects register their meta-architectures when imported: pass ``--project
projects/Mask2Former`` (a folder with the project's package) for theirs, or a project's
script (``--project projects/Mask2Former/train_net_video.py``), which then builds the config.
A video model (``VideoMaskFormer``): ``--frames T`` counts a clip of T frames of the stated
size, per clip and per frame.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import torch

from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.utils.analysis import parameter_count_table
from detectron2.utils.logger import setup_logger

from expedit_d2 import add_expedit_config
from expedit_d2.engine import config_from_file, load_project
from expedit_d2.flops import FLOPS_PER_MAC, gmacs
from expedit_d2.cli import HelpFormatter  # noqa: E402


def setup(args):
    scripts = [p for p in args.project if p.endswith(".py")]
    if scripts:  # a project's training script builds the config (e.g. train_net_video.py)
        if len(args.project) > 1:
            raise SystemExit(f"analyze_model.py: error: --project {scripts[0]} (a script) goes alone")
        cfg, _ = config_from_file(args.config_file, scripts[0], [*args.opts, "MODEL.DEVICE", args.device])
        return cfg
    cfg = get_cfg()
    add_expedit_config(cfg)
    for project in args.project:
        path = Path(project).resolve()
        sys.path.insert(0, str(path))
        pkg = importlib.import_module(path.name.lower().replace("-", "_"))
        for name in dir(pkg):  # the project's add_*_config functions
            if name.startswith("add_") and name.endswith("_config") and name != "add_expedit_config":
                getattr(pkg, name)(cfg)
        if (path / "train_net.py").is_file():  # its datasets: models read their metadata
            load_project(path).register_datasets()
    if args.config_file:
        cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.MODEL.DEVICE = args.device
    cfg.freeze()
    return cfg


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--config-file", default="", metavar="FILE")
    parser.add_argument("--input-size", nargs=2, type=int, default=[1024, 1024], metavar=("H", "W"))
    parser.add_argument("--tasks", nargs="+", choices=["flop", "parameter"], default=["flop"])
    parser.add_argument("--project", action="append", default=[],
                        help="project folder whose package registers a meta-architecture, or a project's "
                             "training script (e.g. projects/Mask2Former/train_net_video.py)")
    parser.add_argument("--frames", type=int, default=None, metavar="T",
                        help="a video model: count on a clip of T frames (per clip and per frame)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backbone-only", action="store_true")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = parser.parse_args(argv)
    logger = setup_logger(name="expedit_d2")
    cfg = setup(args)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    H, W = args.input_size
    channels = len(cfg.MODEL.PIXEL_MEAN)
    image = torch.rand(channels, H, W, device=args.device) * 255
    if "parameter" in args.tasks:
        logger.info("Parameter count:\n" + parameter_count_table(model, max_depth=3))
    if "flop" in args.tasks:
        res = gmacs(model, image, whole_model=not args.backbone_only, frames=args.frames)
        parts = [("backbone", f"Backbone {cfg.MODEL.BACKBONE.NAME}")]
        if "model" in res:
            parts.append(("model", f"Whole model {cfg.MODEL.META_ARCHITECTURE}"))
        clip = "" if args.frames is None else f" per clip of {args.frames} frames"
        for key, what in parts:
            per_frame = "" if args.frames is None else f" ({res[key + '_per_frame']:.2f} GMACs per frame)"
            logger.info(f"{what}: {res[key]:.2f} GMACs (fvcore multiply-adds) = "
                        f"{FLOPS_PER_MAC * res[key]:.2f} GFLOPs (2 flops per multiply-add){clip}{per_frame} "
                        f"at input {H}x{W} (padded to {res['padded']})")
        for key, _ in parts:
            print(f"{key}_gmacs\t{res[key]:.3f}")
            print(f"{key}_gflops\t{FLOPS_PER_MAC * res[key]:.3f}")
            if args.frames is not None:
                print(f"{key}_gmacs_per_frame\t{res[key + '_per_frame']:.3f}")


if __name__ == "__main__":
    main()
