"""YouTube-VIS video instance segmentation AP, our own implementation of the arithmetic of the
YouTube-VIS API (``YTVOS`` / ``YTVOSeval`` of youtubevos/cocoapi, the copy Mask2Former's video
evaluator runs), so the published numbers are reproduced without vendoring that API:

* a *track* is one object over a whole video: one segmentation per frame (RLE, uncompressed RLE
  or polygons), ``None`` (or any empty value) in the frames where it is absent;
* the spatio-temporal IoU of a predicted and a ground-truth track is the sum over frames of the
  intersection over the sum over frames of the union: a frame where one track is absent adds the
  other's area to the union, a frame where both are absent adds nothing; a union of 0 gives IoU 0.
  Crowd tracks use this same IoU (not COCO's intersection over the prediction's area);
* a track's area, which decides small / medium / large, is the mean of its per-frame areas over
  the frames whose area is non-zero (``None`` and 0 are left out; 0 when none is left); the ground
  truth's comes from the annotation's ``areas`` field, a prediction's from its masks. The ranges are
  YouTube-VIS's, not COCO's: small up to 128^2, medium 128^2 to 256^2, large from 256^2 (bounds
  inclusive on both sides, as in COCO);
* otherwise COCO's instance AP: per (video, category) the predictions sorted by score (stable,
  so ties keep the order of the results list), at most 100 kept; ground truth that is crowd or out
  of the area range is ignored and sorted last (stable); greedy matching at the IoU thresholds
  0.50:0.05:0.95 (IoU >= threshold; a crowd track may absorb several predictions); a prediction
  matched to an ignored track, or unmatched with an area out of range, is ignored; precision
  interpolated at 101 recall points after a stable sort of all videos' predictions (videos in id
  order), ``tp / (tp + fp + eps)`` with numpy's eps; -1 (undefined) where a category has no
  non-ignored ground truth, and the summaries average what is not -1;
* reported in percent, with undefined metrics as NaN, as Mask2Former's ``YTVISEvaluator`` does.

:func:`ytvis_evaluate` scores a results list (the YouTube-VIS submission format) against a ground
truth dict; :class:`YTVISEvaluator` is the Detectron2 evaluator of Mask2Former-style video outputs.
"""
from __future__ import annotations

import itertools
import json
import logging
import math
import os
from collections import OrderedDict, defaultdict
from dataclasses import dataclass

import numpy as np
from pycocotools import mask as mask_util

from detectron2.data import MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils.logger import create_small_table

from ..fileio import atomic_write
from .gather import gather_on_main

__all__ = ["IOU_THRESHOLDS", "RECALL_THRESHOLDS", "MAX_DETS", "AREA_RANGES", "METRICS", "to_rle",
           "mean_area", "spatiotemporal_iou", "YTVISGroundTruth", "prepare_predictions",
           "match_detections", "accumulate", "summarize", "ytvis_evaluate", "masks_to_results",
           "YTVISEvaluator"]

logger = logging.getLogger(__name__)

# np.linspace as the API builds them: 0.90 is 0.8999999999999999 there, so IoU 0.9 reaches it
IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
RECALL_THRESHOLDS = np.linspace(0.0, 1.0, 101)
MAX_DETS = (1, 10, 100)
AREA_RANGES = OrderedDict(all=(0.0, 1e5 ** 2), small=(0.0, 128.0 ** 2), medium=(128.0 ** 2, 256.0 ** 2),
                          large=(256.0 ** 2, 1e5 ** 2))
# what Mask2Former's YTVISEvaluator reports, in this order (the API's stats 0..7)
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10")


# --------------------------------------------------------------------------------------
# per-frame geometry
# --------------------------------------------------------------------------------------
def to_rle(segm, height: int, width: int, where: str = "segmentation"):
    """One frame's segmentation as a compressed RLE dict, or None where the object is absent.

    Absent is any empty value (None, [], {}), as the API's truth tests have it. Polygons (a list of
    [x0, y0, x1, y1, ...]) are merged into one mask; uncompressed RLE (``counts`` a list) is
    compressed; compressed RLE (``counts`` str or bytes) is kept. The mask must be ``height`` x
    ``width``: pycocotools silently treats masks of different sizes as empty, so we refuse them.
    ``where`` names the value in errors."""
    if not segm:
        return None
    if isinstance(segm, list):
        if not all(isinstance(p, (list, tuple)) for p in segm):
            raise ValueError(f"{where}: a polygon segmentation is a list of [x0, y0, x1, y1, ...] lists, "
                             f"got {str(segm)[:80]}")
        return mask_util.merge(mask_util.frPyObjects([list(p) for p in segm], height, width))
    if not isinstance(segm, dict) or "counts" not in segm or "size" not in segm:
        raise ValueError(f"{where}: expected an RLE dict with 'size' and 'counts', a polygon list or None, "
                         f"got {str(segm)[:80]}")
    if list(segm["size"]) != [height, width]:
        raise ValueError(f"{where}: mask size {list(segm['size'])} differs from the video's "
                         f"[height, width] {[height, width]}")
    if isinstance(segm["counts"], list):
        return mask_util.frPyObjects(segm, height, width)
    return segm


def _area(rle) -> int:
    return 0 if rle is None else int(mask_util.area(rle))


def mean_area(areas) -> float:
    """A track's area for the area ranges: the mean of the per-frame areas that are neither None
    nor 0 (the API keeps the truthy ones), 0.0 when there is none."""
    kept = [a for a in areas if a]
    return float(np.mean(kept)) if kept else 0.0


def spatiotemporal_iou(dt_rles: list, gt_rles: list) -> float:
    """IoU of two tracks (per-frame RLE dicts or None, same number of frames): summed
    intersections over summed unions. A frame where only one track is present adds its area to
    the union; where both are absent it adds nothing; an empty union gives 0.0."""
    if len(dt_rles) != len(gt_rles):
        raise ValueError(f"tracks of {len(dt_rles)} and {len(gt_rles)} frames cannot be compared")
    inter = union = 0
    for d, g in zip(dt_rles, gt_rles):
        both = _area(mask_util.merge([d, g], intersect=True)) if d is not None and g is not None else 0
        inter += both
        union += _area(d) + _area(g) - both
    return inter / union if union > 0 else 0.0


# --------------------------------------------------------------------------------------
# ground truth and predictions
# --------------------------------------------------------------------------------------
@dataclass
class Track:
    """One object over a video: per-frame RLEs (None where absent), its area for the ranges,
    whether it is a crowd region (ground truth) and its score (predictions)."""
    rles: list
    area: float
    crowd: bool = False
    score: float = 0.0


def _video_size(video: dict) -> tuple[int, int, int]:
    """(length, height, width) of a ground-truth ``videos`` entry."""
    try:
        length = video["length"] if "length" in video else len(video["file_names"])
        return int(length), int(video["height"]), int(video["width"])
    except KeyError as e:
        raise ValueError(f"video {video.get('id')!r} lacks {e.args[0]!r} (needs length or file_names, "
                         "height, width)") from None


def _frames(segmentations, length: int, height: int, width: int, where: str) -> list:
    """Per-frame RLEs of a track, checking it has one segmentation per frame of its video."""
    if not isinstance(segmentations, (list, tuple)):
        raise ValueError(f"{where}: 'segmentations' must be a list (one entry per frame), "
                         f"got {type(segmentations).__name__}")
    if len(segmentations) != length:
        raise ValueError(f"{where}: {len(segmentations)} segmentations for a video of length {length}")
    return [to_rle(s, height, width, f"{where}, frame {t}") for t, s in enumerate(segmentations)]


class YTVISGroundTruth:
    """A YouTube-VIS ground truth dict (``videos``, ``categories``, ``annotations``), converted
    once: ``sizes`` {video id: (length, height, width)}, ``video_ids`` and ``category_ids``
    sorted (the API's evaluation order), ``names`` {category id: name}, ``tracks`` {(video id,
    category id): [Track, ...]} in annotation order."""

    def __init__(self, gt: dict):
        if not isinstance(gt, dict) or "videos" not in gt or "categories" not in gt:
            got = f"keys {sorted(gt)}" if isinstance(gt, dict) else type(gt).__name__
            raise ValueError(f"the ground truth must be a dict with 'videos', 'categories' (and 'annotations'); "
                             f"got {got}")
        self.sizes = {v["id"]: _video_size(v) for v in gt["videos"]}
        self.video_ids = sorted(self.sizes)
        self.names = {c["id"]: c.get("name", str(c["id"])) for c in gt["categories"]}
        self.category_ids = sorted(self.names)
        self.has_annotations = bool(gt.get("annotations"))
        self.tracks = defaultdict(list)
        dropped = set()
        for i, ann in enumerate(gt.get("annotations") or []):
            where = f"annotation {ann.get('id', f'#{i}')} (video_id {ann.get('video_id')!r})"
            if ann.get("video_id") not in self.sizes:
                raise ValueError(f"{where}: unknown video_id {ann.get('video_id')!r}")
            if ann.get("category_id") not in self.names:
                dropped.add(ann.get("category_id"))  # the API evaluates the listed categories only
                continue
            if "areas" not in ann or "segmentations" not in ann:
                raise ValueError(f"{where}: needs 'segmentations' and 'areas' (one per frame)")
            rles = _frames(ann["segmentations"], *self.sizes[ann["video_id"]], where)
            self.tracks[ann["video_id"], ann["category_id"]].append(
                Track(rles, mean_area(ann["areas"]), crowd=bool(ann.get("iscrowd", 0))))
        if dropped:
            logger.warning(f"ground-truth annotations of categories {sorted(dropped, key=str)} that are not "
                           "in 'categories' are not evaluated")


def prepare_predictions(predictions: list, gt: YTVISGroundTruth) -> dict:
    """Results entries (``video_id``, ``category_id``, ``score``, ``segmentations``) as
    {(video id, category id): [Track, ...]}, each list sorted by score, highest first (stable:
    ties keep the order of ``predictions``) and cut to the largest of :data:`MAX_DETS`.

    An unknown video, a segmentation count other than the video's length, a mask of another size or
    a score that is not a finite number raise ValueError; categories the ground truth does not list
    are skipped (the API evaluates the listed ones), with a warning."""
    out, skipped = defaultdict(list), set()
    for i, p in enumerate(predictions):
        if not isinstance(p, dict):
            raise ValueError(f"prediction #{i}: expected a results dict, got {type(p).__name__}")
        where = f"prediction #{i} (video_id {p.get('video_id')!r})"
        missing = [k for k in ("video_id", "category_id", "score", "segmentations") if k not in p]
        if missing:
            raise ValueError(f"{where}: missing {missing}")
        if p["video_id"] not in gt.sizes:
            raise ValueError(f"{where}: unknown video_id {p['video_id']!r}, not in the ground truth's videos")
        score = p["score"]
        if isinstance(score, bool) or not isinstance(score, (int, float, np.number)) or not math.isfinite(score):
            raise ValueError(f"{where}: score must be a finite number, got {score!r}")
        rles = _frames(p["segmentations"], *gt.sizes[p["video_id"]], where)
        if p["category_id"] not in gt.names:
            skipped.add(p["category_id"])
            continue
        out[p["video_id"], p["category_id"]].append(
            Track(rles, mean_area([_area(r) for r in rles]), score=float(score)))
    if skipped:
        logger.warning(f"predictions of categories {sorted(skipped, key=str)} that the ground truth does not "
                       "list are not evaluated")
    for key, tracks in out.items():
        order = np.argsort([-t.score for t in tracks], kind="mergesort")
        out[key] = [tracks[i] for i in order[:MAX_DETS[-1]]]
    return out


# --------------------------------------------------------------------------------------
# matching, accumulation, summaries
# --------------------------------------------------------------------------------------
def match_detections(ious: np.ndarray, gt_ignore: np.ndarray, gt_crowd: np.ndarray,
                     thresholds: np.ndarray = IOU_THRESHOLDS) -> tuple[np.ndarray, np.ndarray]:
    """Greedy matching of one (video, category) at every IoU threshold.

    ``ious`` (D, G): predictions sorted by score, ground truth with the ignored ones last. Each
    prediction in turn takes the free ground truth of highest IoU >= threshold (ties: the first),
    preferring non-ignored ground truth: once it holds one, it stops at the first ignored track.
    Crowd tracks stay free after a match. Returns (matched, matched_to_ignored), each (T, D) bool."""
    n_dt, n_gt = ious.shape
    matched = np.zeros((len(thresholds), n_dt), dtype=bool)
    on_ignored = np.zeros_like(matched)
    for t, thr in enumerate(thresholds):
        taken = np.zeros(n_gt, dtype=bool)
        for d in range(n_dt):
            best, best_iou = -1, min(thr, 1 - 1e-10)
            for g in range(n_gt):
                if taken[g] and not gt_crowd[g]:
                    continue
                if best > -1 and not gt_ignore[best] and gt_ignore[g]:
                    break
                if ious[d, g] < best_iou:
                    continue
                best, best_iou = g, ious[d, g]
            if best > -1:
                matched[t, d], on_ignored[t, d] = True, gt_ignore[best]
                taken[best] = True
    return matched, on_ignored


@dataclass
class _VideoMatch:
    """What one (video, category, area range) contributes: scores (D,), matched and ignored
    (T, D) of its predictions in score order, and its number of non-ignored ground truths."""
    scores: np.ndarray
    matched: np.ndarray
    ignored: np.ndarray
    n_gt: int


def _match_video(gts: list, dts: list, ious: np.ndarray, area_range: tuple) -> _VideoMatch:
    lo, hi = area_range
    ignore = np.array([g.crowd or not lo <= g.area <= hi for g in gts], dtype=bool)
    order = np.argsort(ignore, kind="mergesort")  # ignored last, stable
    matched, on_ignored = match_detections(ious[:, order], ignore[order],
                                           np.array([g.crowd for g in gts], dtype=bool)[order])
    outside = np.array([not lo <= d.area <= hi for d in dts], dtype=bool)
    ignored = on_ignored | (~matched & outside[None, :])
    return _VideoMatch(np.array([d.score for d in dts], dtype=np.float64), matched, ignored,
                       int(np.count_nonzero(~ignore)))


def _precision_recall(matches: list, max_det: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Interpolated precision (T, R) at :data:`RECALL_THRESHOLDS` and final recall (T,) of the
    videos' first ``max_det`` predictions pooled; None when there is no non-ignored ground truth."""
    n_gt = sum(m.n_gt for m in matches)
    if n_gt == 0:
        return None
    scores = np.concatenate([m.scores[:max_det] for m in matches])
    order = np.argsort(-scores, kind="mergesort")
    matched = np.concatenate([m.matched[:, :max_det] for m in matches], axis=1)[:, order]
    ignored = np.concatenate([m.ignored[:, :max_det] for m in matches], axis=1)[:, order]
    tp = np.cumsum(matched & ~ignored, axis=1).astype(np.float64)
    fp = np.cumsum(~matched & ~ignored, axis=1).astype(np.float64)
    n_dt = tp.shape[1]
    precision = np.zeros((len(tp), len(RECALL_THRESHOLDS)))
    recall = np.zeros(len(tp))
    if n_dt == 0:
        return precision, recall
    for t in range(len(tp)):
        rc = tp[t] / n_gt
        pr = tp[t] / (fp[t] + tp[t] + np.spacing(1))
        pr = np.maximum.accumulate(pr[::-1])[::-1]  # precision envelope: best at this recall or more
        at = np.searchsorted(rc, RECALL_THRESHOLDS, side="left")
        reached = at < n_dt
        precision[t, reached] = pr[at[reached]]
        recall[t] = rc[-1]
    return precision, recall


def _iou_matrix(dts: list, gts: list) -> np.ndarray:
    """(D, G) spatio-temporal IoUs of predicted and ground-truth tracks."""
    ious = np.zeros((len(dts), len(gts)))
    for (i, d), (j, g) in itertools.product(enumerate(dts), enumerate(gts)):
        ious[i, j] = spatiotemporal_iou(d.rles, g.rles)
    return ious


def accumulate(gt: YTVISGroundTruth, dts: dict) -> tuple[np.ndarray, np.ndarray]:
    """The API's ``precision`` (T, R, K, A, M) and ``recall`` (T, K, A, M) arrays: IoU thresholds,
    recall points, categories (``gt.category_ids``), :data:`AREA_RANGES`, :data:`MAX_DETS`; -1 where
    a category has no non-ignored ground truth. ``dts`` from :func:`prepare_predictions`."""
    shape = (len(IOU_THRESHOLDS), len(gt.category_ids), len(AREA_RANGES), len(MAX_DETS))
    precision = -np.ones(shape[:1] + (len(RECALL_THRESHOLDS),) + shape[1:])
    recall = -np.ones(shape)
    for k, cat in enumerate(gt.category_ids):
        pairs = [(gt.tracks.get((v, cat), []), dts.get((v, cat), [])) for v in gt.video_ids]
        pairs = [(g, d) for g, d in pairs if g or d]
        ious = [_iou_matrix(ds, gs) for gs, ds in pairs]
        for a, area_range in enumerate(AREA_RANGES.values()):
            matches = [_match_video(gs, ds, iou, area_range) for (gs, ds), iou in zip(pairs, ious)]
            for m, max_det in enumerate(MAX_DETS):
                result = _precision_recall(matches, max_det)
                if result is not None:
                    precision[:, :, k, a, m], recall[:, k, a, m] = result
    return precision, recall


def summarize(precision: np.ndarray, recall: np.ndarray) -> OrderedDict:
    """The API's 12 summary numbers as fractions (-1 where nothing is defined): AP, AP50, AP75,
    APs, APm, APl at 100 predictions per video, AR1, AR10, AR100, ARs, ARm, ARl; each the mean of
    the entries that are not -1."""
    area = {name: i for i, name in enumerate(AREA_RANGES)}

    def mean(values: np.ndarray) -> float:
        kept = values[values > -1]
        return float(np.mean(kept)) if kept.size else -1.0

    def ap(area_name="all", iou=None, max_det=100):
        s = precision[:, :, :, area[area_name], MAX_DETS.index(max_det)]
        return mean(s if iou is None else s[np.where(IOU_THRESHOLDS == iou)[0]])

    def ar(area_name="all", max_det=100):
        return mean(recall[:, :, area[area_name], MAX_DETS.index(max_det)])

    return OrderedDict(AP=ap(), AP50=ap(iou=0.5), AP75=ap(iou=0.75), APs=ap("small"), APm=ap("medium"),
                       APl=ap("large"), AR1=ar(max_det=1), AR10=ar(max_det=10), AR100=ar(),
                       ARs=ar("small"), ARm=ar("medium"), ARl=ar("large"))


def _percent(value: float) -> float:
    return value * 100 if value >= 0 else float("nan")


def ytvis_evaluate(gt: dict | YTVISGroundTruth, predictions: list) -> OrderedDict:
    """AP, AP50, AP75, APs, APm, APl, AR1, AR10 (:data:`METRICS`) of YouTube-VIS results against a
    ground truth, in percent, NaN where undefined (no category has non-ignored ground truth in that
    setting), as Mask2Former's evaluator reports them."""
    gt = gt if isinstance(gt, YTVISGroundTruth) else YTVISGroundTruth(gt)
    stats = summarize(*accumulate(gt, prepare_predictions(predictions, gt)))
    return OrderedDict((name, _percent(stats[name])) for name in METRICS)


# --------------------------------------------------------------------------------------
# Detectron2 evaluator
# --------------------------------------------------------------------------------------
def _as_numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def masks_to_results(video_id, size: tuple[int, int, int], scores, labels, masks,
                     label_to_category: dict | None = None) -> list[dict]:
    """A video's predictions as results entries: one per instance, its ``(T, H, W)`` mask as T
    compressed RLEs with str counts (empty frames too, as Mask2Former writes them). ``size``:
    the video's (length, height, width); ``label_to_category`` maps contiguous labels back to
    dataset category ids (None: labels are the ids)."""
    if not len(scores) == len(labels) == len(masks):
        raise ValueError(f"video {video_id}: {len(scores)} scores, {len(labels)} labels and "
                         f"{len(masks)} masks; one of each per instance")
    results = []
    for i, (score, label, mask) in enumerate(zip(scores, labels, masks)):
        mask = _as_numpy(mask)
        if mask.shape != tuple(size):
            raise ValueError(f"video {video_id}, instance {i}: mask shape {tuple(mask.shape)} differs from "
                             f"the video's (length, height, width) {tuple(size)}")
        label = int(label)
        if label_to_category is not None:
            if label not in label_to_category:
                raise ValueError(f"video {video_id}, instance {i}: label {label} is not a contiguous id of "
                                 f"this dataset (0..{len(label_to_category) - 1})")
            label = label_to_category[label]
        rles = mask_util.encode(np.asfortranarray(mask.transpose(1, 2, 0).astype(np.uint8)))
        for rle in rles:
            rle["counts"] = rle["counts"].decode("ascii")
        results.append({"video_id": video_id, "score": float(score), "category_id": label,
                        "segmentations": rles})
    return results


class YTVISEvaluator(DatasetEvaluator):
    """Detectron2 evaluator of video instance segmentation on a YouTube-VIS dataset registered with
    metadata ``json_file`` (and ``thing_dataset_id_to_contiguous_id`` when the model predicts
    contiguous labels).

    ``process`` takes video inputs (``video_id``, ``length``, ...) and outputs with ``pred_scores``,
    ``pred_labels`` and ``pred_masks`` ((T, H, W) bool per instance); Mask2Former's video model
    returns one such dict for its one video instead of a list, which is accepted too. ``evaluate``
    gathers the results on rank 0, writes ``results.json`` (the submission format) into
    ``output_dir`` and returns ``{"segm": {AP, AP50, AP75, APs, APm, APl, AR1, AR10, AP-<category>}}``
    in percent; ``{}`` on other ranks, when there is no prediction, or when the ground truth has no
    annotations (YouTube-VIS's valid sets: submit the file instead)."""

    def __init__(self, dataset_name: str, output_dir: str | None = None, distributed: bool = True):
        self._meta = MetadataCatalog.get(dataset_name)
        self._output_dir, self._distributed = output_dir, distributed
        self._logger = logging.getLogger(__name__)
        json_file = self._meta.json_file
        if not os.path.isfile(json_file):
            raise FileNotFoundError(f"YouTube-VIS ground truth JSON not found: {json_file}")
        with open(json_file) as f:
            self._gt = YTVISGroundTruth(json.load(f))
        ids = self._meta.get("thing_dataset_id_to_contiguous_id")
        self._label_to_category = None if ids is None else {v: k for k, v in ids.items()}
        self.reset()

    def reset(self):
        self._predictions = []  # results entries, in the order processed

    def process(self, inputs, outputs):
        if isinstance(outputs, dict):
            outputs = [outputs]
        if len(inputs) != len(outputs):
            raise ValueError(f"{len(inputs)} inputs but {len(outputs)} outputs")
        for inp, out in zip(inputs, outputs):
            video_id = inp["video_id"]
            if video_id not in self._gt.sizes:
                raise ValueError(f"unknown video_id {video_id!r}, not in {self._meta.json_file}")
            size = self._gt.sizes[video_id]
            if "length" in inp and int(inp["length"]) != size[0]:
                raise ValueError(f"video_id {video_id!r}: input length {inp['length']} but length {size[0]} "
                                 f"in {self._meta.json_file}")
            self._predictions += masks_to_results(video_id, size, out["pred_scores"], out["pred_labels"],
                                                  out["pred_masks"], self._label_to_category)

    def evaluate(self):
        predictions = gather_on_main(self._predictions, self._distributed)
        if predictions is None:
            return {}
        if self._output_dir:
            os.makedirs(self._output_dir, exist_ok=True)
            path = os.path.join(self._output_dir, "results.json")
            atomic_write(path, json.dumps(predictions))
            self._logger.info(f"Wrote {len(predictions)} YouTube-VIS results to {path}")
        if not predictions:
            self._logger.warning("YTVISEvaluator received no predictions; nothing to evaluate")
            return {}
        if not self._gt.has_annotations:
            self._logger.info("The ground truth has no annotations (submit results.json to the server); "
                              "no metrics computed")
            return {}
        precision, recall = accumulate(self._gt, prepare_predictions(predictions, self._gt))
        stats = summarize(precision, recall)
        metrics = OrderedDict((name, _percent(stats[name])) for name in METRICS)
        self._logger.info("YouTube-VIS segm results:\n" + create_small_table(metrics))
        if len(self._gt.category_ids) > 1:
            for k, cat in enumerate(self._gt.category_ids):
                p = precision[:, :, k, 0, -1]
                p = p[p > -1]
                metrics[f"AP-{self._gt.names[cat]}"] = float(np.mean(p)) * 100 if p.size else float("nan")
        return OrderedDict(segm=metrics)
