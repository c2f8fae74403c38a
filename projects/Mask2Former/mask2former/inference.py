"""Mask2Former's semantic / panoptic / instance inference, row block by row block.

The rules are the official ones (see :mod:`.maskformer_model`); what this module changes is
how the pixels are visited. The official code upsamples the (Q, h, w) mask logits to the
full image, takes their sigmoid, and then makes several passes over the (Q, H, W) tensors
(the semantic sum, the panoptic owner, every query's own-mask area, the instance masks).
At 640x640 with 200 queries each pass moves 330 MB, and together they cost more than the
transformer decoder on a CPU. Here one block of output rows at a time is upsampled (from
the few low-resolution rows it needs), passed through the sigmoid and given to every task,
while it is still in cache; per-query counts are summed over the blocks. The outputs are
the same up to float rounding (the argmax, the thresholds and the binary masks are exact;
sums over pixels are accumulated block by block in float64).

Shapes: mask_cls (Q, K + 1) class logits; rows(r0, r1) -> (Q, r1 - r0, W) mask logits of
output rows r0 .. r1 - 1.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from detectron2.structures import Boxes, Instances

__all__ = ["InferenceRules", "full_rows", "upsampled_rows", "infer", "block_rows_for"]

#: output pixels x queries per block: about 16 MB of float32 logits (on the CPU machine, 640
#: and 1024 pixels, 200 queries: faster than 32 MB blocks; 8- to 32-row blocks are within
#: the machine's noise of each other since the upsampling computes little beyond the block)
BLOCK_ELEMENTS = 2 ** 22

#: pixels per slice of the semantic product on a CPU: 200 queries x 2048 pixels of
#: probabilities (1.6 MB) and 133 classes x 2048 sums fit in cache; on the CPU machine the
#: product runs at about 54 GMAC/s in such slices and 23 over a whole 16 x 1024 block
SEMANTIC_COLUMNS = 2048

Rows = Callable[[int, int], torch.Tensor]


def full_rows(mask: torch.Tensor) -> Rows:
    """Row blocks of a (Q, H, W) tensor already at the output size."""
    return lambda r0, r1: mask[:, r0:r1]


def upsampled_rows(mask: torch.Tensor, factor: int, width: int) -> Rows:
    """Row blocks of ``F.interpolate(mask[None], scale_factor=factor, mode="bilinear",
    align_corners=False)[0][:, :, :width]`` without computing the whole upsampled tensor:
    each block is upsampled from the low-resolution rows it needs plus one row either side
    (so no block sees a border the full tensor does not). The upsampling is given the scale
    and asked for output rows up to the block's last and the first ``width`` columns only,
    so beyond the block it computes just the rows from the low-resolution row above (up to
    ``factor`` rows; the full-size output and the crop are never made). Bitwise equal to
    the full upsampling (the source coordinates of a block are those of the full tensor
    shifted by a whole number of rows, exactly, for a power-of-two factor)."""
    h, w = mask.shape[-2:]
    # a dimension whose output size equals its input size is copied, not interpolated, by
    # the CPU kernel: then one more row or column is asked for (and cut)
    cols = width + 1 if width == w and factor != 1 else width

    def rows(r0: int, r1: int) -> torch.Tensor:
        a, b = max(r0 // factor - 1, 0), min((r1 - 1) // factor + 2, h)
        n = r1 - a * factor  # rows a * factor .. r1 - 1 of the full upsampling
        n += n == b - a and factor != 1
        up = torch.ops.aten.upsample_bilinear2d(mask[None, :, a:b], [n, cols], False, factor, factor)[0]
        return up[:, r0 - a * factor: r1 - a * factor, :width]

    return rows


def block_rows_for(num_queries: int, width: int) -> int:
    """About :data:`BLOCK_ELEMENTS` logits per block, in whole multiples of 8 rows (so that
    blocks start on whole low-resolution rows, and the upsampling computes one low-resolution
    row's worth of output rows beyond the block)."""
    return max(8, BLOCK_ELEMENTS // max(1, num_queries * width) // 8 * 8)


@dataclass(frozen=True)
class InferenceRules:
    """The thresholds and switches of the three tasks (``MODEL.MASK_FORMER.TEST.*``)."""

    semantic_on: bool
    panoptic_on: bool
    instance_on: bool
    object_mask_threshold: float
    overlap_threshold: float
    topk: int  # TEST.DETECTIONS_PER_IMAGE
    things: frozenset = frozenset()  # contiguous ids of thing classes (panoptic / instance)
    #: instances of thing classes only (the official rule: when panoptic inference is on)
    instances_things_only: bool = False


def infer(mask_cls: torch.Tensor, rows: Rows, size: tuple[int, int], rules: InferenceRules,
          like: torch.Tensor, block_rows: int | None = None) -> dict:
    """All enabled tasks of one image in one pass over its mask logits.

    Args:
        mask_cls: (Q, K + 1) class logits (the last class is "no object").
        rows: mask logits of output rows r0 .. r1 - 1, (Q, r1 - r0, W).
        size: (H, W) of the output.
        rules: what to compute and the thresholds.
        like: a tensor of the mask logits' dtype and device.
        block_rows: rows per block (default: about :data:`BLOCK_ELEMENTS` logits).

    Returns:
        ``sem_seg`` (K, H, W), ``panoptic_seg`` ((H, W) int32, segments), ``instances``
        (:class:`Instances`), for the tasks that are on.
    """
    H, W = size
    mask_cls = mask_cls.to(like)
    tasks = [task(mask_cls, H, W, rules, like) for task, on in (
        (_Semantic, rules.semantic_on), (_Panoptic, rules.panoptic_on), (_Instance, rules.instance_on)) if on]
    busy = [t for t in tasks if t.needs_pixels]
    step = block_rows or block_rows_for(mask_cls.shape[0], W)
    for r0 in range(0, H if busy else 0, step):
        r1 = min(r0 + step, H)
        logits = rows(r0, r1)
        probs = logits.sigmoid()
        for t in busy:
            t.block(r0, r1, logits, probs)
    return {t.key: t.result() for t in tasks}


class _Semantic:
    """sum_q softmax(class)_q[:K] * sigmoid(mask)_q -> (K, H, W)."""

    key = "sem_seg"
    needs_pixels = True

    def __init__(self, mask_cls, H, W, rules, like):
        self.weights = F.softmax(mask_cls, -1)[..., :-1].t()  # (K, Q)
        self.out = like.new_empty((self.weights.shape[0], H, W))

    def block(self, r0, r1, logits, probs):
        Q, b, W = probs.shape
        probs, out = probs.reshape(Q, b * W), self.out[:, r0:r1].view(-1, b * W)
        # on a CPU in slices of SEMANTIC_COLUMNS pixels, whose probabilities and sums stay in
        # cache (the (K, Q) x (Q, pixels) product of a whole block runs at half the rate)
        step = SEMANTIC_COLUMNS if probs.device.type == "cpu" else b * W
        for c0 in range(0, b * W, step):  # straight into the output (rows of stride H * W)
            torch.mm(self.weights, probs[:, c0:c0 + step], out=out[:, c0:c0 + step])

    def result(self):
        return self.out


class _Panoptic:
    """The official per-query rule for all kept queries at once.

    Kept: top class not "no object" with score > OBJECT_MASK_THRESHOLD. Each pixel goes to
    its owner k = argmax_k score_k * prob_k; query k (in order) keeps the pixels it owns
    where prob_k >= 0.5, if it owns any, its own mask (prob_k >= 0.5) is not empty and
    owned / own area >= OVERLAP_THRESHOLD; a stuff class seen before reuses that segment.
    A pixel can only be given to its owner, so the per-query assignments never overlap and
    one gather paints them all."""

    key = "panoptic_seg"

    def __init__(self, mask_cls, H, W, rules, like):
        scores, labels = F.softmax(mask_cls, -1).max(-1)
        num_classes = mask_cls.shape[-1] - 1
        self.kept = (labels.ne(num_classes) & (scores > rules.object_mask_threshold)).nonzero().squeeze(1)
        self.scores, self.labels = scores[self.kept].view(-1, 1, 1), labels[self.kept]
        self.rules, self.needs_pixels = rules, self.kept.numel() > 0
        K, device = self.kept.numel(), like.device
        # every row is written by the blocks before it is read (when there are kept queries)
        self.owner = torch.empty((H, W), dtype=torch.long, device=device)
        self.owner_own = torch.empty((H, W), dtype=torch.bool, device=device)
        self.owned, self.won, self.own = (torch.zeros(K, dtype=torch.long, device=device) for _ in range(3))

    def block(self, r0, r1, logits, probs):
        p = probs[self.kept]
        K = p.shape[0]
        # the first highest, as argmax(0) (and several times faster than it on CPU)
        owner = (self.scores * p).max(0).indices  # (b, W)
        owner_own = p.gather(0, owner[None])[0] >= 0.5  # the owner's own mask there
        self.owner[r0:r1], self.owner_own[r0:r1] = owner, owner_own
        self.owned += torch.bincount(owner.flatten(), minlength=K)
        self.won += torch.bincount(owner[owner_own], minlength=K)
        self.own += (p >= 0.5).flatten(1).sum(1)

    def result(self):
        panoptic = torch.zeros(self.owner.shape, dtype=torch.int32, device=self.owner.device)
        segments = []
        if not self.needs_pixels:
            return panoptic, segments
        owned, won, own = self.owned.tolist(), self.won.tolist(), self.own.tolist()
        things = self.rules.things
        segment_of = [0] * len(owned)  # segment id painted for query k's won pixels (0: none)
        stuff_ids, current = {}, 0
        for k, cls in enumerate(self.labels.tolist()):
            if owned[k] == 0 or own[k] == 0 or won[k] == 0:
                continue
            if owned[k] / own[k] < self.rules.overlap_threshold:
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
        segment_of = torch.tensor(segment_of, dtype=torch.int32, device=panoptic.device)
        return torch.where(self.owner_own, segment_of[self.owner], panoptic), segments


class _Instance:
    """Top-k (query, class) pairs by class probability (thing classes only when panoptic is
    on), scored by that probability times the mean mask probability inside the binary mask
    (logit > 0); boxes are the binary masks' bounding boxes (empty mask: all zeros)."""

    key = "instances"
    needs_pixels = True

    def __init__(self, mask_cls, H, W, rules, like):
        num_classes = mask_cls.shape[-1] - 1
        scores = F.softmax(mask_cls, -1)[:, :-1]
        labels = torch.arange(num_classes, device=scores.device).repeat(scores.shape[0])
        k = min(rules.topk, scores.numel())
        top_scores, top_idx = scores.flatten().topk(k, sorted=False)
        top_labels, query = labels[top_idx], top_idx // num_classes
        if rules.instances_things_only:
            keep = torch.tensor([c in rules.things for c in top_labels.tolist()], dtype=torch.bool,
                                device=query.device)
            top_scores, top_labels, query = top_scores[keep], top_labels[keep], query[keep]
        self.query, self.scores, self.labels, self.size = query, top_scores, top_labels, (H, W)
        n, device = query.numel(), like.device
        self.masks = torch.empty((n, H, W), dtype=torch.float32, device=device)  # every row written
        self.prob_sum = torch.zeros(n, dtype=torch.float64, device=device)
        self.area = torch.zeros(n, dtype=torch.long, device=device)
        self.rows_hit = torch.zeros((n, H), dtype=torch.bool, device=device)
        self.cols_hit = torch.zeros((n, W), dtype=torch.bool, device=device)

    def block(self, r0, r1, logits, probs):
        binary = logits.index_select(0, self.query) > 0  # (n, b, W)
        masks = self.masks[:, r0:r1]  # this block of the 0/1 float output
        masks.copy_(binary)
        # per mask and row: the sum of its probabilities inside it (float32 over one row,
        # then float64) and its area (whole numbers, exact in float32)
        inside = probs.index_select(0, self.query).mul_(masks).sum(2)  # (n, b)
        self.prob_sum += inside.double().sum(1)
        per_row = masks.sum(2)
        self.area += per_row.sum(1).long()
        self.rows_hit[:, r0:r1] = per_row > 0
        # any over the rows, as bytes: bool any() over a middle dimension is ~20x slower on a
        # CPU than uint8 amax() (1024-wide rows: ~70 of the instance masks' ~370 ms per image)
        self.cols_hit |= binary.to(torch.uint8).amax(1).bool()

    def result(self):
        result = Instances(self.size)
        result.pred_masks = self.masks
        result.pred_boxes = Boxes(_boxes(self.rows_hit, self.cols_hit))
        mask_scores = self.prob_sum / (self.area.to(torch.float64) + 1e-6)
        result.scores = self.scores * mask_scores.to(self.scores.dtype)
        result.pred_classes = self.labels
        return result


def _boxes(rows_hit: torch.Tensor, cols_hit: torch.Tensor) -> torch.Tensor:
    """(n, H), (n, W) whether each row / column holds a mask pixel -> (n, 4) float32 boxes
    [x0, y0, x1 + 1, y1 + 1] as detectron2's ``BitMasks.get_bounding_boxes``, zeros if empty."""
    def first_last(hit):
        h = hit.to(torch.uint8)
        return h.argmax(1), hit.shape[1] - h.flip(1).argmax(1)

    (x0, x1), (y0, y1) = first_last(cols_hit), first_last(rows_hit)
    boxes = torch.stack([x0, y0, x1, y1], dim=1).to(torch.float32)
    return boxes * (cols_hit.any(1) & rows_hit.any(1))[:, None]
