"""Detectron2 backbones with expedit hook points (one model family per file)."""
from .fpn import build_bottom_up_fpn_backbone
from .swin import D2SwinTransformer, SwinTransformer

__all__ = ["D2SwinTransformer", "SwinTransformer", "build_bottom_up_fpn_backbone"]
