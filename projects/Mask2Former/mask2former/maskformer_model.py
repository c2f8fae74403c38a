"""``MaskFormer`` meta-architecture (the official name): backbone -> MaskFormerHead ->
set criterion (training) or semantic / panoptic / instance inference.

Inference, per image, on the mask logits upsampled to the padded input and cropped:
  semantic  sum_q softmax(class)_q[:K] * sigmoid(mask)_q                  -> (K, H, W)
  panoptic  keep queries whose top class is not "no object" with score > OBJECT_MASK_THRESHOLD;
            each pixel goes to argmax_q score_q * sigmoid(mask)_q; a query keeps its segment
            when the pixels it wins are >= OVERLAP_THRESHOLD of its own mask (> 0.5);
            stuff segments of one class are merged
  instance  the top TEST.DETECTIONS_PER_IMAGE (query, class) pairs by class probability,
            scored by probability x mean mask probability inside the binary mask; with
            panoptic on, thing classes only. Boxes are the binary masks' bounding boxes (the
            official code outputs all-zero boxes)
Test-time resize (the Expedit fork's ``MODEL.MASK_FORMER.TEST.RESIZE_RATIO`` r > 0): the
padded, normalised batch (N, 3, H, W) is resized bilinearly to
(int(H / 32 * r) * 32, int(W / 32 * r) * 32) before the backbone; the mask logits are still
upsampled to the unresized padded size, so outputs keep the image size.
``MODEL.MASK_FORMER.TEST.RESIZE_SHORT_EDGE_LENGTH`` is accepted and unused (as officially).
Expediting is a backbone matter: ``MODEL.BACKBONE.NAME: D2HourglassSwinTransformer`` (the
official keys) or ``ExpeditBackbone``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone, build_sem_seg_head
from detectron2.structures import BitMasks, Boxes, ImageList, Instances

from expedit_d2.inputs import check_finite_images

from .modeling.criterion import HungarianMatcher, SetCriterion

__all__ = ["MaskFormer"]


@META_ARCH_REGISTRY.register()
class MaskFormer(nn.Module):
    @configurable
    def __init__(self, *, backbone, sem_seg_head, criterion, num_queries, object_mask_threshold,
                 overlap_threshold, metadata, size_divisibility, sem_seg_postprocess_before_inference,
                 pixel_mean, pixel_std, semantic_on, panoptic_on, instance_on, test_topk_per_image,
                 resize_ratio=-1.0, resize_short_edge_length=-1):
        super().__init__()
        self.backbone, self.sem_seg_head, self.criterion = backbone, sem_seg_head, criterion
        self.num_queries = num_queries
        self.object_mask_threshold, self.overlap_threshold = object_mask_threshold, overlap_threshold
        self.metadata = metadata
        self.size_divisibility = size_divisibility if size_divisibility >= 0 else backbone.size_divisibility
        self.sem_seg_postprocess_before_inference = sem_seg_postprocess_before_inference
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        self.semantic_on, self.panoptic_on, self.instance_on = semantic_on, panoptic_on, instance_on
        self.test_topk_per_image = test_topk_per_image
        self.resize_ratio = float(resize_ratio)
        self.resize_short_edge_length = resize_short_edge_length  # unused, as officially
        if not (semantic_on or panoptic_on or instance_on):
            raise ValueError("MODEL.MASK_FORMER.TEST: enable at least one of SEMANTIC_ON, PANOPTIC_ON, INSTANCE_ON")

    @classmethod
    def from_config(cls, cfg):
        backbone = build_backbone(cfg)
        head = build_sem_seg_head(cfg, backbone.output_shape())
        m = cfg.MODEL.MASK_FORMER
        matcher = HungarianMatcher(m.CLASS_WEIGHT, m.MASK_WEIGHT, m.DICE_WEIGHT, m.TRAIN_NUM_POINTS)
        weights = {"loss_ce": m.CLASS_WEIGHT, "loss_mask": m.MASK_WEIGHT, "loss_dice": m.DICE_WEIGHT}
        criterion = SetCriterion(cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, matcher, weights, m.NO_OBJECT_WEIGHT,
                                 ("labels", "masks"), m.TRAIN_NUM_POINTS, m.OVERSAMPLE_RATIO,
                                 m.IMPORTANCE_SAMPLE_RATIO)
        t = m.TEST
        return {
            "backbone": backbone, "sem_seg_head": head, "criterion": criterion,
            "num_queries": m.NUM_OBJECT_QUERIES, "object_mask_threshold": t.OBJECT_MASK_THRESHOLD,
            "overlap_threshold": t.OVERLAP_THRESHOLD,
            "metadata": MetadataCatalog.get(cfg.DATASETS.TRAIN[0]) if cfg.DATASETS.TRAIN else None,
            "size_divisibility": m.SIZE_DIVISIBILITY,
            "sem_seg_postprocess_before_inference": (t.SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE
                                                     or t.PANOPTIC_ON or t.INSTANCE_ON),
            "pixel_mean": cfg.MODEL.PIXEL_MEAN, "pixel_std": cfg.MODEL.PIXEL_STD,
            "semantic_on": t.SEMANTIC_ON, "panoptic_on": t.PANOPTIC_ON, "instance_on": t.INSTANCE_ON,
            "test_topk_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
            "resize_ratio": t.RESIZE_RATIO, "resize_short_edge_length": t.RESIZE_SHORT_EDGE_LENGTH,
        }

    @property
    def device(self):
        return self.pixel_mean.device

    def forward(self, batched_inputs):
        check_finite_images(batched_inputs)
        images = [(x["image"].to(self.device) - self.pixel_mean) / self.pixel_std for x in batched_inputs]
        images = ImageList.from_tensors(images, self.size_divisibility)
        x = images.tensor
        if not self.training and self.resize_ratio > 0:
            x = self.resize_for_backbone(x)
        outputs = self.sem_seg_head(self.backbone(x))
        if self.training:
            if "instances" not in batched_inputs[0]:
                raise KeyError("training inputs need 'instances' (gt_classes, gt_masks)")
            targets = self.prepare_targets([x["instances"].to(self.device) for x in batched_inputs], images)
            return self.criterion(outputs, targets)
        mask_cls, mask_pred = outputs["pred_logits"], outputs["pred_masks"]
        mask_pred = F.interpolate(mask_pred, size=images.tensor.shape[-2:], mode="bilinear", align_corners=False)
        results = []
        for cls_i, mask_i, x, size in zip(mask_cls, mask_pred, batched_inputs, images.image_sizes):
            height, width = x.get("height", size[0]), x.get("width", size[1])
            r = {}
            if self.sem_seg_postprocess_before_inference:
                mask_i = postprocess(mask_i, size, height, width)
                cls_i = cls_i.to(mask_i)
            probs = mask_i.sigmoid()  # once, shared by the three tasks
            if self.semantic_on:
                sem = self.semantic_inference(cls_i, mask_i, probs)
                r["sem_seg"] = sem if self.sem_seg_postprocess_before_inference else \
                    postprocess(sem, size, height, width)
            if self.panoptic_on:
                r["panoptic_seg"] = self.panoptic_inference(cls_i, mask_i, probs)
            if self.instance_on:
                r["instances"] = self.instance_inference(cls_i, mask_i, probs)
            results.append(r)
        return results

    def benchmark_parts(self) -> dict:
        """What ``tools/benchmark_model.py`` times separately."""
        return {"backbone": self.backbone, "pixel_decoder": self.sem_seg_head.pixel_decoder,
                "transformer_decoder": self.sem_seg_head.predictor}

    def resize_for_backbone(self, x):
        """(N, C, H, W) -> (N, C, int(H / 32 * r) * 32, int(W / 32 * r) * 32), bilinear."""
        size = tuple(int(s / 32 * self.resize_ratio) * 32 for s in x.shape[-2:])
        if min(size) == 0:
            raise ValueError(f"MODEL.MASK_FORMER.TEST.RESIZE_RATIO={self.resize_ratio} shrinks the "
                             f"{tuple(x.shape[-2:])} batch below 32 pixels")
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)

    def prepare_targets(self, instances, images):
        H, W = images.tensor.shape[-2:]
        targets = []
        for inst in instances:
            masks = inst.gt_masks
            masks = masks.tensor if hasattr(masks, "tensor") else masks
            padded = masks.new_zeros((masks.shape[0], H, W))
            padded[:, : masks.shape[1], : masks.shape[2]] = masks
            targets.append({"labels": inst.gt_classes, "masks": padded})
        return targets

    def semantic_inference(self, mask_cls, mask_pred, probs=None):
        """(Q, K+1), (Q, H, W) logits [, their sigmoid] -> (K, H, W)."""
        probs = mask_pred.sigmoid() if probs is None else probs
        return torch.einsum("qc,qhw->chw", F.softmax(mask_cls, -1)[..., :-1], probs)

    def _thing_ids(self):
        meta = self.metadata
        if meta is None or not hasattr(meta, "thing_dataset_id_to_contiguous_id"):
            raise ValueError("panoptic/instance inference needs the training dataset's metadata "
                             "(DATASETS.TRAIN with thing_dataset_id_to_contiguous_id)")
        return set(meta.thing_dataset_id_to_contiguous_id.values())

    def panoptic_inference(self, mask_cls, mask_pred, probs=None):
        """The official per-query rule, computed for all kept queries at once.

        Each pixel goes to its owner k = argmax_k score_k * prob_k; query k (in order) keeps
        the pixels it owns where prob_k >= 0.5, if it owns any, its own mask (prob_k >= 0.5)
        is not empty and owned / own area >= OVERLAP_THRESHOLD; a stuff class seen before
        reuses that segment. A pixel can only be given to its owner, so the per-query
        assignments never overlap and one gather paints them all."""
        scores, labels = F.softmax(mask_cls, -1).max(-1)
        probs = mask_pred.sigmoid() if probs is None else probs
        num_classes = mask_cls.shape[-1] - 1
        kept = (labels.ne(num_classes) & (scores > self.object_mask_threshold)).nonzero().squeeze(1)
        H, W = probs.shape[-2:]
        panoptic = torch.zeros((H, W), dtype=torch.int32, device=probs.device)
        segments = []
        if kept.numel() == 0:
            return panoptic, segments
        scores, labels, probs = scores[kept], labels[kept], probs[kept]
        K = kept.numel()
        owner = (scores.view(-1, 1, 1) * probs).argmax(0)  # (H, W)
        owner_own = probs.gather(0, owner[None])[0] >= 0.5  # the owner's own mask there
        owned = torch.bincount(owner.flatten(), minlength=K).tolist()
        won = torch.bincount(owner[owner_own], minlength=K).tolist()
        own = (probs >= 0.5).flatten(1).sum(1).tolist()
        things = self._thing_ids()
        segment_of = [0] * K  # segment id painted for query k's won pixels (0: none)
        stuff_ids, current = {}, 0
        for k, cls in enumerate(labels.tolist()):
            if owned[k] == 0 or own[k] == 0 or won[k] == 0:
                continue
            if owned[k] / own[k] < self.overlap_threshold:
                continue
            isthing = cls in things
            if not isthing and cls in stuff_ids:  # merge stuff regions of one class
                segment_of[k] = stuff_ids[cls]
                continue
            current += 1
            if not isthing:
                stuff_ids[cls] = current
            segment_of[k] = current
            segments.append({"id": current, "isthing": isthing, "category_id": cls})
        segment_of = torch.tensor(segment_of, dtype=torch.int32, device=probs.device)
        panoptic = torch.where(owner_own, segment_of[owner], panoptic)
        return panoptic, segments

    def instance_inference(self, mask_cls, mask_pred, probs=None):
        """Top-k (query, class) pairs by class probability, scored by that probability times
        the mean mask probability inside the binary mask; boxes from the binary masks."""
        H, W = mask_pred.shape[-2:]
        num_classes = mask_cls.shape[-1] - 1
        scores = F.softmax(mask_cls, -1)[:, :-1]
        labels = torch.arange(num_classes, device=scores.device).repeat(scores.shape[0])
        k = min(self.test_topk_per_image, scores.numel())
        top_scores, top_idx = scores.flatten().topk(k, sorted=False)
        top_labels = labels[top_idx]
        query = top_idx // num_classes
        if self.panoptic_on:
            things = self._thing_ids()
            keep = torch.tensor([c in things for c in top_labels.tolist()], dtype=torch.bool,
                                device=query.device)
            top_scores, top_labels, query = top_scores[keep], top_labels[keep], query[keep]
        masks = mask_pred[query]
        result = Instances((H, W))
        binary = (masks > 0).float()
        result.pred_masks = binary
        result.pred_boxes = BitMasks(binary > 0).get_bounding_boxes() if binary.shape[0] else Boxes(
            torch.zeros(0, 4, device=masks.device))
        prob = masks.sigmoid() if probs is None else probs[query]
        mask_scores = (prob.flatten(1) * binary.flatten(1)).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
        result.scores = top_scores * mask_scores
        result.pred_classes = top_labels
        return result


def postprocess(result, img_size, height, width):
    """Detectron2's ``sem_seg_postprocess`` (crop the padding, resize bilinearly to the output
    size), without the resize when the size already matches (bilinear at scale 1 is the
    identity)."""
    result = result[:, : img_size[0], : img_size[1]]
    if tuple(result.shape[-2:]) == (height, width):
        return result
    return F.interpolate(result[None], size=(height, width), mode="bilinear", align_corners=False)[0]
