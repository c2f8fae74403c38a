"""Hungarian matching and the set criterion of Mask2Former, with point-sampled mask losses.

Matching cost per (query, target): ``w_class * -p(class) + w_mask * sigmoid-BCE + w_dice * dice``,
the mask terms on ``num_points`` uniformly random points shared by predictions and
targets. Losses on the matched pairs: cross-entropy over classes (no-object weighted by
``eos_coef``), sigmoid BCE and dice on ``num_points`` points chosen by uncertainty with
randomness (PointRend's sampling, from detectron2.projects.point_rend), each summed over
masks and divided by the number of target masks; the same on every auxiliary output.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn

from detectron2.projects.point_rend.point_features import (
    get_uncertain_point_coords_with_randomness,
    point_sample,
)
from detectron2.utils import comm

__all__ = ["HungarianMatcher", "SetCriterion", "dice_loss", "sigmoid_ce_loss"]


def pairwise_dice(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(Q, P) logits, (T, P) binary -> (Q, T) dice loss."""
    inputs = inputs.sigmoid()
    numerator = 2 * inputs @ targets.t()
    denominator = inputs.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1 - (numerator + 1) / (denominator + 1)


def pairwise_sigmoid_ce(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(Q, P) logits, (T, P) binary -> (Q, T) mean BCE over points."""
    pos = F.binary_cross_entropy_with_logits(inputs, torch.ones_like(inputs), reduction="none")
    neg = F.binary_cross_entropy_with_logits(inputs, torch.zeros_like(inputs), reduction="none")
    return (pos @ targets.t() + neg @ (1 - targets).t()) / inputs.shape[1]


def dice_loss(inputs, targets, num_masks: float) -> torch.Tensor:
    inputs = inputs.sigmoid()
    numerator = 2 * (inputs * targets).sum(-1)
    denominator = inputs.sum(-1) + targets.sum(-1)
    return (1 - (numerator + 1) / (denominator + 1)).sum() / num_masks


def sigmoid_ce_loss(inputs, targets, num_masks: float) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(inputs, targets, reduction="none").mean(1).sum() / num_masks


class HungarianMatcher(nn.Module):
    def __init__(self, cost_class=2.0, cost_mask=5.0, cost_dice=5.0, num_points=12544):
        super().__init__()
        if cost_class == 0 and cost_mask == 0 and cost_dice == 0:
            raise ValueError("all matching costs are 0")
        self.cost_class, self.cost_mask, self.cost_dice = cost_class, cost_mask, cost_dice
        self.num_points = num_points

    @torch.no_grad()
    def forward(self, outputs, targets):
        """-> per image (query indices, target indices), as int64 tensors."""
        indices = []
        for b, tgt in enumerate(targets):
            prob = outputs["pred_logits"][b].float().softmax(-1)  # (Q, K + 1)
            cost_class = -prob[:, tgt["labels"]]
            pred = outputs["pred_masks"][b][:, None].float()  # (Q, 1, H, W)
            gt = tgt["masks"].to(pred)[:, None]  # (T, 1, H', W')
            points = torch.rand(1, self.num_points, 2, device=pred.device)
            pred_p = point_sample(pred, points.repeat(pred.shape[0], 1, 1), align_corners=False).squeeze(1)
            gt_p = point_sample(gt, points.repeat(gt.shape[0], 1, 1), align_corners=False).squeeze(1)
            cost = (self.cost_mask * pairwise_sigmoid_ce(pred_p, gt_p) + self.cost_class * cost_class
                    + self.cost_dice * pairwise_dice(pred_p, gt_p))
            q, t = linear_sum_assignment(cost.cpu().numpy())
            indices.append((torch.as_tensor(q, dtype=torch.int64), torch.as_tensor(t, dtype=torch.int64)))
        return indices


class SetCriterion(nn.Module):
    def __init__(self, num_classes, matcher, weight_dict, eos_coef=0.1, losses=("labels", "masks"),
                 num_points=12544, oversample_ratio=3.0, importance_sample_ratio=0.75):
        super().__init__()
        self.num_classes, self.matcher, self.weight_dict = num_classes, matcher, weight_dict
        self.eos_coef, self.losses = eos_coef, tuple(losses)
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight)  # in the official checkpoints
        self.num_points = num_points
        self.oversample_ratio, self.importance_sample_ratio = oversample_ratio, importance_sample_ratio

    def loss_labels(self, outputs, targets, indices, num_masks):
        logits = outputs["pred_logits"].float()
        target = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        for b, (q, t) in enumerate(indices):
            target[b, q] = targets[b]["labels"][t]
        return {"loss_ce": F.cross_entropy(logits.transpose(1, 2), target, self.empty_weight)}

    def loss_masks(self, outputs, targets, indices, num_masks):
        src = torch.cat([outputs["pred_masks"][b][q] for b, (q, _) in enumerate(indices)])
        tgt = torch.cat([targets[b]["masks"][t] for b, (_, t) in enumerate(indices)]).to(src)
        if src.numel() == 0:
            zero = outputs["pred_masks"].sum() * 0.0
            return {"loss_mask": zero, "loss_dice": zero}
        src, tgt = src[:, None].float(), tgt[:, None].float()
        with torch.no_grad():
            coords = get_uncertain_point_coords_with_randomness(
                src, lambda logits: -logits.abs(), self.num_points, self.oversample_ratio,
                self.importance_sample_ratio)
            tgt_p = point_sample(tgt, coords, align_corners=False).squeeze(1)
        src_p = point_sample(src, coords, align_corners=False).squeeze(1)
        return {"loss_mask": sigmoid_ce_loss(src_p, tgt_p, num_masks),
                "loss_dice": dice_loss(src_p, tgt_p, num_masks)}

    def forward(self, outputs, targets):
        """targets: per image {"labels": (T,), "masks": (T, H, W)} -> dict of weighted losses."""
        num_masks = torch.as_tensor([float(sum(len(t["labels"]) for t in targets))],
                                    device=outputs["pred_logits"].device)
        if comm.get_world_size() > 1:
            torch.distributed.all_reduce(num_masks)
        num_masks = max(num_masks.item() / comm.get_world_size(), 1.0)
        losses = {}
        levels = [("", outputs)] + [(f"_{i}", aux) for i, aux in enumerate(outputs.get("aux_outputs", []))]
        for suffix, out in levels:
            indices = self.matcher(out, targets)
            for name in self.losses:
                for k, v in getattr(self, f"loss_{name}")(out, targets, indices, num_masks).items():
                    losses[k + suffix] = v
        for k in list(losses):
            base = k.rsplit("_", 1)[0] if k[-1].isdigit() else k
            losses[k] = losses[k] * self.weight_dict.get(base, 1.0)
        return losses
