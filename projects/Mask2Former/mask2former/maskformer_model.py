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
The three tasks visit the pixels together, one block of rows at a time (:mod:`.inference`),
with the same results as the official whole-tensor order up to float rounding.
Test-time resize (the Expedit fork's ``MODEL.MASK_FORMER.TEST.RESIZE_RATIO`` r > 0): the
padded, normalised batch (N, 3, H, W) is resized bilinearly to
(int(H / 32 * r) * 32, int(W / 32 * r) * 32) before the backbone; the mask logits are still
upsampled to the unresized padded size, so outputs keep the image size.
``MODEL.MASK_FORMER.TEST.RESIZE_SHORT_EDGE_LENGTH`` is accepted and unused (as officially).
Expediting is a backbone matter: ``MODEL.BACKBONE.NAME: D2HourglassSwinTransformer`` (the
official keys) or ``TokenReductionBackbone``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone, build_sem_seg_head
from detectron2.structures import ImageList

from expedit_d2.batching import run_by_image_size
from expedit_d2.cpu_linear import use_cpu_linear
from expedit_d2.inputs import check_finite_images

from .inference import InferenceRules, full_rows, infer, upsampled_rows
from .modeling.criterion import HungarianMatcher, SetCriterion

__all__ = ["MaskFormer"]


@META_ARCH_REGISTRY.register()
class MaskFormer(nn.Module):
    @configurable
    def __init__(self, *, backbone, sem_seg_head, criterion, num_queries, object_mask_threshold,
                 overlap_threshold, metadata, size_divisibility, sem_seg_postprocess_before_inference,
                 pixel_mean, pixel_std, semantic_on, panoptic_on, instance_on, test_topk_per_image,
                 resize_ratio=-1.0, resize_short_edge_length=-1, cpu_linear="blas"):
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
        use_cpu_linear(self, cpu_linear)  # MODEL.CPU_LINEAR

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
            "cpu_linear": cfg.MODEL.CPU_LINEAR,
        }

    @property
    def device(self):
        return self.pixel_mean.device

    def forward(self, batched_inputs):
        check_finite_images(batched_inputs)
        if self.training:
            return self._forward_batch(batched_inputs)
        # images of one padded size at a time: each image's output is its output alone
        return run_by_image_size(batched_inputs, self._forward_batch, self.size_divisibility)

    def _forward_batch(self, batched_inputs):
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
        return self.inference(outputs["pred_logits"], outputs["pred_masks"], images, batched_inputs)

    def inference(self, mask_cls, mask_pred, images, batched_inputs):
        """(N, Q, K + 1) class logits, (N, Q, h, w) mask logits -> one dict per image.

        The mask logits are upsampled to the padded input, cropped to the image and resized
        to its output ``height`` x ``width``; each image's tasks then visit those pixels one
        row block at a time (:mod:`.inference`). When the output is the image itself at a
        whole multiple of the mask size, the blocks are upsampled straight from the
        low-resolution logits and the full-resolution logits are never made.

        Under autocast (``--amp``) or with a half-precision model, the post-processing still
        runs in float32 from the low-resolution logits, as the official evaluation (which
        runs in float32) does: half-precision probabilities tie panoptic owners and coarsen
        the scores (from the same bfloat16 logits at 640x640, 200 queries, the semantic
        argmax differed on ~1% of the pixels), for a small cost (on a CPU ~15% of the
        post-processing's time)."""
        mask_cls, mask_pred = (x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
                               for x in (mask_cls, mask_pred))
        with torch.autocast(device_type=mask_pred.device.type, enabled=False):
            return self._inference(mask_cls, mask_pred, images, batched_inputs)

    def _inference(self, mask_cls, mask_pred, images, batched_inputs):
        Hp, Wp = (int(s) for s in images.tensor.shape[-2:])  # (ints when traced, too)
        rules = self.rules()
        results = []
        for cls_i, mask_i, x, size in zip(mask_cls, mask_pred, batched_inputs, images.image_sizes):
            size = tuple(int(s) for s in size)
            height, width = int(x.get("height", size[0])), int(x.get("width", size[1]))
            h, w = (int(s) for s in mask_i.shape[-2:])
            factor = Hp // h
            direct = (self.sem_seg_postprocess_before_inference and (height, width) == size
                      and factor in (1, 2, 4, 8, 16) and (Hp, Wp) == (h * factor, w * factor))
            if direct:
                rows, out_size = upsampled_rows(mask_i, factor, width), (height, width)
            else:
                full = F.interpolate(mask_i[None], size=(Hp, Wp), mode="bilinear", align_corners=False)[0]
                if self.sem_seg_postprocess_before_inference:
                    full = postprocess(full, size, height, width)
                rows, out_size = full_rows(full), tuple(full.shape[-2:])
            r = infer(cls_i, rows, out_size, rules, like=mask_i)
            if "sem_seg" in r and not self.sem_seg_postprocess_before_inference:
                r["sem_seg"] = postprocess(r["sem_seg"], size, height, width)
            results.append(r)
        return results

    def rules(self, semantic=None, panoptic=None, instance=None) -> InferenceRules:
        """The model's inference settings (the tasks on, unless given)."""
        on = [self.semantic_on if semantic is None else semantic, self.panoptic_on if panoptic is None else panoptic,
              self.instance_on if instance is None else instance]
        things = frozenset(self._thing_ids()) if on[1] or on[2] else frozenset()
        return InferenceRules(*on, self.object_mask_threshold, self.overlap_threshold, self.test_topk_per_image,
                              things, instances_things_only=self.panoptic_on)

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

    def _thing_ids(self):
        meta = self.metadata
        if meta is None or not hasattr(meta, "thing_dataset_id_to_contiguous_id"):
            raise ValueError("panoptic/instance inference needs the training dataset's metadata "
                             "(DATASETS.TRAIN with thing_dataset_id_to_contiguous_id)")
        return set(meta.thing_dataset_id_to_contiguous_id.values())

    def semantic_inference(self, mask_cls, mask_pred):
        """(Q, K+1), (Q, H, W) logits -> (K, H, W)."""
        return self._one(mask_cls, mask_pred, semantic=True)["sem_seg"]

    def panoptic_inference(self, mask_cls, mask_pred):
        """(Q, K+1), (Q, H, W) logits -> ((H, W) int32 segment ids, segments)."""
        return self._one(mask_cls, mask_pred, panoptic=True)["panoptic_seg"]

    def instance_inference(self, mask_cls, mask_pred):
        """(Q, K+1), (Q, H, W) logits -> Instances (masks, boxes, scores, classes)."""
        return self._one(mask_cls, mask_pred, instance=True)["instances"]

    def _one(self, mask_cls, mask_pred, semantic=False, panoptic=False, instance=False):
        rules = self.rules(semantic, panoptic, instance)
        return infer(mask_cls, full_rows(mask_pred), tuple(mask_pred.shape[-2:]), rules, like=mask_pred)


def postprocess(result, img_size, height, width):
    """Detectron2's ``sem_seg_postprocess`` (crop the padding, resize bilinearly to the output
    size), without the resize when the size already matches (bilinear at scale 1 is the
    identity)."""
    result = result[:, : img_size[0], : img_size[1]]
    if tuple(result.shape[-2:]) == (height, width):
        return result
    return F.interpolate(result[None], size=(height, width), mode="bilinear", align_corners=False)[0]
