"""``DPTDepth``: a DPT-style monocular depth model on our ViT / ViT-Hybrid backbones.

backbone.forward_taps -> DPTReassemble -> DPTScratch (fusion + head) -> inverse depth,
converted to metres as the official NYUv2 model does: depth = 1 / max(s * out + t, 1e-8)
(``MODEL.DPT.SCALE``, ``MODEL.DPT.SHIFT``; ``MODEL.DPT.INVERT: False`` keeps the raw output,
e.g. MiDaS relative inverse depth). Token reduction is a backbone matter: put
``MODEL.BACKBONE.NAME: TokenReductionBackbone`` and ``MODEL.EXPEDIT.*`` (or another
``MODEL.TOKEN_REDUCTION.METHOD``) in the config.

The backbone is any that follows the token-tap protocol with taps
(:class:`expedit_d2.backbones.base.TappedBackboneProtocol`, also ``TOKEN_TAP_PROTOCOL``):
our ``D2ViT`` / ``D2ViTHybrid``, the timm family ``D2TimmViT``, patched or not.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from detectron2.structures import ImageList

from expedit_d2.backbones.base import TappedBackboneProtocol
from expedit_d2.batching import run_by_image_size
from expedit_d2.cpu_linear import use_cpu_linear
from expedit_d2.inputs import check_finite_images

from .head import DPTReassemble, DPTScratch

__all__ = ["DPTDepth", "silog_loss", "TOKEN_TAP_PROTOCOL"]

#: what DPT needs of its backbone: ``forward_taps(images, taps) -> (tokens, grid, maps)``, the
#: token sequences (B, P + h*w, C) after the given blocks, the token grid (h, w) and the CNN
#: stage maps of a hybrid; ``taps``, ``num_cnn_taps``, ``tap_channels``, ``num_prefix_tokens``
#: (the first is the cls token DPT's readout uses; others, e.g. registers, are dropped)
TOKEN_TAP_PROTOCOL = TappedBackboneProtocol


def silog_loss(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor,
               variance_focus: float = 0.85) -> torch.Tensor:
    """Scale-invariant log loss (Eigen et al.; BTS weighting): sqrt(mean d^2 - l * mean(d)^2)
    * 10 over valid pixels, d = log(pred) - log(target)."""
    d = torch.log(pred[valid].clamp_min(1e-6)) - torch.log(target[valid])
    if d.numel() == 0:
        return pred.sum() * 0.0
    return torch.sqrt((d**2).mean() - variance_focus * d.mean() ** 2 + 1e-12) * 10.0


@META_ARCH_REGISTRY.register()
class DPTDepth(nn.Module):
    @configurable
    def __init__(self, *, backbone: nn.Module, features, fusion_features: int, invert: bool,
                 scale: float, shift: float, min_depth: float, max_depth: float,
                 pixel_mean, pixel_std, cpu_linear: str = "blas"):
        super().__init__()
        problem = TOKEN_TAP_PROTOCOL.problem_of(backbone)
        if problem:
            raise TypeError(f"DPTDepth needs a token-tap backbone (D2ViT, D2ViTHybrid, D2TimmViT, or "
                            f"TokenReductionBackbone over one); {type(backbone).__name__} has {problem}")
        self.backbone = backbone
        self.num_cnn_taps = backbone.num_cnn_taps
        features = [*backbone.tap_channels[: self.num_cnn_taps], *features[self.num_cnn_taps:]]
        self.reassemble = DPTReassemble(backbone.tap_channels[-1], features, self.num_cnn_taps)
        self.scratch = DPTScratch(features, fusion_features, non_negative=True)
        self.invert, self.scale, self.shift = invert, scale, shift
        self.min_depth, self.max_depth = min_depth, max_depth
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        use_cpu_linear(self, cpu_linear)  # MODEL.CPU_LINEAR

    @classmethod
    def from_config(cls, cfg):
        d = cfg.MODEL.DPT
        return {
            "backbone": build_backbone(cfg),
            "features": list(d.REASSEMBLE_FEATURES),
            "fusion_features": d.FUSION_FEATURES,
            "invert": d.INVERT, "scale": d.SCALE, "shift": d.SHIFT,
            "min_depth": d.MIN_DEPTH, "max_depth": d.MAX_DEPTH,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN, "pixel_std": cfg.MODEL.PIXEL_STD,
            "cpu_linear": cfg.MODEL.CPU_LINEAR,
        }

    @property
    def device(self):
        return self.pixel_mean.device

    def forward_raw(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised (B, 3, H, W) -> the head's raw output (B, H, W)."""
        bb = self.backbone
        taps = bb.taps[self.num_cnn_taps:]
        token_taps, grid, stages = bb.forward_taps(images, taps)
        P = bb.num_prefix_tokens
        if P > 1:  # keep the cls token for the readout, drop the other prefix tokens
            token_taps = [torch.cat([t[:, :1], t[:, P:]], dim=1) for t in token_taps]
        if self.num_cnn_taps:
            token_taps = [stages[bb.taps[0]], stages[bb.taps[1]], *token_taps]
        maps = self.reassemble(token_taps, grid)
        return self.scratch(maps).squeeze(1)

    def to_depth(self, raw: torch.Tensor) -> torch.Tensor:
        if not self.invert:
            return raw
        return 1.0 / (self.scale * raw + self.shift).clamp_min(1e-8)

    def forward(self, batched_inputs):
        check_finite_images(batched_inputs)
        if self.training:
            return self._forward_batch(batched_inputs)
        # images of one padded size at a time: each image's output is its output alone
        return run_by_image_size(batched_inputs, self._forward_batch, self.backbone.size_divisibility)

    def _forward_batch(self, batched_inputs):
        images = [(x["image"].to(self.device) - self.pixel_mean) / self.pixel_std for x in batched_inputs]
        images = ImageList.from_tensors(images, self.backbone.size_divisibility)
        depth = self.to_depth(self.forward_raw(images.tensor))
        if self.training:
            targets = ImageList.from_tensors([x["depth"].to(self.device) for x in batched_inputs],
                                             self.backbone.size_divisibility).tensor
            valid = (targets > self.min_depth) & (targets < self.max_depth)
            return {"loss_depth": silog_loss(depth, targets, valid)}
        results = []
        for i, (x, (h, w)) in enumerate(zip(batched_inputs, images.image_sizes)):
            d = depth[i, :h, :w]
            out_h, out_w = x.get("height", h), x.get("width", w)
            if (out_h, out_w) != (h, w):
                d = F.interpolate(d[None, None], size=(out_h, out_w), mode="bilinear",
                                  align_corners=False)[0, 0]
            results.append({"depth": d})
        return results
