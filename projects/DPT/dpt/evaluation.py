"""Monocular depth metrics in the BTS evaluation convention, the one DPT's published NYUv2
and KITTI numbers use (BTS's ``eval_with_pngs.py``, run by Expedit-DPT's EVALUATION.md).

Per image:

1. ``prediction_png_scale`` (KITTI: 256): the prediction is first rounded as the official
   pipeline stores it, a 16-bit PNG of ``depth * scale`` (truncated, saturating at 65535)
   read back divided by ``scale``; None (NYUv2 here) keeps it as computed.
2. It is clipped to [min_depth, max_depth] (non-finite values to the nearest bound).
3. ``crop_box`` (KITTI's benchmark crop, ``--do_kb_crop``): the prediction covers only that
   box of the ground-truth frame; it is placed there, after the clipping, as officially.
4. Pixels count where the ground truth lies strictly inside (min_depth, max_depth) and
   inside the evaluation crop (``crop``):

   * ``"nyu_eigen"``: rows 45:471, columns 41:601 of the 480 x 640 NYUv2 frame;
   * ``"kitti_garg"``: rows int(0.40810811 H):int(0.99189189 H), columns
     int(0.03594771 W):int(0.96405229 W) (Garg et al.; what the official KITTI numbers use);
   * ``"kitti_eigen"``: rows int(0.3324324 H):int(0.91351351 H), same columns;
   * None: the whole frame.

Metrics are computed per image and averaged over images:

    abs_rel  mean |gt - p| / gt          sq_rel  mean (gt - p)^2 / gt
    rmse     sqrt mean (gt - p)^2        rmse_log sqrt mean (log gt - log p)^2
    log10    mean |log10 gt - log10 p|   silog   100 * sqrt(mean e^2 - (mean e)^2), e = log p - log gt
    d1, d2, d3  fraction with max(gt / p, p / gt) < 1.25, 1.25^2, 1.25^3

The absolute-depth models (DPT's NYUv2 and KITTI fine-tunes) are evaluated as they predict:
no scale or shift alignment (that is for the affine-invariant MiDaS models only).
"""
from __future__ import annotations

import logging
from collections import OrderedDict

import numpy as np
import torch

from detectron2.evaluation import DatasetEvaluator
from detectron2.utils.logger import create_small_table

from expedit_d2.evaluation.gather import gather_on_main

__all__ = ["DEPTH_METRICS", "EVAL_CROPS", "depth_metrics", "eval_crop_mask", "eigen_crop_mask",
           "png_quantize", "DepthEvaluator"]

DEPTH_METRICS = ("abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "silog", "d1", "d2", "d3")
EIGEN_CROP = (45, 471, 41, 601)  # rows 45:471, columns 41:601 of a 480 x 640 frame
# (top, bottom, left, right) fractions of a KITTI frame, as BTS's eval_with_pngs.py writes them
KITTI_CROPS = {"kitti_garg": (0.40810811, 0.99189189, 0.03594771, 0.96405229),
               "kitti_eigen": (0.3324324, 0.91351351, 0.0359477, 0.96405229)}
EVAL_CROPS = ("nyu_eigen", *KITTI_CROPS, None)


def eigen_crop_mask(shape) -> np.ndarray:
    """NYUv2's Eigen crop of a 480 x 640 frame."""
    if tuple(shape) != (480, 640):
        raise ValueError(f"the NYUv2 Eigen crop is defined on 480x640 frames, got {tuple(shape)}")
    mask = np.zeros(shape, dtype=bool)
    r0, r1, c0, c1 = EIGEN_CROP
    mask[r0:r1, c0:c1] = True
    return mask


def eval_crop_mask(shape, crop) -> np.ndarray:
    """(H, W) bool: the pixels ``crop`` (one of :data:`EVAL_CROPS`) evaluates."""
    if crop not in EVAL_CROPS:
        raise ValueError(f"evaluation crop {crop!r}: expected one of {list(EVAL_CROPS)}")
    if crop == "nyu_eigen":
        return eigen_crop_mask(shape)
    mask = np.zeros(shape, dtype=bool)
    if crop is None:
        mask[:] = True
        return mask
    H, W = shape
    top, bottom, left, right = KITTI_CROPS[crop]
    mask[int(top * H):int(bottom * H), int(left * W):int(right * W)] = True
    return mask


def png_quantize(depth: np.ndarray, scale: float) -> np.ndarray:
    """``depth`` as a 16-bit PNG of ``depth * scale`` stores it, read back: truncated to a
    multiple of 1 / scale, in [0, 65535 / scale] (float32, as the official pipeline)."""
    stored = np.clip(np.nan_to_num(depth.astype(np.float32) * np.float32(scale), nan=0.0), 0, 65535)
    return np.trunc(stored).astype(np.float32) / np.float32(scale)


def depth_metrics(pred: np.ndarray, gt: np.ndarray, min_depth: float = 1e-3, max_depth: float = 10.0,
                  crop="nyu_eigen", crop_box=None, prediction_png_scale=None) -> dict | None:
    """Metrics of one image (None if it has no valid pixel). ``pred`` has ``gt``'s shape, or
    the (height, width) of ``crop_box`` = (top, left, height, width) within ``gt``'s frame."""
    if prediction_png_scale is not None:
        pred = png_quantize(pred, prediction_png_scale)
    pred = np.nan_to_num(pred.astype(np.float64), nan=min_depth, posinf=max_depth, neginf=min_depth)
    pred = np.clip(pred, min_depth, max_depth)
    gt = np.nan_to_num(gt.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)  # as officially: invalid
    covered = None  # the pixels the prediction covers, when it covers a box of the frame
    if crop_box is not None:
        top, left, height, width = (int(v) for v in crop_box)
        if pred.shape != (height, width) or top < 0 or left < 0 or top + height > gt.shape[0] \
                or left + width > gt.shape[1]:
            raise ValueError(f"prediction {pred.shape} does not fit crop_box {list(crop_box)} (top, left, "
                             f"height, width) in the ground truth's {gt.shape} frame")
        placed = np.zeros(gt.shape, dtype=np.float64)
        placed[top:top + height, left:left + width] = pred
        pred = placed
        covered = np.zeros(gt.shape, dtype=bool)
        covered[top:top + height, left:left + width] = True
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in shape")
    valid = (gt > min_depth) & (gt < max_depth) & eval_crop_mask(gt.shape, crop)
    if covered is not None and (valid & ~covered).any():  # officially a 0 prediction there: log(0), an infinite error
        raise ValueError(f"evaluation crop {crop!r} of the {gt.shape} frame has valid ground truth outside "
                         f"the predicted crop_box {list(crop_box)}")
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


def read_depth(path) -> np.ndarray:
    """Ground-truth depth in metres: a float32 ``.npy`` (our NYUv2 layout) or a 16-bit
    ``.png`` of depth x 256 (KITTI's ``data_depth_annotated``; 0 = no measurement)."""
    path = str(path)
    if path.endswith(".npy"):
        return np.load(path)
    if path.endswith(".png"):
        from PIL import Image

        with Image.open(path) as im:
            raw = np.asarray(im)
        if raw.dtype != np.uint16 and not (raw.dtype == np.int32 and raw.max(initial=0) < 65536):
            raise ValueError(f"{path}: expected a 16-bit depth PNG (depth x 256), got {raw.dtype} "
                             f"{im.mode!r} pixels")
        return raw.astype(np.float32) / 256.0
    raise ValueError(f"{path}: unknown depth format (expected .npy metres or .png depth x 256)")


class DepthEvaluator(DatasetEvaluator):
    """Detectron2 evaluator: inputs carry ``depth`` (H, W) ground truth in metres or a
    ``depth_file_name`` (:func:`read_depth`), and optionally ``crop_box`` (the box of the
    ground-truth frame the prediction covers); outputs ``{"depth": (h, w)}``."""

    def __init__(self, dataset_name: str = "", min_depth: float = 1e-3, max_depth: float = 10.0,
                 crop="nyu_eigen", distributed: bool = True, prediction_png_scale=None):
        if crop not in EVAL_CROPS:
            raise ValueError(f"evaluation crop {crop!r}: expected one of {list(EVAL_CROPS)}")
        self.dataset_name = dataset_name
        self.min_depth, self.max_depth, self.crop = min_depth, max_depth, crop
        self.prediction_png_scale = prediction_png_scale
        self._distributed = distributed
        self._logger = logging.getLogger(__name__)
        self.reset()

    @classmethod
    def from_metadata(cls, dataset_name: str, metadata, distributed: bool = True):
        """The protocol a registered dataset's metadata names (``min_depth``, ``max_depth``,
        ``eval_crop``, ``prediction_png_scale``; NYUv2's when absent)."""
        return cls(dataset_name, metadata.get("min_depth", 1e-3), metadata.get("max_depth", 10.0),
                   metadata.get("eval_crop", "nyu_eigen"), distributed,
                   metadata.get("prediction_png_scale", None))

    def reset(self):
        self._per_image = []  # per image: its metrics, or None without valid pixels

    def process(self, inputs, outputs):
        for inp, out in zip(inputs, outputs):
            gt = inp["depth"] if "depth" in inp else read_depth(inp["depth_file_name"])
            gt = gt.cpu().numpy() if isinstance(gt, torch.Tensor) else np.asarray(gt)
            pred = out["depth"].detach().float().cpu().numpy()
            m = depth_metrics(pred, gt, self.min_depth, self.max_depth, self.crop, inp.get("crop_box"),
                              self.prediction_png_scale)
            self._per_image.append(None if m is None else [m[k] for k in DEPTH_METRICS])

    def evaluate(self):
        gathered = gather_on_main(self._per_image, self._distributed)
        if gathered is None:
            return {}
        rows = [r for r in gathered if r is not None]
        skipped = len(gathered) - len(rows)
        if not rows:
            self._logger.warning(f"DepthEvaluator on {self.dataset_name!r}: no image with valid depth")
            return {}
        mean = np.asarray(rows, dtype=np.float64).mean(0)
        res = OrderedDict((k, float(v)) for k, v in zip(DEPTH_METRICS, mean))
        self._logger.info(f"Depth metrics on {len(rows)} images ({skipped} without valid "
                          f"pixels):\n" + create_small_table(res))
        return OrderedDict(depth=res)
