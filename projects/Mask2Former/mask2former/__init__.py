"""Mask2Former (panoptic, instance, semantic) on expedit-d2 backbones.

This package stands in for the upstream Mask2Former project (import one of the two): it
registers the upstream names ``MaskFormer`` and ``MaskFormerHead``, and the official backbone
names of its YAMLs, ``D2SwinTransformer`` and ``D2HourglassSwinTransformer``, each only where
no one registered it before (:func:`expedit_d2.expedit_backbone.register_official_backbone_names`).
"""
from expedit_d2.expedit_backbone import register_official_backbone_names

from .config import add_maskformer2_config
from .maskformer_model import MaskFormer
from .modeling.head import MaskFormerHead

register_official_backbone_names()

__all__ = ["MaskFormer", "MaskFormerHead", "add_maskformer2_config"]
