"""``sem_seg_head`` of Mask2Former: the pixel decoder and the transformer decoder.

Registered as ``MaskFormerHead`` in Detectron2's ``SEM_SEG_HEADS_REGISTRY`` and built from
the official config keys (``MODEL.SEM_SEG_HEAD.*``, ``MODEL.MASK_FORMER.*``).
"""
from __future__ import annotations

from torch import nn

from detectron2.config import configurable
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY

from .pixel_decoder import MSDeformAttnPixelDecoder
from .transformer_decoder import TRANSFORMER_DECODER_REGISTRY

__all__ = ["MaskFormerHead"]


@SEM_SEG_HEADS_REGISTRY.register()
class MaskFormerHead(nn.Module):
    """features {res2..res5} -> {pred_logits (N, Q, K + 1), pred_masks (N, Q, H/4, W/4), aux_outputs}."""

    @configurable
    def __init__(self, input_shape, num_classes, conv_dim=256, mask_dim=256, norm="GN",
                 transformer_in_features=("res3", "res4", "res5"), enc_layers=6, enc_dim_feedforward=1024,
                 enc_n_points=4, dropout=0.0, hidden_dim=256, num_queries=100, nheads=8,
                 dim_feedforward=2048, dec_layers=9, enforce_input_project=False, num_feature_levels=3,
                 transformer_decoder_name="MultiScaleMaskedTransformerDecoder", decoder_extra=None):
        super().__init__()
        self.num_classes = num_classes
        self.pixel_decoder = MSDeformAttnPixelDecoder(
            input_shape, transformer_in_features, conv_dim, mask_dim, norm, dropout=dropout,
            nheads=nheads, dim_feedforward=enc_dim_feedforward, enc_layers=enc_layers,
            n_points=enc_n_points, num_feature_levels=num_feature_levels)
        self.predictor = TRANSFORMER_DECODER_REGISTRY.get(transformer_decoder_name)(
            conv_dim, num_classes, hidden_dim, num_queries, nheads, dim_feedforward, dec_layers,
            mask_dim, enforce_input_project, num_feature_levels, **(decoder_extra or {}))

    @classmethod
    def from_config(cls, cfg, input_shape):
        h, m = cfg.MODEL.SEM_SEG_HEAD, cfg.MODEL.MASK_FORMER
        if h.PIXEL_DECODER_NAME != "MSDeformAttnPixelDecoder":
            raise ValueError(f"MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME {h.PIXEL_DECODER_NAME!r}: only "
                             "'MSDeformAttnPixelDecoder' is implemented")
        if m.TRANSFORMER_DECODER_NAME not in TRANSFORMER_DECODER_REGISTRY:
            known = sorted(name for name, _ in TRANSFORMER_DECODER_REGISTRY)
            raise ValueError(f"MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME {m.TRANSFORMER_DECODER_NAME!r}: "
                             f"expected one of {known} (the video decoder registers with mask2former_video)")
        if m.PRE_NORM:
            raise ValueError("MODEL.MASK_FORMER.PRE_NORM=True is not implemented (Mask2Former uses False)")
        missing = [f for f in h.IN_FEATURES if f not in input_shape]
        if missing:
            raise ValueError(f"MODEL.SEM_SEG_HEAD.IN_FEATURES {missing} are not backbone outputs "
                             f"{sorted(input_shape)}")
        return {
            "input_shape": {k: v for k, v in input_shape.items() if k in h.IN_FEATURES},
            "num_classes": h.NUM_CLASSES, "conv_dim": h.CONVS_DIM, "mask_dim": h.MASK_DIM,
            "norm": h.NORM, "transformer_in_features": h.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES,
            "enc_layers": h.TRANSFORMER_ENC_LAYERS, "enc_dim_feedforward": 1024,
            "enc_n_points": h.DEFORMABLE_TRANSFORMER_ENCODER_N_POINTS, "dropout": m.DROPOUT,
            "hidden_dim": m.HIDDEN_DIM, "num_queries": m.NUM_OBJECT_QUERIES, "nheads": m.NHEADS,
            "dim_feedforward": m.DIM_FEEDFORWARD,
            # one "layer" of the config is the prediction before the first decoder layer
            "dec_layers": m.DEC_LAYERS - 1, "enforce_input_project": m.ENFORCE_INPUT_PROJ,
            "num_feature_levels": h.NUM_FEATURE_LEVELS,
            "transformer_decoder_name": m.TRANSFORMER_DECODER_NAME,
            "decoder_extra": TRANSFORMER_DECODER_REGISTRY.get(m.TRANSFORMER_DECODER_NAME).extra_from_config(cfg),
        }

    def forward(self, features):
        mask_features, _, multi_scale = self.pixel_decoder.forward_features(features)
        return self.predictor(multi_scale, mask_features)
