"""The official Mask2Former computation order of the parts this package computes differently.

Our head and post-processing give the official results up to float rounding, in another
order (see :mod:`.inference`, ``transformer_decoder`` and ``pixel_decoder.ms_deform_attn``).
This module writes the official order out once, plainly, with the same modules and
weights, for two users:

* the tests, which check that ours equals it;
* ``tools/benchmark_head.py``, which times ours against it on the Swin-L head's shapes.

It is not used by the model. Functions:

* :func:`ms_deform_attn` -- Deformable DETR's pure-PyTorch core (one ``grid_sample`` per
  level, stack, weight, sum), what Mask2Former runs on CPU.
* :func:`decoder` -- the masked-attention decoder's eval forward: every layer's masks at
  the mask features' size (einsum), resized to the next level, the boolean mask repeated
  per head, ``nn.MultiheadAttention``.
* :func:`semantic`, :func:`panoptic`, :func:`instances` -- the three inference rules on
  whole (Q, H, W) tensors.
* :func:`inference` -- ``MaskFormer.forward``'s eval post-processing: the mask logits
  upsampled to the padded input, then per image Detectron2's ``sem_seg_postprocess`` and
  the rules.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from detectron2.modeling.postprocessing import sem_seg_postprocess
from detectron2.structures import Boxes, Instances

from .inference import InferenceRules

__all__ = ["ms_deform_attn", "decoder", "semantic", "panoptic", "instances", "inference"]


def ms_deform_attn(value, spatial_shapes, sampling_locations, attention_weights):
    """value (N, S, M, D), spatial_shapes (L, 2), sampling_locations (N, Lq, M, L, P, 2) in
    [0, 1], attention_weights (N, Lq, M, L, P) -> (N, Lq, M * D)."""
    N, S, M, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    sizes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    per_level = value.split([h * w for h, w in sizes], dim=1)
    grids = 2 * sampling_locations - 1  # grid_sample's [-1, 1]
    samples = []
    for lvl, (h, w) in enumerate(sizes):
        v = per_level[lvl].flatten(2).transpose(1, 2).reshape(N * M, D, h, w)
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)  # (N * M, Lq, P, 2)
        samples.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    stacked = torch.stack(samples, dim=-2).flatten(-2)  # (N * M, D, Lq, L * P)
    weights = attention_weights.transpose(1, 2).reshape(N * M, 1, Lq, L * P)
    out = (stacked * weights).sum(-1).view(N, M * D, Lq)
    return out.transpose(1, 2).contiguous()


def decoder(dec, x, mask_features):
    """``dec`` (a ``MultiScaleMaskedTransformerDecoder``) on multi-scale maps x [(N, C, H_l,
    W_l)] and mask_features (N, C, H, W) -> class logits (N, Q, K + 1), mask logits (N, Q, H, W)."""
    src, pos, sizes = [], [], []
    for i in range(dec.num_feature_levels):
        sizes.append(tuple(x[i].shape[-2:]))
        pos.append(dec.pe_layer(x[i]).flatten(2).permute(2, 0, 1))
        src.append((dec.input_proj[i](x[i]).flatten(2) + dec.level_embed.weight[i][None, :, None]).permute(2, 0, 1))
    N = src[0].shape[1]
    query_embed = dec.query_embed.weight.unsqueeze(1).repeat(1, N, 1)
    output = dec.query_feat.weight.unsqueeze(1).repeat(1, N, 1)

    def heads(output, size):
        decoded = dec.decoder_norm(output).transpose(0, 1)
        masks = torch.einsum("bqc,bchw->bqhw", dec.mask_embed(decoded), mask_features)
        attn = F.interpolate(masks, size=size, mode="bilinear", align_corners=False)
        attn = attn.sigmoid().flatten(2).unsqueeze(1).repeat(1, dec.num_heads, 1, 1).flatten(0, 1) < 0.5
        return dec.class_embed(decoded), masks, attn.detach()

    cls, masks, attn_mask = heads(output, sizes[0])
    for i in range(dec.num_layers):
        level = i % dec.num_feature_levels
        attn_mask[torch.where(attn_mask.sum(-1) == attn_mask.shape[-1])] = False
        layer = dec.transformer_cross_attention_layers[i]
        out = layer.multihead_attn(query=output + query_embed, key=src[level] + pos[level], value=src[level],
                                   attn_mask=attn_mask, need_weights=False)[0]
        output = layer.norm(output + out)
        output = dec.transformer_self_attention_layers[i](output, query_embed)
        output = dec.transformer_ffn_layers[i](output)
        cls, masks, attn_mask = heads(output, sizes[(i + 1) % dec.num_feature_levels])
    return cls, masks


def semantic(mask_cls, mask_pred):
    """(Q, K + 1) class logits, (Q, H, W) mask logits -> (K, H, W)."""
    return torch.einsum("qc,qhw->chw", F.softmax(mask_cls, -1)[..., :-1], mask_pred.sigmoid())


def panoptic(mask_cls, mask_pred, rules: InferenceRules):
    """-> ((H, W) int32 segment ids, [{"id", "isthing", "category_id"}])."""
    scores, labels = F.softmax(mask_cls, -1).max(-1)
    probs = mask_pred.sigmoid()
    keep = labels.ne(mask_cls.shape[-1] - 1) & (scores > rules.object_mask_threshold)
    scores, labels, probs = scores[keep], labels[keep], probs[keep]
    ids = torch.zeros(probs.shape[-2:], dtype=torch.int32, device=probs.device)
    segments, stuff, current = [], {}, 0
    if probs.shape[0] == 0:
        return ids, segments
    owner = (scores.view(-1, 1, 1) * probs).argmax(0)
    for k in range(labels.shape[0]):
        cls = int(labels[k])
        isthing = cls in rules.things
        mask = (owner == k) & (probs[k] >= 0.5)
        area, original = int((owner == k).sum()), int((probs[k] >= 0.5).sum())
        if area > 0 and original > 0 and int(mask.sum()) > 0:
            if area / original < rules.overlap_threshold:
                continue
            if not isthing:
                if cls in stuff:
                    ids[mask] = stuff[cls]
                    continue
                stuff[cls] = current + 1
            current += 1
            ids[mask] = current
            segments.append({"id": current, "isthing": isthing, "category_id": cls})
    return ids, segments


def instances(mask_cls, mask_pred, rules: InferenceRules) -> Instances:
    """-> Instances: pred_masks (n, H, W) float 0/1, pred_boxes (zeros, as the official code),
    scores (class score x mean foreground probability), pred_classes."""
    num_queries, num_classes = mask_cls.shape[0], mask_cls.shape[-1] - 1
    scores = F.softmax(mask_cls, -1)[:, :-1]
    labels = torch.arange(num_classes, device=mask_cls.device).unsqueeze(0).repeat(num_queries, 1).flatten(0, 1)
    top_scores, top_idx = scores.flatten(0, 1).topk(rules.topk, sorted=False)
    top_labels = labels[top_idx]
    masks = mask_pred[top_idx // num_classes]
    if rules.instances_things_only:
        keep = torch.tensor([int(c) in rules.things for c in top_labels], dtype=torch.bool, device=masks.device)
        top_scores, top_labels, masks = top_scores[keep], top_labels[keep], masks[keep]
    result = Instances(tuple(mask_pred.shape[-2:]))
    result.pred_masks = (masks > 0).float()
    result.pred_boxes = Boxes(torch.zeros(masks.shape[0], 4, device=masks.device))
    binary = result.pred_masks.flatten(1)
    mask_scores = (masks.sigmoid().flatten(1) * binary).sum(1) / (binary.sum(1) + 1e-6)
    result.scores = top_scores * mask_scores
    result.pred_classes = top_labels
    return result


def inference(mask_cls, mask_pred, padded_size, image_sizes, output_sizes, rules: InferenceRules,
              postprocess_before_inference: bool = True) -> list[dict]:
    """(N, Q, K + 1) class logits, (N, Q, h, w) mask logits -> one dict per image, as the
    official ``MaskFormer.forward`` in eval: upsample to the padded input size, crop and
    resize each image (``sem_seg_postprocess``, always interpolating), then the rules."""
    mask_pred = F.interpolate(mask_pred, size=tuple(padded_size), mode="bilinear", align_corners=False)
    results = []
    for cls_i, mask_i, size, (height, width) in zip(mask_cls, mask_pred, image_sizes, output_sizes):
        r = {}
        if postprocess_before_inference:
            mask_i = sem_seg_postprocess(mask_i, size, height, width)
            cls_i = cls_i.to(mask_i)
        if rules.semantic_on:
            sem = semantic(cls_i, mask_i)
            r["sem_seg"] = sem if postprocess_before_inference else sem_seg_postprocess(sem, size, height, width)
        if rules.panoptic_on:
            r["panoptic_seg"] = panoptic(cls_i, mask_i, rules)
        if rules.instance_on:
            r["instances"] = instances(cls_i, mask_i, rules)
        results.append(r)
    return results
