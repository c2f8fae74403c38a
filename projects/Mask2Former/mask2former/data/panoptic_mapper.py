"""Training mapper for COCO-format panoptic data: image + panoptic PNG -> instances
(crowd segments are left out).

Augmentation: Detectron2's ResizeShortestEdge (``INPUT.MIN_SIZE_TRAIN`` / ``MAX_SIZE_TRAIN``)
and horizontal flip. (The official large-scale-jitter recipe of Mask2Former's COCO training
is not reproduced here; evaluation does not depend on it.)
"""
from __future__ import annotations

import numpy as np
import torch

from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import BitMasks, Instances

from expedit_d2.evaluation.panoptic import rgb2id

__all__ = ["PanopticTrainMapper"]


class PanopticTrainMapper:
    def __init__(self, cfg):
        self.augment = T.AugmentationList([
            T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN,
                                 cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING),
            T.RandomFlip(horizontal=True),
        ])
        self.image_format = cfg.INPUT.FORMAT

    def __call__(self, d: dict) -> dict:
        d = dict(d)
        image = utils.read_image(d["file_name"], format=self.image_format)
        utils.check_image_size(d, image)
        if "pan_seg_file_name" not in d:
            raise KeyError(f"{d['file_name']}: training needs COCO-format panoptic records "
                           "(pan_seg_file_name, segments_info); other training data is not implemented yet")
        pan = rgb2id(utils.read_image(d.pop("pan_seg_file_name"), "RGB"))
        aug = T.AugInput(image, sem_seg=pan.astype(np.float64))
        self.augment(aug)  # resizes the id map with nearest-neighbour interpolation
        image, pan = aug.image, aug.sem_seg.astype(np.int64)
        d["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1))).float()
        classes, masks = [], []
        for s in d.pop("segments_info"):
            if s.get("iscrowd", 0):
                continue
            m = pan == s["id"]
            if m.any():
                classes.append(s["category_id"])
                masks.append(m)
        inst = Instances(image.shape[:2])
        inst.gt_classes = torch.tensor(classes, dtype=torch.int64)
        inst.gt_masks = BitMasks(torch.from_numpy(np.stack(masks)) if masks
                                 else torch.zeros((0, *image.shape[:2]), dtype=torch.bool))
        d["instances"] = inst
        return d
