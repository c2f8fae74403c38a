"""Mask2Former (panoptic, instance, semantic) on expedit-d2 backbones."""
from .config import add_maskformer2_config
from .maskformer_model import MaskFormer
from .modeling.head import MaskFormerHead

__all__ = ["MaskFormer", "MaskFormerHead", "add_maskformer2_config"]
