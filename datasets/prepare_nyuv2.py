#!/usr/bin/env python
"""Prepare NYU Depth v2 (labeled subset) for expedit-d2's DPT project.

Input, the two official files:
  nyu_depth_v2_labeled.mat   MATLAB v7.3 (HDF5): images (1449 x 3 x 640 x 480 uint8, stored
                             column-major), depths (1449 x 640 x 480 float32, metres)
  splits.mat                 MATLAB v5: trainNdxs (795), testNdxs (654), 1-based indices

Output (the layout ``dpt.data`` registers as nyuv2_train / nyuv2_test):
  $DETECTRON2_DATASETS/nyuv2/{train,test}/rgb/00001.png     480 x 640 RGB, lossless PNG
  $DETECTRON2_DATASETS/nyuv2/{train,test}/depth/00001.npy   480 x 640 float32 metres
  $DETECTRON2_DATASETS/nyuv2/{train,test}.json              index of the written pairs

Names are the 1-based image numbers of the labeled set. Re-running skips images already
written (files are written to a temporary name and renamed, so a killed run leaves no
half-written file), and the index is written last.

    python datasets/prepare_nyuv2.py --labeled nyu_depth_v2_labeled.mat --splits splits.mat \\
        [--root $DETECTRON2_DATASETS]
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image
from expedit_d2.progress import progress_bar  # a bar on a terminal only

from expedit_d2.fileio import atomic_write
from expedit_d2.cli import HelpFormatter  # noqa: E402


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as fh:  # a handle: np.save(path) would append ".npy"
        np.save(fh, array)


def read_splits(path: Path) -> dict[str, np.ndarray]:
    from scipy.io import loadmat

    if not path.is_file():
        raise FileNotFoundError(f"NYUv2 split file not found: {path}")
    mat = loadmat(str(path))
    splits = {}
    for name, key in (("train", "trainNdxs"), ("test", "testNdxs")):
        if key not in mat:
            raise KeyError(f"{path} has no '{key}' (expected the official splits.mat)")
        splits[name] = np.asarray(mat[key]).reshape(-1).astype(np.int64)
    return splits


def prepare(labeled: Path, splits_file: Path, root: Path) -> dict[str, int]:
    import h5py

    if not labeled.is_file():
        raise FileNotFoundError(f"NYUv2 labeled file not found: {labeled}")
    splits = read_splits(splits_file)
    out_root = root / "nyuv2"
    counts = {}
    with h5py.File(labeled, "r") as f:
        for key in ("images", "depths"):
            if key not in f:
                raise KeyError(f"{labeled} has no '{key}' dataset (expected nyu_depth_v2_labeled.mat)")
        images, depths = f["images"], f["depths"]
        n = images.shape[0]
        for split, indices in splits.items():
            bad = indices[(indices < 1) | (indices > n)]
            if bad.size:
                raise ValueError(f"{splits_file}: {split} indices {bad[:5].tolist()} outside 1..{n}")
            (out_root / split / "rgb").mkdir(parents=True, exist_ok=True)
            (out_root / split / "depth").mkdir(parents=True, exist_ok=True)
            records = []
            for idx in progress_bar(indices, desc=f"nyuv2 {split}", unit="img"):
                name = f"{idx:05d}"
                rgb_path = out_root / split / "rgb" / f"{name}.png"
                depth_path = out_root / split / "depth" / f"{name}.npy"
                if not (rgb_path.exists() and depth_path.exists()):
                    # HDF5 holds MATLAB's column-major arrays: (3, W, H) and (W, H)
                    rgb = np.ascontiguousarray(np.asarray(images[idx - 1]).transpose(2, 1, 0))
                    depth = np.ascontiguousarray(np.asarray(depths[idx - 1], dtype=np.float32).T)
                    atomic_write(rgb_path, lambda p: Image.fromarray(rgb).save(p, format="PNG"))
                    atomic_write(depth_path, lambda p: _save_npy(p, depth))
                records.append({"image_id": int(idx), "file_name": f"{split}/rgb/{name}.png",
                                "depth_file_name": f"{split}/depth/{name}.npy"})
            index = out_root / f"{split}.json"
            atomic_write(index, json.dumps(records))
            counts[split] = len(records)
    return counts


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--labeled", type=Path, required=True, help="nyu_depth_v2_labeled.mat")
    parser.add_argument("--splits", type=Path, required=True, help="splits.mat")
    parser.add_argument("--root", type=Path, default=Path(os.environ.get("DETECTRON2_DATASETS", "datasets")))
    args = parser.parse_args(argv)
    counts = prepare(args.labeled, args.splits, args.root)
    print(f"wrote NYUv2 to {args.root / 'nyuv2'}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))


if __name__ == "__main__":
    main()
