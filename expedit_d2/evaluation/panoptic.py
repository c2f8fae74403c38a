"""Panoptic quality (PQ, SQ, RQ; Kirillov et al. 2019) in the COCO panoptic format.

Our own implementation of the standard definition and the COCO conventions (the ones
the published numbers use), since panopticapi is not on the package index:

* segment ids come from PNGs as ``id = R + 256 G + 256^2 B``; id 0 is VOID;
* a predicted and a ground-truth segment of the same category match when their IoU is
  > 0.5, where the union leaves out the part of the prediction that lies on VOID;
* crowd ground-truth segments (``iscrowd: 1``) are never matched and never false
  negatives; a prediction that is not matched is no false positive when more than half
  of it lies on VOID or on a crowd region of its category;
* per category PQ = sum IoU(TP) / (TP + FP/2 + FN/2), SQ = sum IoU(TP) / TP,
  RQ = TP / (TP + FP/2 + FN/2); "All", "Things", "Stuff" average the categories that
  have at least one TP, FP or FN.

:class:`PanopticQualityEvaluator` keeps these counts per image in ``process`` (no
prediction files are kept), gathers them across processes in ``evaluate`` and sums them in
image order, so N processes (each a contiguous share of the images, Detectron2's
``InferenceSampler``) add the IoUs in the order one process does: the same PQ to the bit.
"""
from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict, defaultdict

import numpy as np
from PIL import Image
from tabulate import tabulate

from detectron2.data import MetadataCatalog
from detectron2.evaluation import DatasetEvaluator

from .gather import gather_on_main

__all__ = ["rgb2id", "id2rgb", "mask_bbox", "PQStat", "pq_single_image", "pq_compute", "PanopticQualityEvaluator"]

VOID = 0
_OFFSET = 256 * 256 * 256


def mask_bbox(mask: np.ndarray) -> list[int]:
    """COCO box [x, y, width, height] (ints) of a non-empty HxW boolean mask."""
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]


def rgb2id(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def id2rgb(ids: np.ndarray) -> np.ndarray:
    ids = np.asarray(ids, dtype=np.int64)
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536 % 256], -1).astype(np.uint8)


class PQStat:
    """Per-category TP / FP / FN counts and summed TP IoU; ``+`` merges."""

    def __init__(self):
        self.tp, self.fp, self.fn = defaultdict(int), defaultdict(int), defaultdict(int)
        self.iou = defaultdict(float)

    def __iadd__(self, other: "PQStat") -> "PQStat":
        for mine, theirs in ((self.tp, other.tp), (self.fp, other.fp), (self.fn, other.fn),
                             (self.iou, other.iou)):
            for k, v in theirs.items():
                mine[k] += v
        return self

    def metrics(self, categories: dict) -> dict:
        """{"All"|"Things"|"Stuff": {pq, sq, rq, n}, "per_class": {cat: {pq, sq, rq}}}."""
        per_class = {}
        for cat in categories:
            tp, fp, fn = self.tp[cat], self.fp[cat], self.fn[cat]
            if tp + fp + fn == 0:
                continue
            denom = tp + 0.5 * fp + 0.5 * fn
            per_class[cat] = {"pq": self.iou[cat] / denom,
                              "sq": self.iou[cat] / tp if tp else 0.0, "rq": tp / denom}
        out = {"per_class": per_class}
        for name, isthing in (("All", None), ("Things", True), ("Stuff", False)):
            cats = [c for c in per_class
                    if isthing is None or bool(categories[c].get("isthing", 0)) == isthing]
            n = len(cats)
            out[name] = {k: (sum(per_class[c][k] for c in cats) / n if n else 0.0)
                         for k in ("pq", "sq", "rq")}
            out[name]["n"] = n
        return out


def pq_single_image(gt_ids: np.ndarray, gt_segments: list, pred_ids: np.ndarray,
                    pred_segments: list, categories: dict) -> PQStat:
    """PQ counts of one image. ``*_segments``: COCO ``segments_info`` (id, category_id,
    iscrowd for the ground truth); ``categories``: {category id: {"isthing": 0/1, ...}}."""
    if gt_ids.shape != pred_ids.shape:
        raise ValueError(f"ground truth {gt_ids.shape} and prediction {pred_ids.shape} differ in shape")
    stat = PQStat()
    gt = {s["id"]: s for s in gt_segments}
    pred = {s["id"]: s for s in pred_segments}
    for s in pred_segments:
        if s["category_id"] not in categories:
            raise KeyError(f"predicted segment {s['id']} has unknown category_id {s['category_id']}")
    ids, areas = np.unique(pred_ids, return_counts=True)
    pred_area = dict(zip(ids.tolist(), areas.tolist()))
    missing = [i for i in pred_area if i != VOID and i not in pred]
    if missing:
        raise KeyError(f"prediction has segment ids {missing[:5]} in the PNG but not in segments_info")
    ids, areas = np.unique(gt_ids, return_counts=True)
    gt_area = dict(zip(ids.tolist(), areas.tolist()))

    pairs, counts = np.unique(gt_ids.astype(np.int64) * _OFFSET + pred_ids.astype(np.int64),
                              return_counts=True)
    inter = {(int(p // _OFFSET), int(p % _OFFSET)): int(c) for p, c in zip(pairs, counts)}

    gt_matched, pred_matched = set(), set()
    for (g, p), area in inter.items():
        if g not in gt or p not in pred:
            continue
        gs, ps = gt[g], pred[p]
        if gs.get("iscrowd", 0) or gs["category_id"] != ps["category_id"]:
            continue
        union = pred_area[p] + gt_area[g] - area - inter.get((VOID, p), 0)
        iou = area / union
        if iou > 0.5:
            cat = gs["category_id"]
            stat.tp[cat] += 1
            stat.iou[cat] += iou
            gt_matched.add(g)
            pred_matched.add(p)

    crowd_by_cat = {}
    for g, gs in gt.items():
        if gs.get("iscrowd", 0):
            crowd_by_cat[gs["category_id"]] = g  # COCO: one crowd region per category
        elif g not in gt_matched:
            stat.fn[gs["category_id"]] += 1
    for p, ps in pred.items():
        if p in pred_matched or p not in pred_area:
            continue
        ignored = inter.get((VOID, p), 0)
        crowd = crowd_by_cat.get(ps["category_id"])
        if crowd is not None:
            ignored += inter.get((crowd, p), 0)
        if ignored / pred_area[p] > 0.5:
            continue
        stat.fp[ps["category_id"]] += 1
    return stat


def _read_ids(path: str) -> np.ndarray:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"panoptic PNG not found: {path}")
    return rgb2id(np.asarray(Image.open(path).convert("RGB")))


def pq_compute(gt_json_file: str, pred_json_file: str, gt_folder: str, pred_folder: str) -> dict:
    """PQ of a predictions JSON + PNG folder against a COCO panoptic ground truth."""
    with open(gt_json_file) as f:
        gt_json = json.load(f)
    with open(pred_json_file) as f:
        pred_json = json.load(f)
    categories = {c["id"]: c for c in gt_json["categories"]}
    preds = {a["image_id"]: a for a in pred_json["annotations"]}
    stat = PQStat()
    for gt_ann in gt_json["annotations"]:
        pred_ann = preds.get(gt_ann["image_id"])
        if pred_ann is None:
            raise KeyError(f"no prediction for image_id {gt_ann['image_id']}")
        stat += pq_single_image(
            _read_ids(os.path.join(gt_folder, gt_ann["file_name"])), gt_ann["segments_info"],
            _read_ids(os.path.join(pred_folder, pred_ann["file_name"])), pred_ann["segments_info"],
            categories)
    return stat.metrics(categories)


class PanopticQualityEvaluator(DatasetEvaluator):
    """Detectron2 evaluator of ``panoptic_seg`` outputs against a registered COCO-format
    panoptic dataset (metadata ``panoptic_json``, ``panoptic_root``, the thing/stuff id
    maps). Reports PQ, SQ, RQ for all, things (``_th``) and stuff (``_st``), in percent."""

    def __init__(self, dataset_name: str, output_dir: str | None = None, distributed: bool = True):
        meta = MetadataCatalog.get(dataset_name)
        self._meta, self._distributed = meta, distributed
        self._logger = logging.getLogger(__name__)
        self._things = {v: k for k, v in meta.thing_dataset_id_to_contiguous_id.items()}
        self._stuff = {v: k for k, v in meta.stuff_dataset_id_to_contiguous_id.items()}
        json_file = meta.panoptic_json
        if not os.path.isfile(json_file):
            raise FileNotFoundError(f"panoptic ground truth JSON not found: {json_file}")
        with open(json_file) as f:
            gt_json = json.load(f)
        self._categories = {c["id"]: c for c in gt_json["categories"]}
        self._gt = {a["image_id"]: a for a in gt_json["annotations"]}
        self._gt_root = meta.panoptic_root
        self.reset()

    def reset(self):
        self._per_image = []  # a PQStat per image, in the order processed

    def _segments(self, panoptic_img: np.ndarray, segments_info):
        """Our outputs -> (COCO ids map with 0 = VOID, segments with dataset category ids)."""
        if segments_info is None:  # ids are category * label_divisor + instance, -1 VOID
            divisor = self._meta.label_divisor
            segments = []
            for label in np.unique(panoptic_img):
                if label == -1:
                    continue
                cat = int(label) // divisor
                segments.append({"id": int(label) + 1, "category_id": cat,
                                 "isthing": cat in self._things})
            return panoptic_img + 1, [self._to_dataset_id(s) for s in segments]
        return panoptic_img, [self._to_dataset_id(s) for s in segments_info]

    def _to_dataset_id(self, seg: dict) -> dict:
        seg = dict(seg)
        table = self._things if seg.get("isthing", False) else self._stuff
        if seg["category_id"] not in table:
            kind = "thing" if seg.get("isthing", False) else "stuff"
            raise KeyError(f"predicted {kind} class {seg['category_id']} is not in the metadata of this dataset")
        seg["category_id"] = table[seg["category_id"]]
        return seg

    def process(self, inputs, outputs):
        for inp, out in zip(inputs, outputs):
            panoptic_img, segments_info = out["panoptic_seg"]
            pred_ids, segments = self._segments(panoptic_img.cpu().numpy().astype(np.int64), segments_info)
            gt_ann = self._gt.get(inp["image_id"])
            if gt_ann is None:
                raise KeyError(f"image_id {inp['image_id']} is not in {self._meta.panoptic_json}")
            gt_ids = _read_ids(os.path.join(self._gt_root, gt_ann["file_name"]))
            self._per_image.append(pq_single_image(gt_ids, gt_ann["segments_info"], pred_ids, segments,
                                                   self._categories))

    def evaluate(self):
        per_image = gather_on_main(self._per_image, self._distributed)  # rank order: image order
        if per_image is None:
            return {}
        stat, n = PQStat(), len(per_image)
        for s in per_image:  # the float sums of one process, whatever the number of processes
            stat += s
        m = stat.metrics(self._categories)
        res = OrderedDict()
        for suffix, name in (("", "All"), ("_th", "Things"), ("_st", "Stuff")):
            for k in ("pq", "sq", "rq"):
                res[k.upper() + suffix] = 100 * m[name][k]
        self._logger.info(f"Panoptic quality on {n} images:\n" + pq_table(m))
        return OrderedDict(panoptic_seg=res)


def pq_table(metrics: dict) -> str:
    """Detectron2's panoptic table: PQ / SQ / RQ (in %) and #categories for All, Things,
    Stuff, from :meth:`PQStat.metrics`."""
    rows = [[name, *(100 * metrics[name][k] for k in ("pq", "sq", "rq")), metrics[name]["n"]]
            for name in ("All", "Things", "Stuff")]
    return tabulate(rows, headers=["", "PQ", "SQ", "RQ", "#categories"], tablefmt="pipe",
                    floatfmt=".3f", stralign="center", numalign="center")
