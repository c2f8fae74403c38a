"""Detectron2 backbones with expedit hook points (one model family per file)."""
from .fpn import build_bottom_up_fpn_backbone, build_bottom_up_retinanet_fpn_backbone
from .swin import D2SwinTransformer, SwinTransformer
from .vit import D2ViT, D2ViTHybrid, VisionTransformer

__all__ = [
    "D2SwinTransformer", "SwinTransformer", "D2ViT", "D2ViTHybrid", "VisionTransformer",
    "build_bottom_up_fpn_backbone", "build_bottom_up_retinanet_fpn_backbone",
]
