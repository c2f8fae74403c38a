"""Backbone registry entries that put a token-reduction method on a plain backbone by config.

``MODEL.BACKBONE.NAME: "ExpeditBackbone"`` (also registered as ``"TokenReductionBackbone"``)
builds ``MODEL.EXPEDIT.BASE`` from Detectron2's ``BACKBONE_REGISTRY`` and patches it with
the method of ``MODEL.TOKEN_REDUCTION.METHOD`` (:func:`expedit_d2.reduction.apply_patch`).
Parameters are untouched, so any checkpoint of the base backbone loads as is.
``D2HourglassSwinTransformer`` reads the official Expedit Swin config keys.
"""
from __future__ import annotations

from detectron2.modeling import BACKBONE_REGISTRY

from . import backbones  # noqa: F401  (registers the plain backbones)

from .methods.expedit import ExpeditSettings, unexpedited_images
from .reduction.config import WRAPPER_BACKBONES, official_swin_values, settings_from_config
from .reduction.core import apply_patch

__all__ = ["ExpeditSettings", "expedite", "build_token_reduction_backbone", "unexpedited_images"]


def expedite(backbone, settings):
    """Patch ``backbone`` in place with ``settings`` (any method's; returns it)."""
    return apply_patch(backbone, settings)


def build_token_reduction_backbone(cfg, input_shape):
    """``MODEL.EXPEDIT.BASE`` from the registry, patched with the configured method."""
    base = cfg.MODEL.EXPEDIT.BASE
    if base in WRAPPER_BACKBONES or base == "D2HourglassSwinTransformer":
        raise ValueError(f"MODEL.EXPEDIT.BASE must name a plain backbone, got {base!r}")
    if base not in BACKBONE_REGISTRY:
        raise KeyError(f"MODEL.EXPEDIT.BASE {base!r} is not in Detectron2's BACKBONE_REGISTRY")
    settings = settings_from_config(cfg)  # validated before anything is built
    backbone = BACKBONE_REGISTRY.get(base)(cfg, input_shape)
    if settings is not None:
        apply_patch(backbone, settings)
    return backbone


for _name in WRAPPER_BACKBONES:
    BACKBONE_REGISTRY._do_register(_name, build_token_reduction_backbone)


def build_hourglass_swin(cfg, input_shape):
    """``D2HourglassSwinTransformer``: the official Expedit Swin config keys, mapped onto
    ``ExpeditBackbone`` over ``D2SwinTransformer``. ``MODEL.SWIN.CLUSTERING_LOCATION: -1``
    (the official default) builds the plain Swin, as the official code never clusters then."""
    try:
        values = official_swin_values(cfg)
    except ValueError as e:
        raise ValueError(f"{e} (official key of D2HourglassSwinTransformer)") from None
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.EXPEDIT.ENABLED, cfg.MODEL.EXPEDIT.BASE = True, "D2SwinTransformer"
    cfg.MODEL.TOKEN_REDUCTION.METHOD = "expedit"
    for key, value in values.items():
        cfg.MODEL.EXPEDIT[key.rsplit(".", 1)[-1]] = value
    return build_token_reduction_backbone(cfg, input_shape)


BACKBONE_REGISTRY._do_register("D2HourglassSwinTransformer", build_hourglass_swin)
