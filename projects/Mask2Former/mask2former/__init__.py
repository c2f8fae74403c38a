"""Mask2Former (panoptic, instance, semantic) on expedit-d2 backbones -- in progress."""
from .modeling.head import MaskFormerHead

__all__ = ["MaskFormerHead"]
