"""Training mapper: any of the three record kinds -> image + ``instances`` (gt_classes, gt_masks).

* panoptic (``pan_seg_file_name`` + ``segments_info``): one mask per non-crowd segment;
* instance (``annotations`` with polygons or RLE, COCO format): one mask per non-crowd object;
* semantic (``sem_seg_file_name`` only): one mask per class present (``ignore_label`` left out).

Augmentation follows ``INPUT.DATASET_MAPPER_NAME`` as in the official recipes:

* ``coco_panoptic_lsj`` / ``coco_instance_lsj`` (large-scale jitter): horizontal flip,
  ``ResizeScale(INPUT.MIN_SCALE, INPUT.MAX_SCALE)`` of an ``INPUT.IMAGE_SIZE`` square, then a
  ``FixedSizeCrop`` of that square (padded with 128 / void where the image is smaller);
* ``mask_former_semantic`` / ``mask_former_panoptic`` / ``mask_former_instance``:
  ``ResizeShortestEdge(INPUT.MIN_SIZE_TRAIN, INPUT.MAX_SIZE_TRAIN)``, then, if
  ``INPUT.CROP.ENABLED``, a crop of ``INPUT.CROP.SIZE`` in which no single category covers more
  than ``INPUT.CROP.SINGLE_CATEGORY_MAX_AREA``, SSD colour jitter if ``INPUT.COLOR_AUG_SSD``,
  and a horizontal flip; the result is padded to a multiple of ``INPUT.SIZE_DIVISIBILITY``.

Label maps travel through the transforms with 0 as void (category + 1, or the panoptic
segment id), because Detectron2's crop-and-pad fills label maps with 0. The crop's category
constraint sees the category map; a panoptic id map then goes through the same transforms.
"""
from __future__ import annotations

import numpy as np
import torch

from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import BitMasks, Instances, polygons_to_bitmask
from fvcore.transforms.transform import PadTransform

from expedit_d2.evaluation.panoptic import rgb2id

__all__ = ["MaskFormerTrainMapper", "build_train_augmentation"]

LSJ_MAPPERS = ("coco_panoptic_lsj", "coco_instance_lsj")
SHORTEST_EDGE_MAPPERS = ("mask_former_semantic", "mask_former_panoptic", "mask_former_instance")


def build_train_augmentation(cfg, void_label: int | None = None) -> list:
    """The list of Detectron2 augmentations for ``cfg.INPUT.DATASET_MAPPER_NAME``.

    ``void_label`` is the value of unlabelled pixels in the label map the augmentations see
    (``MODEL.SEM_SEG_HEAD.IGNORE_VALUE`` unless given)."""
    void = cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE if void_label is None else void_label
    name = cfg.INPUT.DATASET_MAPPER_NAME
    if name in LSJ_MAPPERS:
        size = cfg.INPUT.IMAGE_SIZE
        return [T.RandomFlip(horizontal=True),
                T.ResizeScale(cfg.INPUT.MIN_SCALE, cfg.INPUT.MAX_SCALE, size, size),
                T.FixedSizeCrop(crop_size=(size, size))]
    if name in SHORTEST_EDGE_MAPPERS:
        augs = [T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN,
                                     cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING)]
        if cfg.INPUT.CROP.ENABLED:
            augs.append(T.RandomCrop_CategoryAreaConstraint(
                cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE, cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA,
                void))
        if cfg.INPUT.COLOR_AUG_SSD:
            from detectron2.projects.point_rend import ColorAugSSDTransform

            augs.append(ColorAugSSDTransform(img_format=cfg.INPUT.FORMAT))
        augs.append(T.RandomFlip(horizontal=True))
        return augs
    raise ValueError(f"INPUT.DATASET_MAPPER_NAME={name!r} is not one of "
                     f"{LSJ_MAPPERS + SHORTEST_EDGE_MAPPERS}")


def _pad_to_multiple(h: int, w: int, divisor: int) -> PadTransform | None:
    if divisor <= 0 or (h % divisor == 0 and w % divisor == 0):
        return None
    return PadTransform(0, 0, -w % divisor, -h % divisor, w, h, pad_value=128.0, seg_pad_value=0)


class MaskFormerTrainMapper:
    """Callable record -> training dict, built from a config (see the module docstring)."""

    def __init__(self, cfg):
        self.augment = T.AugmentationList(build_train_augmentation(cfg, void_label=0))
        self.size_divisibility = (cfg.INPUT.SIZE_DIVISIBILITY
                                  if cfg.INPUT.DATASET_MAPPER_NAME in SHORTEST_EDGE_MAPPERS else -1)
        self.image_format = cfg.INPUT.FORMAT
        self.ignore_label = cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE

    def __call__(self, d: dict) -> dict:
        d = dict(d)
        image = utils.read_image(d["file_name"], format=self.image_format)
        utils.check_image_size(d, image)
        pan = cats = None  # segment ids / category + 1; 0 is void in both
        if "pan_seg_file_name" in d:
            pan = rgb2id(utils.read_image(d.pop("pan_seg_file_name"), "RGB")).astype(np.float64)
            cats = np.zeros(pan.shape, dtype=np.float64)
            for s in d["segments_info"]:
                cats[pan == s["id"]] = s["category_id"] + 1
        elif "sem_seg_file_name" in d:
            sem = utils.read_image(d.pop("sem_seg_file_name")).astype(np.int64)
            sem = sem[..., 0] if sem.ndim == 3 else sem
            cats = np.where(sem == self.ignore_label, 0, sem + 1).astype(np.float64)
        elif "annotations" not in d:
            raise KeyError(f"{d['file_name']}: a training record needs pan_seg_file_name, "
                           "annotations or sem_seg_file_name")
        aug = T.AugInput(image, sem_seg=cats)
        tfms = self.augment(aug)
        image, cats = aug.image, aug.sem_seg
        pad = _pad_to_multiple(*image.shape[:2], self.size_divisibility)
        if pad is not None:
            image = pad.apply_image(image)
            cats = None if cats is None else pad.apply_segmentation(cats)
            tfms = tfms + pad
        if pan is not None:
            pan = tfms.apply_segmentation(pan).astype(np.int64)
        h, w = image.shape[:2]
        d["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1))).float()
        classes, masks = [], []
        if pan is not None:
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
            cats = cats.astype(np.int64)
            for c in np.unique(cats):
                if c != 0:
                    classes.append(int(c) - 1)
                    masks.append(cats == c)
        inst = Instances((h, w))
        inst.gt_classes = torch.tensor(classes, dtype=torch.int64)
        inst.gt_masks = BitMasks(torch.from_numpy(np.stack(masks)) if masks
                                 else torch.zeros((0, h, w), dtype=torch.bool))
        d["instances"] = inst
        return d
