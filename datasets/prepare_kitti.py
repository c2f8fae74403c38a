#!/usr/bin/env python
"""Check a KITTI depth layout and write the Eigen split indexes for expedit-d2's DPT project.

Input, in the layout DPT and BTS users have under ``$DETECTRON2_DATASETS/kitti``:
  raw/<date>/<date>_drive_<n>_sync/image_02/data/<frame>.png
      the KITTI raw RGB images (BTS's ``kitti_dataset`` folder)
  data_depth_annotated/<date>_drive_<n>_sync/proj_depth/groundtruth/image_02/<frame>.png
      KITTI's annotated depth (16-bit PNG, depth x 256, 0 = none); the ``train/`` and
      ``val/`` folders of ``data_depth_annotated.zip`` may be kept as they unpack
and BTS's split lists (``train_test_inputs/eigen_test_files_with_gt.txt``, 697 lines, and
``eigen_train_files_with_gt.txt``): one ``<image> <depth or None> <focal>`` per line, the
paths relative to ``raw/`` (with the date folder or without, as some copies have it) and
``data_depth_annotated/``.

Output (what ``dpt.data.register_kitti`` registers as kitti_eigen_test / kitti_eigen_train):
  kitti/eigen_test.json, kitti/eigen_train.json
      the images that have ground truth (the official evaluation skips the others), with
      their size; written atomically, after every file has been checked

Nothing is converted: the images and depth PNGs are read where they are.

    python datasets/prepare_kitti.py --eigen-test-list eigen_test_files_with_gt.txt \\
        [--eigen-train-list eigen_train_files_with_gt.txt] [--root $DETECTRON2_DATASETS]
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from PIL import Image

from expedit_d2.cli import HelpFormatter
from expedit_d2.fileio import atomic_write
from expedit_d2.progress import progress_bar  # a bar on a terminal only

DEPTH_FOLDERS = ("", "train", "val")  # under data_depth_annotated/: merged, or as unpacked


class LayoutError(ValueError):
    """The KITTI layout or a split list is not what it should be; the message names the files."""


def read_split_list(path: Path) -> list[tuple[str, str | None, float]]:
    """BTS's split list -> [(image path, depth path or None, focal)]."""
    if not path.is_file():
        raise FileNotFoundError(f"KITTI split list not found: {path}")
    entries = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 3:
            raise LayoutError(f"{path}:{n}: expected '<image> <depth or None> <focal>', got {line!r}")
        image, depth, focal = parts
        try:
            focal = float(focal)
        except ValueError:
            raise LayoutError(f"{path}:{n}: focal length {focal!r} is not a number") from None
        entries.append((image, None if depth == "None" else depth, focal))
    if not entries:
        raise LayoutError(f"{path}: no entries")
    return entries


def _find_image(kitti: Path, rel: str) -> Path | None:
    """``raw/<rel>``; BTS's lists name the images with their date folder
    (``2011_09_26/2011_09_26_drive_0002_sync/...``), some copies without it: then the date is
    the drive folder's first 10 characters."""
    path = kitti / "raw" / rel
    if path.is_file():
        return path
    first = rel.split("/", 1)[0]
    dated = kitti / "raw" / first[:10] / rel
    return dated if "_drive_" in first and dated.is_file() else None


def _find_depth(kitti: Path, rel: str) -> Path | None:
    for folder in DEPTH_FOLDERS:
        path = kitti / "data_depth_annotated" / folder / rel
        if path.is_file():
            return path
    return None


def _summary(paths: list[str], what: str) -> str:
    shown = ", ".join(paths[:5])
    return f"{len(paths)} {what} (first: {shown})"


def index_split(kitti: Path, list_file: Path, desc: str) -> tuple[list[dict], int]:
    """The records of one split list (images with ground truth) and how many listed images
    have none; a missing image, a listed depth file that is missing, or a depth map of
    another size than its image is a :class:`LayoutError`."""
    entries = read_split_list(list_file)
    records, missing_images, missing_depth, mismatched, without_gt = [], [], [], [], 0
    for image_id, (image, depth, focal) in enumerate(progress_bar(entries, desc=desc, unit="img")):
        image_path = _find_image(kitti, image)
        if image_path is None:
            missing_images.append(str(kitti / "raw" / image))
            continue
        if depth is None:
            without_gt += 1
            continue
        depth_path = _find_depth(kitti, depth)
        if depth_path is None:
            missing_depth.append(str(kitti / "data_depth_annotated" / depth))
            continue
        with Image.open(image_path) as im, Image.open(depth_path) as dm:  # headers only
            size, depth_size = im.size, dm.size
        if size != depth_size:
            mismatched.append(f"{depth_path} {depth_size[1]}x{depth_size[0]} vs {size[1]}x{size[0]}")
            continue
        records.append({"image_id": image_id, "file_name": str(image_path.relative_to(kitti)),
                        "depth_file_name": str(depth_path.relative_to(kitti)),
                        "height": size[1], "width": size[0], "focal": focal})
    problems = []
    if missing_images:
        problems.append(_summary(missing_images, f"images listed in {list_file} are missing"))
    if missing_depth:
        problems.append(_summary(missing_depth, f"depth maps listed in {list_file} are missing (looked in "
                                                f"data_depth_annotated/{{,train/,val/}})"))
    if mismatched:
        problems.append(_summary(mismatched, "depth maps differ in size from their images"))
    if problems:
        raise LayoutError("KITTI layout under " + str(kitti) + ": " + "; ".join(problems))
    return records, without_gt


def prepare(root: Path, lists: dict[str, Path]) -> dict[str, tuple[int, int]]:
    """Write ``root/kitti/<split>.json`` for each ``{split: list file}``; returns
    ``{split: (images with ground truth, listed images without)}``."""
    kitti = root / "kitti"
    for folder in ("raw", "data_depth_annotated"):
        if not (kitti / folder).is_dir():
            raise LayoutError(f"{kitti / folder} is not a folder: put the KITTI "
                              f"{'raw images' if folder == 'raw' else 'annotated depth'} there (datasets/README.md)")
    indexes, counts = {}, {}
    for split, list_file in lists.items():  # check everything before writing anything
        records, without_gt = index_split(kitti, list_file, f"kitti {split}")
        indexes[split], counts[split] = records, (len(records), without_gt)
    for split, records in indexes.items():
        atomic_write(kitti / f"{split}.json", json.dumps(records))
    return counts


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--eigen-test-list", type=Path, required=True, help="BTS's eigen_test_files_with_gt.txt")
    parser.add_argument("--eigen-train-list", type=Path, help="BTS's eigen_train_files_with_gt.txt (optional)")
    parser.add_argument("--root", type=Path, default=Path(os.environ.get("DETECTRON2_DATASETS", "datasets")))
    args = parser.parse_args(argv)
    lists = {"eigen_test": args.eigen_test_list}
    if args.eigen_train_list is not None:
        lists["eigen_train"] = args.eigen_train_list
    try:
        counts = prepare(args.root, lists)
    except (LayoutError, FileNotFoundError) as e:
        parser.exit(2, f"prepare_kitti.py: error: {e}\n")
    print(f"wrote the KITTI indexes to {args.root / 'kitti'}: " + ", ".join(
        f"{split} {n} images with ground truth ({none} listed without)" for split, (n, none) in counts.items()))


if __name__ == "__main__":
    main()
