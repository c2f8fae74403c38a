#!/usr/bin/env python
"""ADE20K (SceneParsing, ADEChallengeData2016) semantic labels in Detectron2's convention.

The official ``annotations/{training,validation}/*.png`` hold 0 for "other" and 1..150 for
the classes; this writes ``annotations_detectron2/{training,validation}/*.png`` with
0..149 for the classes and 255 (ignored) for "other", atomically, skipping files already
written. Detectron2's builtin ``ade20k_sem_seg_{train,val}`` read that folder.

    python datasets/prepare_ade20k_sem_seg.py [--root $DETECTRON2_DATASETS/ADEChallengeData2016]
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
from PIL import Image
from expedit_d2.progress import progress_bar  # a bar on a terminal only

from expedit_d2.fileio import atomic_write
from expedit_d2.cli import HelpFormatter  # noqa: E402


def convert_label(label: np.ndarray) -> np.ndarray:
    """0 -> 255, k -> k - 1 (uint8)."""
    if label.max(initial=0) > 150:
        raise ValueError(f"ADE20K labels are 0..150, found {int(label.max())}")
    out = label.astype(np.int16) - 1
    out[label == 0] = 255
    return out.astype(np.uint8)


def convert_split(root: Path, split: str) -> int:
    src, dst = root / "annotations" / split, root / "annotations_detectron2" / split
    if not src.is_dir():
        raise FileNotFoundError(f"ADE20K annotations not found: {src} (unpack ADEChallengeData2016.zip there)")
    dst.mkdir(parents=True, exist_ok=True)
    files = sorted(src.glob("*.png"))
    for f in progress_bar(files, desc=f"ade20k {split}", unit="img"):
        target = dst / f.name
        if target.exists():
            continue
        label = convert_label(np.asarray(Image.open(f)))
        atomic_write(target, lambda p: Image.fromarray(label).save(p, format="PNG"))
    return len(files)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--root", type=Path,
                        default=Path(os.environ.get("DETECTRON2_DATASETS", "datasets")) / "ADEChallengeData2016")
    args = parser.parse_args(argv)
    for split in ("training", "validation"):
        print(f"{convert_split(args.root, split)} {split} labels in {args.root / 'annotations_detectron2' / split}")


if __name__ == "__main__":
    main()
