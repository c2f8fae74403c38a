"""Mask2Former's video masked-attention decoder (names = ``sem_seg_head.predictor.*``, the
image decoder's: the 3D position embedding has no parameters, so a video checkpoint has the
image model's keys).

The pixel decoder runs on every frame; this decoder sees a clip (B videos x T frames) at
once. Its queries are clip-level: each attends to one level's memory of all T frames
((T * h * w) tokens, frame-major), with the 3D sine position embedding
(:class:`PositionEmbeddingSine3D`), and predicts one class and a mask *tube*: mask logits
(B, Q, T, H/4, W/4) = query embedding x each frame's mask features. The masked attention
of the next layer is that tube resized to the level's (h, w), > 0.5 after a sigmoid, over all
frames together. In training the batch holds ``num_frames`` (``INPUT.SAMPLING_FRAME_NUM``)
frames per video; in inference it is one video of any length.

Otherwise the layers, their order and their arithmetic are the image decoder's
(:class:`mask2former.modeling.transformer_decoder.MultiScaleMaskedTransformerDecoder`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mask2former.modeling.transformer_decoder import (TRANSFORMER_DECODER_REGISTRY,
                                                      MultiScaleMaskedTransformerDecoder, shrink)

from .position_encoding import PositionEmbeddingSine3D

__all__ = ["VideoMultiScaleMaskedTransformerDecoder"]


@TRANSFORMER_DECODER_REGISTRY.register()
class VideoMultiScaleMaskedTransformerDecoder(MultiScaleMaskedTransformerDecoder):
    @classmethod
    def extra_from_config(cls, cfg) -> dict:
        return {"num_frames": cfg.INPUT.SAMPLING_FRAME_NUM}

    def __init__(self, in_channels, num_classes, hidden_dim=256, num_queries=100, nheads=8,
                 dim_feedforward=2048, dec_layers=9, mask_dim=256, enforce_input_project=False,
                 num_feature_levels=3, num_frames=2):
        if num_feature_levels != 3:  # the official video decoder always attends to 3 levels
            raise ValueError(f"MODEL.SEM_SEG_HEAD.NUM_FEATURE_LEVELS {num_feature_levels}: the video decoder "
                             "attends to 3 levels")
        super().__init__(in_channels, num_classes, hidden_dim, num_queries, nheads, dim_feedforward,
                         dec_layers, mask_dim, enforce_input_project, num_feature_levels)
        self.pe_layer = PositionEmbeddingSine3D(hidden_dim // 2, normalize=True)
        self.num_frames = num_frames

    def forward(self, x, mask_features):
        """x: multi-scale maps of the B*T frames (coarse to fine) [(B*T, C, h_l, w_l)];
        mask_features (B*T, C, H, W). Returns ``pred_logits`` (B, Q, K + 1), ``pred_masks``
        (B, Q, T, H, W) and ``aux_outputs`` (in eval: the intermediate class logits only)."""
        BT, C, H, W = mask_features.shape
        B = BT // self.num_frames if self.training else 1
        if BT % B:
            raise ValueError(f"{BT} frames do not make {B} clips of {self.num_frames} (INPUT.SAMPLING_FRAME_NUM)")
        T = BT // B
        src, pos, sizes = [], [], []
        for i in range(self.num_feature_levels):
            h, w = x[i].shape[-2:]
            sizes.append((h, w))
            # (B*T, C, h, w) -> memory (T * h * w, B, C), frame-major
            p = self.pe_layer(x[i].view(B, T, -1, h, w))  # (B, T, C, h, w)
            pos.append(p.flatten(3).permute(1, 3, 0, 2).flatten(0, 1))
            s = self.input_proj[i](x[i]).flatten(2) + self.level_embed.weight[i][None, :, None]
            src.append(s.view(B, T, -1, h * w).permute(1, 3, 0, 2).flatten(0, 1))
        mask_features = mask_features.view(B, T, C, H, W)
        # eval: the earlier layers' tubes serve only as attention masks, predicted from the
        # mask features resized to each level (as the image decoder does)
        resized = None if self.training else {
            size: mask_features if size == (H, W) else shrink(mask_features.flatten(0, 1), size).view(B, T, C, *size)
            for size in dict.fromkeys(sizes)}
        return self.decode(src, pos, sizes, mask_features, resized)

    def prediction_heads(self, output, mask_features, target_size):
        """Class logits (B, Q, K + 1), mask tubes (B, Q, T, H, W) on ``mask_features``' grid
        (B, T, C, H, W), and the attention mask (B, Q, T * target h * w) bool, True = may not
        attend (None when ``target_size`` is None)."""
        decoded = self.decoder_norm(output).transpose(0, 1)  # (B, Q, C)
        classes = self.class_embed(decoded)
        embed = self.mask_embed(decoded)
        B, T, C, H, W = mask_features.shape
        # (B, Q, C) x (B, C, T*H*W) -> (B, Q, T, H, W), the official einsum "bqc,btchw->bqthw"
        masks = torch.bmm(embed, mask_features.permute(0, 2, 1, 3, 4).reshape(B, C, T * H * W))
        masks = masks.view(B, -1, T, H, W)
        if target_size is None:
            return classes, masks, None
        attn = masks
        if tuple(target_size) != (H, W):
            Q = masks.shape[1]
            attn = F.interpolate(masks.flatten(0, 1), size=target_size, mode="bilinear",
                                 align_corners=False).view(B, Q, T, *target_size)
        return classes, masks, (attn.sigmoid().flatten(2) < 0.5).detach()
