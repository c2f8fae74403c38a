"""Detectron2 backbones, one model family per file; token-reduction methods patch them
(:mod:`expedit_d2.reduction`), the backbones know nothing of any method."""
from .fpn import build_bottom_up_fpn_backbone, build_bottom_up_retinanet_fpn_backbone
from .swin import ExpeditD2SwinTransformer, SwinTransformer
from .timm_vit import D2TimmViT
from .vit import D2ViT, D2ViTHybrid, VisionTransformer
from .vitdet import VITDET_NAME, build_vitdet_backbone

__all__ = [
    "ExpeditD2SwinTransformer", "SwinTransformer", "D2TimmViT", "D2ViT", "D2ViTHybrid", "VisionTransformer",
    "build_bottom_up_fpn_backbone", "build_bottom_up_retinanet_fpn_backbone", "VITDET_NAME", "build_vitdet_backbone",
]
