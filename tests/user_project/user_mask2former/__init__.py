"""A user's Mask2Former-style Detectron2 project (see ../README.md). Importing it registers
``D2SwinTransformer`` (backbone) and ``MaskFormer`` (meta-architecture), as upstream does."""
from .config import add_maskformer2_config
from .meta_arch import MaskFormer
from .swin import D2SwinTransformer

__all__ = ["D2SwinTransformer", "MaskFormer", "add_maskformer2_config"]
