#!/usr/bin/env python
"""Derive semantic-segmentation PNGs from COCO-format panoptic annotations.

For every annotation of ``panoptic_{split}2017.json``: a uint8 PNG with, per pixel, the
contiguous index of its category in the JSON's category list (the order Mask2Former's
registration uses), 255 where the panoptic PNG is void (id 0) or the segment is unknown.
Written to ``panoptic_semseg_{split}2017/`` beside the panoptic folder, atomically;
existing outputs are kept, so a rerun resumes.

    python datasets/prepare_coco_semantic_annos_from_panoptic_annos.py [--root $DETECTRON2_DATASETS/coco]
    python datasets/prepare_coco_semantic_annos_from_panoptic_annos.py --panoptic-json J --panoptic-root D --out O
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image
from expedit_d2.progress import progress_bar  # a bar on a terminal only

from expedit_d2.evaluation.panoptic import rgb2id
from expedit_d2.fileio import atomic_write
from expedit_d2.cli import HelpFormatter  # noqa: E402


def convert(panoptic_json: Path, panoptic_root: Path, out: Path) -> int:
    if not panoptic_json.is_file():
        raise FileNotFoundError(f"panoptic annotations not found: {panoptic_json}")
    data = json.loads(panoptic_json.read_text())
    contiguous = {c["id"]: i for i, c in enumerate(data["categories"])}
    if len(contiguous) > 255:
        raise ValueError(f"{panoptic_json}: {len(contiguous)} categories do not fit a uint8 PNG with 255 as void")
    out.mkdir(parents=True, exist_ok=True)
    done = 0
    for ann in progress_bar(data["annotations"], desc=f"semantic from {panoptic_json.name}", unit="img"):
        target = out / (Path(ann["file_name"]).stem + ".png")
        if target.exists():
            done += 1
            continue
        png = panoptic_root / ann["file_name"]
        if not png.is_file():
            raise FileNotFoundError(f"panoptic PNG not found: {png}")
        ids = rgb2id(np.asarray(Image.open(png).convert("RGB")))
        sem = np.full(ids.shape, 255, dtype=np.uint8)
        for seg in ann["segments_info"]:
            sem[ids == seg["id"]] = contiguous[seg["category_id"]]
        atomic_write(target, lambda p: Image.fromarray(sem).save(p, format="PNG"))
        done += 1
    return done


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--root", type=Path, default=Path(os.environ.get("DETECTRON2_DATASETS", "datasets")) / "coco")
    parser.add_argument("--panoptic-json", type=Path)
    parser.add_argument("--panoptic-root", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.panoptic_json:
        jobs = [(args.panoptic_json, args.panoptic_root, args.out)]
    else:
        jobs = [(args.root / f"panoptic_{s}2017.json", args.root / f"panoptic_{s}2017",
                 args.root / f"panoptic_semseg_{s}2017") for s in ("train", "val")]
    for j, r, o in jobs:
        if r is None or o is None:
            parser.error("--panoptic-json needs --panoptic-root and --out")
        print(f"{convert(j, r, o)} semantic PNGs in {o}")


if __name__ == "__main__":
    main()
