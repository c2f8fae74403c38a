"""Mask2Former's masked-attention transformer decoder (names = ``sem_seg_head.predictor.*``).

Each of the L layers: masked cross-attention of the queries to one level of the pixel
decoder's multi-scale features (round robin, coarse to fine; a query attends only where
its previous mask prediction is > 0.5), then self-attention, then an FFN. Class logits
and mask logits (query embedding x mask features) are predicted before the first layer
and after every layer.

Shapes: queries (Q, N, C) in sequence-first layout (as ``nn.MultiheadAttention`` with
its default ``batch_first=False``); outputs ``pred_logits`` (N, Q, K + 1),
``pred_masks`` (N, Q, H/4, W/4), ``aux_outputs`` for the intermediate predictions (in
eval: their class logits only; see ``forward``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.utils.registry import Registry

from .pixel_decoder import PositionEmbeddingSine

__all__ = ["TRANSFORMER_DECODER_REGISTRY", "MultiScaleMaskedTransformerDecoder", "shrink"]

#: the transformer decoders ``MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME`` picks (this project's
#: own registry object; the video package adds ``VideoMultiScaleMaskedTransformerDecoder``)
TRANSFORMER_DECODER_REGISTRY = Registry("TRANSFORMER_MODULE")


def shrink(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``F.interpolate(x, size, mode="bilinear", align_corners=False)`` of (N, C, H, W) maps.

    Shrinking by a whole even factor f >= 4 in both dimensions, every output pixel sits
    exactly between the two middle rows and columns of its f x f block (source coordinate
    f * i + (f - 1) / 2), so it is their mean: strided slices, the same up to float rounding
    and several times faster on a CPU than the upsampling kernel's general path at these
    factors (stride 4 -> 16 and 32). Anything else goes to ``F.interpolate``."""
    (H, W), (h, w) = x.shape[-2:], size
    fh, fw = H // h, W // w
    if H != fh * h or W != fw * w or fh % 2 or fw % 2 or min(fh, fw) < 4:
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    rows = (x[:, :, fh // 2 - 1::fh] + x[:, :, fh // 2::fh]) * 0.5
    return (rows[..., fw // 2 - 1::fw] + rows[..., fw // 2::fw]) * 0.5


class SelfAttentionLayer(nn.Module):
    """Post-norm self-attention (dropout 0, as Mask2Former's decoder)."""

    def __init__(self, d_model, nhead, dropout=0.0):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, tgt, query_pos):
        q = k = tgt + query_pos
        return self.norm(tgt + self.dropout(self.self_attn(q, k, value=tgt, need_weights=False)[0]))


class CrossAttentionLayer(nn.Module):
    def __init__(self, d_model, nhead, dropout=0.0):
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, tgt, memory, memory_mask, pos, query_pos):
        """tgt (Q, N, C), memory (S, N, C), memory_mask (N, Q, S) bool, True = may not attend.

        ``nn.MultiheadAttention``'s computation with its own weights, but the mask is
        broadcast over the heads instead of repeated for each and stays boolean (no
        (N * heads, Q, S) float copy)."""
        a = self.multihead_attn
        Q, N, C = tgt.shape
        heads = a.num_heads
        w_q, w_k, w_v = a.in_proj_weight.chunk(3)
        b_q, b_k, b_v = a.in_proj_bias.chunk(3)

        def split(t):  # (L, N, C) -> (N, heads, L, C / heads)
            return t.view(t.shape[0], N, heads, C // heads).permute(1, 2, 0, 3)

        q = split(F.linear(tgt + query_pos, w_q, b_q))
        k = split(F.linear(memory + pos, w_k, b_k))
        v = split(F.linear(memory, w_v, b_v))
        allowed = None if memory_mask is None else ~memory_mask[:, None]  # (N, 1, Q, S)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed,
                                             dropout_p=a.dropout if self.training else 0.0)
        out = a.out_proj(out.permute(2, 0, 1, 3).reshape(Q, N, C))
        return self.norm(tgt + self.dropout(out))


class FFNLayer(nn.Module):
    def __init__(self, d_model, dim_feedforward=2048, dropout=0.0):
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, tgt):
        return self.norm(tgt + self.dropout(self.linear2(self.dropout(F.relu(self.linear1(tgt))))))


class MLP(nn.Module):
    def __init__(self, input_dim, hidden_dim, output_dim, num_layers):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims, dims[1:] + [output_dim]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


@TRANSFORMER_DECODER_REGISTRY.register()
class MultiScaleMaskedTransformerDecoder(nn.Module):
    @classmethod
    def extra_from_config(cls, cfg) -> dict:
        """Constructor arguments beyond the ones every decoder takes (none for images)."""
        return {}

    def __init__(self, in_channels, num_classes, hidden_dim=256, num_queries=100, nheads=8,
                 dim_feedforward=2048, dec_layers=9, mask_dim=256, enforce_input_project=False,
                 num_feature_levels=3):
        super().__init__()
        self.num_heads, self.num_layers = nheads, dec_layers
        self.num_feature_levels = num_feature_levels
        self.pe_layer = PositionEmbeddingSine(hidden_dim // 2, normalize=True)
        self.transformer_self_attention_layers = nn.ModuleList(
            SelfAttentionLayer(hidden_dim, nheads) for _ in range(dec_layers))
        self.transformer_cross_attention_layers = nn.ModuleList(
            CrossAttentionLayer(hidden_dim, nheads) for _ in range(dec_layers))
        self.transformer_ffn_layers = nn.ModuleList(
            FFNLayer(hidden_dim, dim_feedforward) for _ in range(dec_layers))
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.query_feat = nn.Embedding(num_queries, hidden_dim)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.level_embed = nn.Embedding(num_feature_levels, hidden_dim)
        self.input_proj = nn.ModuleList()
        for _ in range(num_feature_levels):
            if in_channels != hidden_dim or enforce_input_project:
                conv = nn.Conv2d(in_channels, hidden_dim, 1)
                nn.init.kaiming_uniform_(conv.weight, a=1)
                nn.init.zeros_(conv.bias)
                self.input_proj.append(conv)
            else:
                self.input_proj.append(nn.Sequential())
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)
        for layer in list(self.transformer_self_attention_layers) + list(self.transformer_cross_attention_layers) \
                + list(self.transformer_ffn_layers):
            for p in layer.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)

    def forward(self, x, mask_features):
        """x: multi-scale maps (coarse to fine) [(N, C, H_l, W_l)]; mask_features (N, C, H, W)."""
        src, pos, sizes = [], [], []
        for i in range(self.num_feature_levels):
            sizes.append(tuple(x[i].shape[-2:]))
            pos.append(self.pe_layer(x[i]).flatten(2).permute(2, 0, 1))
            s = self.input_proj[i](x[i]).flatten(2) + self.level_embed.weight[i][None, :, None]
            src.append(s.permute(2, 0, 1))
        # in eval only the last mask logits leave the decoder: the earlier ones are needed only
        # as attention masks at a level's size, and bilinear resizing commutes with the
        # per-pixel linear map query x features, so they are predicted from the mask features
        # resized to each level (the same logits up to float rounding, no (Q, H/4, W/4) maps)
        resized = None if self.training else {
            size: mask_features if size == tuple(mask_features.shape[-2:]) else shrink(mask_features, size)
            for size in dict.fromkeys(sizes)}
        return self.decode(src, pos, sizes, mask_features, resized)

    def decode(self, src, pos, sizes, mask_features, resized):
        """The layers on the memory ``src`` / ``pos`` [(S_l, N, C)] of the levels of ``sizes``:
        predictions before the first layer and after each; ``resized`` ({size: mask features
        at that size}, eval) or None (training: every layer's full masks)."""
        N = src[0].shape[1]
        query_embed = self.query_embed.weight.unsqueeze(1).repeat(1, N, 1)
        output = self.query_feat.weight.unsqueeze(1).repeat(1, N, 1)
        classes, masks = [], []
        for i in range(self.num_layers + 1):
            if i > 0:
                level = (i - 1) % self.num_feature_levels
                # a query whose mask is empty everywhere attends everywhere
                attn_mask[attn_mask.all(-1)] = False
                output = self.transformer_cross_attention_layers[i - 1](
                    output, src[level], attn_mask, pos[level], query_embed)
                output = self.transformer_self_attention_layers[i - 1](output, query_embed)
                output = self.transformer_ffn_layers[i - 1](output)
            target = sizes[i % self.num_feature_levels]
            if resized is None:  # training: every layer's full mask logits (the auxiliary losses)
                cls, msk, attn_mask = self.prediction_heads(output, mask_features, target)
            elif i == self.num_layers:  # eval, last layer: the output masks, no attention mask
                cls, msk, attn_mask = self.prediction_heads(output, mask_features, None)
            else:  # eval, earlier layers: the attention mask only
                cls, _, attn_mask = self.prediction_heads(output, resized[target], target)
                msk = None
            classes.append(cls)
            masks.append(msk)
        aux = [{"pred_logits": c} if m is None else {"pred_logits": c, "pred_masks": m}
               for c, m in zip(classes[:-1], masks[:-1])]
        return {"pred_logits": classes[-1], "pred_masks": masks[-1], "aux_outputs": aux}

    def prediction_heads(self, output, mask_features, target_size):
        """Class logits (N, Q, K + 1), mask logits (N, Q, H, W) on ``mask_features``' grid,
        and the attention mask (N, Q, target H x W) bool, True = may not attend (None when
        ``target_size`` is None)."""
        decoded = self.decoder_norm(output).transpose(0, 1)  # (N, Q, C)
        classes = self.class_embed(decoded)
        N, C, H, W = mask_features.shape
        embed = self.mask_embed(decoded)  # (N, Q, C)
        masks = torch.bmm(embed, mask_features.reshape(N, C, H * W)).view(N, -1, H, W)  # (N, Q, H, W)
        if target_size is None:
            return classes, masks, None
        attn = masks
        if tuple(target_size) != (H, W):
            attn = F.interpolate(masks, size=target_size, mode="bilinear", align_corners=False)
        # (N, Q, HW) boolean, the same for every head: True = not allowed to attend
        attn = attn.sigmoid().flatten(2) < 0.5
        return classes, masks, attn.detach()
