"""Detectron2's FPN on top of any registered backbone (Swin, ViT, expedited or not).

``MODEL.BACKBONE.NAME: "build_bottom_up_fpn_backbone"`` with ``MODEL.FPN.BOTTOM_UP``
naming the bottom-up backbone in ``BACKBONE_REGISTRY`` (for example
``"TokenReductionBackbone"``) and the usual ``MODEL.FPN.*`` keys; this is how a Swin/ViT,
expedited by config, drops into Detectron2's own ``GeneralizedRCNN`` and ``RetinaNet``.

The extra top levels follow Detectron2's own split: p6 by max-pooling p5
(``LastLevelMaxPool``, R-CNN) or p6/p7 by strided convs from the top input
(``LastLevelP6P7``, RetinaNet). ``build_bottom_up_retinanet_fpn_backbone`` always gives
p6/p7; ``build_bottom_up_fpn_backbone`` gives them when ``MODEL.META_ARCHITECTURE`` is
``"RetinaNet"``, so Detectron2's RetinaNet configs need only the backbone name changed.
"""
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool, LastLevelP6P7

__all__ = ["build_bottom_up_fpn_backbone", "build_bottom_up_retinanet_fpn_backbone"]


def _fpn(cfg, input_shape: ShapeSpec, p6p7: bool) -> FPN:
    name = cfg.MODEL.FPN.get("BOTTOM_UP", "")
    if not name or name not in BACKBONE_REGISTRY:
        raise KeyError(
            f"MODEL.FPN.BOTTOM_UP must name a backbone in BACKBONE_REGISTRY, got {name!r}")
    bottom_up = BACKBONE_REGISTRY.get(name)(cfg, input_shape)
    in_features = cfg.MODEL.FPN.IN_FEATURES
    out_channels = cfg.MODEL.FPN.OUT_CHANNELS
    if p6p7:  # from the top input, as Detectron2's RetinaNet FPN (res5 there)
        top = in_features[-1]
        top_block = LastLevelP6P7(bottom_up.output_shape()[top].channels, out_channels, top)
    else:
        top_block = LastLevelMaxPool()
    return FPN(bottom_up=bottom_up, in_features=in_features, out_channels=out_channels,
               norm=cfg.MODEL.FPN.NORM, top_block=top_block, fuse_type=cfg.MODEL.FPN.FUSE_TYPE)


@BACKBONE_REGISTRY.register()
def build_bottom_up_fpn_backbone(cfg, input_shape: ShapeSpec):
    """FPN over ``MODEL.FPN.BOTTOM_UP``: p2..p6 (max-pool p6), or p3..p7 for RetinaNet."""
    return _fpn(cfg, input_shape, p6p7=cfg.MODEL.META_ARCHITECTURE == "RetinaNet")


@BACKBONE_REGISTRY.register()
def build_bottom_up_retinanet_fpn_backbone(cfg, input_shape: ShapeSpec):
    """FPN over ``MODEL.FPN.BOTTOM_UP`` with RetinaNet's p6/p7 from the top input."""
    return _fpn(cfg, input_shape, p6p7=True)
