"""Detectron2's FPN on top of any registered backbone (Swin, ViT, expedited or not).

``MODEL.BACKBONE.NAME: "build_bottom_up_fpn_backbone"`` with ``MODEL.FPN.BOTTOM_UP``
naming the bottom-up backbone in ``BACKBONE_REGISTRY`` (for example
``"ExpeditBackbone"``) and the usual ``MODEL.FPN.*`` keys; this is how a Swin/ViT,
expedited by config, drops into Detectron2's own ``GeneralizedRCNN``.
"""
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool

__all__ = ["build_bottom_up_fpn_backbone"]


@BACKBONE_REGISTRY.register()
def build_bottom_up_fpn_backbone(cfg, input_shape: ShapeSpec):
    name = cfg.MODEL.FPN.get("BOTTOM_UP", "")
    if not name or name not in BACKBONE_REGISTRY:
        raise KeyError(
            f"MODEL.FPN.BOTTOM_UP must name a backbone in BACKBONE_REGISTRY, got {name!r}")
    bottom_up = BACKBONE_REGISTRY.get(name)(cfg, input_shape)
    return FPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelMaxPool(),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
