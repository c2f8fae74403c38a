"""``VideoMaskFormer`` (the official name): Mask2Former for video instance segmentation,
evaluation of published checkpoints.

A video's frames go through the backbone and the pixel decoder as one batch (an expedited
backbone clusters each frame on its own), the video decoder predicts clip-level queries with
mask tubes, and the inference is the official ``inference_video``: the whole video in one
forward; softmax over the classes without "no object"; the 10 best (query, class) pairs of
the Q x K scores (``topk(10, sorted=False)``, query = index // K); their tubes upsampled to
the padded input size (bilinear), cropped to the frames' size, resized to the video's
original size (bilinear), > 0. We take the 10 tubes before upsampling rather than after
(bilinear resizing works per tube: the same masks, without upsampling Q tubes).

Returns the official video output dict ``{"image_size", "pred_scores", "pred_labels",
"pred_masks"}`` (the masks: T x H x W bool per prediction), which ``YTVISEvaluator`` takes.
Training is not implemented here (the published checkpoints are evaluated as they are).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone, build_sem_seg_head
from detectron2.structures import ImageList

from expedit_d2.cpu_linear import use_cpu_linear

__all__ = ["VideoMaskFormer", "TOP_K_PER_VIDEO"]

TOP_K_PER_VIDEO = 10  # the official inference keeps 10 (query, class) pairs per video


@META_ARCH_REGISTRY.register()
class VideoMaskFormer(nn.Module):
    @configurable
    def __init__(self, *, backbone, sem_seg_head, num_queries, size_divisibility, pixel_mean, pixel_std,
                 no_object_weight=0.1, cpu_linear="blas"):
        super().__init__()
        self.backbone, self.sem_seg_head = backbone, sem_seg_head
        # the official model's criterion holds one buffer, the class weights of its loss (no-object
        # weighted down), which the model-zoo files carry: kept under its name so they load
        # strictly (the loss itself is not implemented here)
        self.criterion = nn.Module()
        empty_weight = torch.ones(sem_seg_head.num_classes + 1)
        empty_weight[-1] = no_object_weight
        self.criterion.register_buffer("empty_weight", empty_weight)
        self.num_queries = num_queries
        self.size_divisibility = size_divisibility if size_divisibility >= 0 else backbone.size_divisibility
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        use_cpu_linear(self, cpu_linear)  # MODEL.CPU_LINEAR

    @classmethod
    def from_config(cls, cfg):
        backbone = build_backbone(cfg)
        return {
            "backbone": backbone, "sem_seg_head": build_sem_seg_head(cfg, backbone.output_shape()),
            "num_queries": cfg.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES,
            "size_divisibility": cfg.MODEL.MASK_FORMER.SIZE_DIVISIBILITY,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN, "pixel_std": cfg.MODEL.PIXEL_STD,
            "no_object_weight": cfg.MODEL.MASK_FORMER.NO_OBJECT_WEIGHT,
            "cpu_linear": cfg.MODEL.CPU_LINEAR,
        }

    @property
    def device(self):
        return self.pixel_mean.device

    def forward(self, batched_inputs):
        """``batched_inputs``: one video (a list of one dict with ``image``: a list of (3, H, W)
        frames, and optionally ``height`` / ``width``, the size to predict at) -> its output dict."""
        if self.training:
            raise NotImplementedError("training VideoMaskFormer is not implemented in expedit-d2 (evaluate "
                                      "published checkpoints with --eval-only)")
        if len(batched_inputs) != 1:
            raise ValueError(f"VideoMaskFormer takes one video per forward (as officially), got {len(batched_inputs)}")
        video = batched_inputs[0]
        images = self.preprocess_image(batched_inputs)
        outputs = self.sem_seg_head(self.backbone(images.tensor))
        size = images.image_sizes[0]
        height, width = video.get("height", size[0]), video.get("width", size[1])
        return self.inference_video(outputs["pred_logits"][0], outputs["pred_masks"][0],
                                    tuple(images.tensor.shape[-2:]), size, height, width)

    def benchmark_parts(self) -> dict:
        """What ``tools/benchmark_model.py`` times separately."""
        return {"backbone": self.backbone, "pixel_decoder": self.sem_seg_head.pixel_decoder,
                "transformer_decoder": self.sem_seg_head.predictor}

    def preprocess_image(self, batched_inputs) -> ImageList:
        """The video's frames (``image``: a list of (3, H, W), or one frame) normalised and
        padded to the size divisibility as one batch."""
        video = batched_inputs[0]
        frames = video["image"] if isinstance(video["image"], (list, tuple)) else [video["image"]]
        if len(frames) == 0:
            raise ValueError(f"video {video.get('video_id')!r} has no frames")
        frames = [(f.to(self.device) - self.pixel_mean) / self.pixel_std for f in frames]
        return ImageList.from_tensors(frames, self.size_divisibility)

    def inference_video(self, pred_cls, pred_masks, padded_size, image_size, height, width):
        """pred_cls (Q, K + 1), pred_masks (Q, T, h, w) -> the video output dict."""
        num_classes = pred_cls.shape[-1] - 1
        scores = F.softmax(pred_cls, dim=-1)[:, :-1]
        labels = torch.arange(num_classes, device=scores.device).repeat(pred_cls.shape[0])
        top_scores, top = scores.flatten().topk(min(TOP_K_PER_VIDEO, scores.numel()), sorted=False)
        tubes = pred_masks[torch.div(top, num_classes, rounding_mode="floor")]  # (k, T, h, w)
        tubes = F.interpolate(tubes, size=padded_size, mode="bilinear", align_corners=False)
        tubes = tubes[:, :, :image_size[0], :image_size[1]]
        tubes = F.interpolate(tubes, size=(height, width), mode="bilinear", align_corners=False)
        return {"image_size": (height, width), "pred_scores": top_scores.tolist(),
                "pred_labels": labels[top].tolist(), "pred_masks": list((tubes > 0.0).cpu())}
