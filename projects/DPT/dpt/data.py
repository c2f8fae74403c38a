"""NYUv2 in Detectron2: dataset registration and the depth dataset mapper.

``register_nyuv2(root)`` registers ``nyuv2_train`` and ``nyuv2_test`` from the layout that
``datasets/prepare_nyuv2.py`` writes under ``root/nyuv2`` (root defaults to
``$DETECTRON2_DATASETS``, else ``datasets``). A missing index names the path and the
prepare step.
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

__all__ = ["register_nyuv2", "load_nyuv2", "DepthDatasetMapper", "NYUV2_SPLITS"]

NYUV2_SPLITS = ("train", "test")


def _default_root() -> Path:
    return Path(os.environ.get("DETECTRON2_DATASETS", "datasets"))


def load_nyuv2(root, split: str) -> list[dict]:
    base = Path(root) / "nyuv2"
    index = base / f"{split}.json"
    if not index.is_file():
        raise FileNotFoundError(
            f"NYUv2 {split} index not found: {index}. Run: python datasets/prepare_nyuv2.py "
            f"--labeled nyu_depth_v2_labeled.mat --splits splits.mat --root {Path(root)}")
    records = []
    for r in json.loads(index.read_text()):
        records.append({"image_id": r["image_id"], "file_name": str(base / r["file_name"]),
                        "depth_file_name": str(base / r["depth_file_name"]),
                        "height": 480, "width": 640})
    return records


def _register_split(name: str, root: Path, split: str) -> None:
    DatasetCatalog.register(name, lambda: load_nyuv2(root, split))
    MetadataCatalog.get(name).set(evaluator_type="depth", min_depth=1e-3, max_depth=10.0,
                                  eigen_crop=True)


def register_nyuv2(root=None) -> None:
    """Register nyuv2_train / nyuv2_test (lazily loaded; again only when the root changes)."""
    root = Path(root) if root is not None else _default_root()
    for split in NYUV2_SPLITS:
        name = f"nyuv2_{split}"
        register_from_root(name, root, partial(_register_split, name, root, split))


class DepthDatasetMapper:
    """Dataset dict -> model input: ``image`` (3, H, W) float RGB in 0..255 at the stored
    640 x 480, ``depth`` (H, W) float32 metres; horizontal flips when training."""

    def __init__(self, is_train: bool, image_format: str = "RGB"):
        self.is_train, self.image_format = is_train, image_format

    @classmethod
    def from_config(cls, cfg, is_train: bool):
        return cls(is_train, cfg.INPUT.FORMAT)

    def __call__(self, d: dict) -> dict:
        d = dict(d)
        image = utils.read_image(d["file_name"], format=self.image_format)
        depth = np.load(d["depth_file_name"]).astype(np.float32)
        if depth.shape != image.shape[:2]:
            raise ValueError(f"{d['depth_file_name']}: depth {depth.shape} does not match the "
                             f"image {image.shape[:2]} of {d['file_name']}")
        if self.is_train and np.random.rand() < 0.5:
            image, depth = image[:, ::-1], depth[:, ::-1]
        d["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1))).float()
        d["depth"] = torch.as_tensor(np.ascontiguousarray(depth))
        return d
