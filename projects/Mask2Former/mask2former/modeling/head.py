"""``sem_seg_head`` of Mask2Former: the pixel decoder and the transformer decoder."""
from __future__ import annotations

from torch import nn

from .pixel_decoder import MSDeformAttnPixelDecoder
from .transformer_decoder import MultiScaleMaskedTransformerDecoder

__all__ = ["MaskFormerHead"]


class MaskFormerHead(nn.Module):
    """features {res2..res5} -> {pred_logits (N, Q, K + 1), pred_masks (N, Q, H/4, W/4), aux_outputs}."""

    def __init__(self, input_shape, num_classes, conv_dim=256, mask_dim=256, norm="GN",
                 transformer_in_features=("res3", "res4", "res5"), enc_layers=6, enc_dim_feedforward=1024,
                 hidden_dim=256, num_queries=100, nheads=8, dim_feedforward=2048, dec_layers=9):
        super().__init__()
        self.pixel_decoder = MSDeformAttnPixelDecoder(
            input_shape, transformer_in_features, conv_dim, mask_dim, norm,
            nheads=nheads, dim_feedforward=enc_dim_feedforward, enc_layers=enc_layers)
        self.predictor = MultiScaleMaskedTransformerDecoder(
            conv_dim, num_classes, hidden_dim, num_queries, nheads, dim_feedforward, dec_layers, mask_dim)

    def forward(self, features):
        mask_features, _, multi_scale = self.pixel_decoder.forward_features(features)
        return self.predictor(multi_scale, mask_features)
