"""Monocular depth metrics in the BTS evaluation convention (the one DPT's NYUv2 numbers use).

Per image: the prediction is clipped to [min_depth, max_depth] (non-finite values to the
nearest bound), pixels count where the ground truth lies strictly inside
(min_depth, max_depth) and, with ``eigen_crop``, inside rows 45:471 and columns 41:601 of
the 480 x 640 frame. Metrics are computed per image and averaged over images:

    abs_rel  mean |gt - p| / gt          sq_rel  mean (gt - p)^2 / gt
    rmse     sqrt mean (gt - p)^2        rmse_log sqrt mean (log gt - log p)^2
    log10    mean |log10 gt - log10 p|   silog   100 * sqrt(mean e^2 - (mean e)^2), e = log p - log gt
    d1, d2, d3  fraction with max(gt / p, p / gt) < 1.25, 1.25^2, 1.25^3
"""
from __future__ import annotations

import itertools
import logging
from collections import OrderedDict

import numpy as np
import torch

from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm
from detectron2.utils.logger import create_small_table

__all__ = ["DEPTH_METRICS", "depth_metrics", "eigen_crop_mask", "DepthEvaluator"]

DEPTH_METRICS = ("abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "silog", "d1", "d2", "d3")
EIGEN_CROP = (45, 471, 41, 601)  # rows 45:471, columns 41:601 of a 480 x 640 frame


def eigen_crop_mask(shape) -> np.ndarray:
    if tuple(shape) != (480, 640):
        raise ValueError(f"the Eigen crop is defined on 480x640 frames, got {tuple(shape)}")
    mask = np.zeros(shape, dtype=bool)
    r0, r1, c0, c1 = EIGEN_CROP
    mask[r0:r1, c0:c1] = True
    return mask


def depth_metrics(pred: np.ndarray, gt: np.ndarray, min_depth: float = 1e-3,
                  max_depth: float = 10.0, eigen_crop: bool = True) -> dict | None:
    """Metrics of one image (None if it has no valid pixel)."""
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in shape")
    pred = np.nan_to_num(pred.astype(np.float64), nan=min_depth, posinf=max_depth, neginf=min_depth)
    pred = np.clip(pred, min_depth, max_depth)
    gt = gt.astype(np.float64)
    valid = (gt > min_depth) & (gt < max_depth)
    if eigen_crop:
        valid &= eigen_crop_mask(gt.shape)
    if not valid.any():
        return None
    p, g = pred[valid], gt[valid]
    thresh = np.maximum(g / p, p / g)
    err = np.log(p) - np.log(g)
    return {
        "abs_rel": np.mean(np.abs(g - p) / g),
        "sq_rel": np.mean((g - p) ** 2 / g),
        "rmse": np.sqrt(np.mean((g - p) ** 2)),
        "rmse_log": np.sqrt(np.mean(err**2)),
        "log10": np.mean(np.abs(np.log10(g) - np.log10(p))),
        "silog": np.sqrt(max(np.mean(err**2) - np.mean(err) ** 2, 0.0)) * 100,
        "d1": np.mean(thresh < 1.25),
        "d2": np.mean(thresh < 1.25**2),
        "d3": np.mean(thresh < 1.25**3),
    }


class DepthEvaluator(DatasetEvaluator):
    """Detectron2 evaluator: inputs carry ``depth`` (H, W) ground truth in metres (or a
    ``depth_file_name``: a float32 .npy in metres), outputs ``{"depth": (H, W)}``."""

    def __init__(self, dataset_name: str = "", min_depth: float = 1e-3, max_depth: float = 10.0,
                 eigen_crop: bool = True, distributed: bool = True):
        self.dataset_name = dataset_name
        self.min_depth, self.max_depth, self.eigen_crop = min_depth, max_depth, eigen_crop
        self._distributed = distributed
        self._logger = logging.getLogger(__name__)
        self.reset()

    def reset(self):
        self._per_image = []
        self._skipped = 0

    def process(self, inputs, outputs):
        for inp, out in zip(inputs, outputs):
            gt = inp["depth"] if "depth" in inp else np.load(inp["depth_file_name"])
            gt = gt.cpu().numpy() if isinstance(gt, torch.Tensor) else np.asarray(gt)
            pred = out["depth"].detach().float().cpu().numpy()
            m = depth_metrics(pred, gt, self.min_depth, self.max_depth, self.eigen_crop)
            if m is None:
                self._skipped += 1
            else:
                self._per_image.append([m[k] for k in DEPTH_METRICS])

    def evaluate(self):
        rows, skipped = self._per_image, self._skipped
        if self._distributed:
            comm.synchronize()
            rows = list(itertools.chain(*comm.gather(rows, dst=0)))
            skipped = sum(comm.gather(skipped, dst=0))
            if not comm.is_main_process():
                return {}
        if not rows:
            self._logger.warning(f"DepthEvaluator on {self.dataset_name!r}: no image with valid depth")
            return {}
        mean = np.asarray(rows, dtype=np.float64).mean(0)
        res = OrderedDict((k, float(v)) for k, v in zip(DEPTH_METRICS, mean))
        self._logger.info(f"Depth metrics on {len(rows)} images ({skipped} without valid "
                          f"pixels):\n" + create_small_table(res))
        return OrderedDict(depth=res)
