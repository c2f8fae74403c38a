"""Training mapper: any of the three record kinds -> image + ``instances`` (gt_classes, gt_masks).

* panoptic (``pan_seg_file_name`` + ``segments_info``): one mask per non-crowd segment;
* instance (``annotations`` with polygons or RLE, COCO format): one mask per non-crowd object;
* semantic (``sem_seg_file_name`` only): one mask per class present (``ignore_label`` left out).

Augmentation: Detectron2's ResizeShortestEdge (``INPUT.MIN_SIZE_TRAIN`` / ``MAX_SIZE_TRAIN``)
and horizontal flip. (The official large-scale-jitter recipe of Mask2Former's COCO training
is not reproduced here; evaluation does not depend on it.)
"""
from __future__ import annotations

import numpy as np
import torch

from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import BitMasks, Instances, polygons_to_bitmask

from expedit_d2.evaluation.panoptic import rgb2id

__all__ = ["MaskFormerTrainMapper"]


class MaskFormerTrainMapper:
    def __init__(self, cfg):
        self.augment = T.AugmentationList([
            T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN,
                                 cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING),
            T.RandomFlip(horizontal=True),
        ])
        self.image_format = cfg.INPUT.FORMAT
        self.ignore_label = cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE

    def __call__(self, d: dict) -> dict:
        d = dict(d)
        image = utils.read_image(d["file_name"], format=self.image_format)
        utils.check_image_size(d, image)
        if "pan_seg_file_name" in d:
            label = rgb2id(utils.read_image(d.pop("pan_seg_file_name"), "RGB"))
        elif "annotations" in d:
            label = None
        elif "sem_seg_file_name" in d:
            label = utils.read_image(d.pop("sem_seg_file_name")).astype(np.int64)
            if label.ndim == 3:
                label = label[..., 0]
        else:
            raise KeyError(f"{d['file_name']}: a training record needs pan_seg_file_name, "
                           "annotations or sem_seg_file_name")
        # the label map rides along as "sem_seg" (nearest-neighbour resizing)
        aug = T.AugInput(image, sem_seg=None if label is None else label.astype(np.float64))
        tfms = self.augment(aug)
        image = aug.image
        h, w = image.shape[:2]
        d["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1))).float()
        classes, masks = [], []
        if "segments_info" in d:
            pan = aug.sem_seg.astype(np.int64)
            for s in d.pop("segments_info"):
                m = pan == s["id"]
                if not s.get("iscrowd", 0) and m.any():
                    classes.append(s["category_id"])
                    masks.append(m)
        elif "annotations" in d:
            for obj in d.pop("annotations"):
                if obj.get("iscrowd", 0):
                    continue
                obj = utils.transform_instance_annotations(obj, tfms, (h, w))
                seg = obj["segmentation"]  # transformed: polygons, or a mask decoded from RLE
                m = polygons_to_bitmask(seg, h, w) if isinstance(seg, list) else np.asarray(seg, dtype=bool)
                classes.append(obj["category_id"])
                masks.append(m)
        else:
            sem = aug.sem_seg.astype(np.int64)
            for c in np.unique(sem):
                if c != self.ignore_label:
                    classes.append(int(c))
                    masks.append(sem == c)
        inst = Instances((h, w))
        inst.gt_classes = torch.tensor(classes, dtype=torch.int64)
        inst.gt_masks = BitMasks(torch.from_numpy(np.stack(masks)) if masks
                                 else torch.zeros((0, h, w), dtype=torch.bool))
        d["instances"] = inst
        return d
