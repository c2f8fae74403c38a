"""Detectron2 backbones with expedit hook points (one model family per file)."""
from .swin import D2SwinTransformer, SwinTransformer

__all__ = ["D2SwinTransformer", "SwinTransformer"]
