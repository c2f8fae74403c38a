"""Depth datasets in Detectron2: NYUv2 and KITTI (Eigen split) registration and the depth
dataset mapper.

``register_nyuv2(root)`` registers ``nyuv2_train`` and ``nyuv2_test`` from the layout that
``datasets/prepare_nyuv2.py`` writes under ``root/nyuv2``; ``register_kitti(root)``
registers ``kitti_eigen_test`` (and ``kitti_eigen_train``) from the indexes that
``datasets/prepare_kitti.py`` writes under ``root/kitti`` beside the KITTI raw images and
``data_depth_annotated`` (root defaults to ``$DETECTRON2_DATASETS``, else ``datasets``). A
missing index names the path and the prepare step.
"""
from __future__ import annotations

import json
import os
from functools import partial
from pathlib import Path

import numpy as np
import torch

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import detection_utils as utils

from expedit_d2.datasets import register_from_root

from .evaluation import read_depth

__all__ = ["register_nyuv2", "load_nyuv2", "register_kitti", "load_kitti", "kb_crop_box", "DepthDatasetMapper",
           "NYUV2_SPLITS", "KITTI_SPLITS", "KB_CROP"]

NYUV2_SPLITS = ("train", "test")
KITTI_SPLITS = ("eigen_train", "eigen_test")
KB_CROP = (352, 1216)  # (height, width) of the KITTI benchmark crop the DPT KITTI model sees


def _default_root() -> Path:
    return Path(os.environ.get("DETECTRON2_DATASETS", "datasets"))


def _depth_records(base: Path, split: str, dataset: str, prepare: str, **per_record) -> list[dict]:
    """``base/<split>.json`` (written by a prepare script) as Detectron2 records: paths made
    absolute under ``base``, plus ``per_record[key](entry)`` for each extra key; a missing
    index names the path and the ``prepare`` command."""
    index = base / f"{split}.json"
    if not index.is_file():
        raise FileNotFoundError(f"{dataset} {split} index not found: {index}. Run: {prepare}")
    return [{"image_id": r["image_id"], "file_name": str(base / r["file_name"]),
             "depth_file_name": str(base / r["depth_file_name"]),
             **{k: f(r) for k, f in per_record.items()}} for r in json.loads(index.read_text())]


def load_nyuv2(root, split: str) -> list[dict]:
    return _depth_records(Path(root) / "nyuv2", split, "NYUv2",
                          "python datasets/prepare_nyuv2.py --labeled nyu_depth_v2_labeled.mat --splits splits.mat "
                          f"--root {Path(root)}", height=lambda r: 480, width=lambda r: 640)


def _register_split(name: str, root: Path, split: str) -> None:
    DatasetCatalog.register(name, lambda: load_nyuv2(root, split))
    MetadataCatalog.get(name).set(evaluator_type="depth", min_depth=1e-3, max_depth=10.0,
                                  eval_crop="nyu_eigen")


def register_nyuv2(root=None) -> None:
    """Register nyuv2_train / nyuv2_test (lazily loaded; again only when the root changes)."""
    root = Path(root) if root is not None else _default_root()
    for split in NYUV2_SPLITS:
        name = f"nyuv2_{split}"
        register_from_root(name, root, partial(_register_split, name, root, split))


def kb_crop_box(height: int, width: int) -> list[int]:
    """(top, left, height, width) of the KITTI benchmark crop of a frame: the bottom 352 rows,
    the middle 1216 columns (left margin rounded down), as DPT's ``--kitti_crop`` and BTS's
    ``--do_kb_crop`` cut it."""
    h, w = KB_CROP
    if height < h or width < w:
        raise ValueError(f"a KITTI frame of {height}x{width} is smaller than the benchmark crop {h}x{w}")
    return [height - h, (width - w) // 2, h, w]


def load_kitti(root, split: str) -> list[dict]:
    """The records of ``root/kitti/<split>.json``; each has ``crop_box``: the mapper crops the
    image to it, and the evaluator places the prediction there in the ground-truth frame."""
    return _depth_records(Path(root) / "kitti", split, "KITTI",
                          f"python datasets/prepare_kitti.py --root {Path(root)} --{split.replace('_', '-')}-list "
                          f"{split}_files_with_gt.txt (BTS's split list)",
                          height=lambda r: r["height"], width=lambda r: r["width"],
                          crop_box=lambda r: kb_crop_box(r["height"], r["width"]))


def _register_kitti_split(name: str, root: Path, split: str) -> None:
    DatasetCatalog.register(name, lambda: load_kitti(root, split))
    # the official KITTI evaluation: Garg crop, depth in (1e-3, 80) m, predictions stored as
    # 16-bit PNGs of depth x 256 (Expedit-DPT EVALUATION.md: eval_with_pngs.py --garg_crop
    # --do_kb_crop --min_depth_eval 1e-3 --max_depth_eval 80)
    MetadataCatalog.get(name).set(evaluator_type="depth", min_depth=1e-3, max_depth=80.0,
                                  eval_crop="kitti_garg", prediction_png_scale=256)


def register_kitti(root=None) -> None:
    """Register kitti_eigen_train / kitti_eigen_test (lazily loaded; again only when the
    root changes)."""
    root = Path(root) if root is not None else _default_root()
    for split in KITTI_SPLITS:
        name = f"kitti_{split}"
        register_from_root(name, root, partial(_register_kitti_split, name, root, split))


class DepthDatasetMapper:
    """Dataset dict -> model input: ``image`` (3, H, W) float RGB in 0..255 at the stored
    size, cut to the record's ``crop_box`` (KITTI) if it has one, ``depth`` (H, W) float32
    metres of the same pixels when training (evaluation reads the whole ground-truth frame:
    see ``DepthEvaluator``); horizontal flips when training."""

    def __init__(self, is_train: bool, image_format: str = "RGB"):
        self.is_train, self.image_format = is_train, image_format

    @classmethod
    def from_config(cls, cfg, is_train: bool):
        return cls(is_train, cfg.INPUT.FORMAT)

    def __call__(self, d: dict) -> dict:
        d = dict(d)
        image = utils.read_image(d["file_name"], format=self.image_format)
        if (d.get("height"), d.get("width")) not in ((None, None), image.shape[:2]):
            raise ValueError(f"{d['file_name']}: image {image.shape[:2]} but the record says "
                             f"{d['height']}x{d['width']}")
        box = d.get("crop_box")
        if box is not None:
            top, left, h, w = box
            image = image[top:top + h, left:left + w]
            d["height"], d["width"] = h, w  # the prediction covers the box
        if self.is_train:
            depth = read_depth(d["depth_file_name"]).astype(np.float32)
            if box is not None:
                depth = depth[top:top + h, left:left + w]
            if depth.shape != image.shape[:2]:
                raise ValueError(f"{d['depth_file_name']}: depth {depth.shape} does not match the "
                                 f"image {image.shape[:2]} of {d['file_name']}")
            if np.random.rand() < 0.5:
                image, depth = image[:, ::-1], depth[:, ::-1]
            d["depth"] = torch.as_tensor(np.ascontiguousarray(depth))
        d["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1))).float()
        return d
