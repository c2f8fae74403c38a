"""Backbone registry entries that put a token-reduction method on a plain backbone by config.

``MODEL.BACKBONE.NAME: "TokenReductionBackbone"`` (alias ``"ExpeditBackbone"``, its earlier
name) builds ``MODEL.TOKEN_REDUCTION.BASE`` (alias ``MODEL.EXPEDIT.BASE``) from Detectron2's ``BACKBONE_REGISTRY`` and patches it with
the method of ``MODEL.TOKEN_REDUCTION.METHOD`` (:func:`expedit_d2.reduction.apply_patch`).
``BASE`` may name any registered backbone of a family, the user's own included (the
``D2SwinTransformer`` of their Mask2Former, OneFormer or MaskDINO project). A base that
follows no family itself but wraps a ViT that does as ``net`` -- ViTDet's simple feature
pyramid, ours (``ExpeditD2ViTDet``) or a newer Detectron2's -- keeps its pyramid and has its
``net`` patched (:func:`reduction_target`): the entry a Detectron2 user names is the whole
backbone, and the reduction goes where the tokens are. Parameters are untouched, so any
checkpoint of the base backbone loads as is.

Importing expedit-d2 registers no name that other projects register. The official names
that our projects' YAMLs use, ``D2SwinTransformer`` and ``D2HourglassSwinTransformer`` (the
official Expedit Swin config keys), are registered by
:func:`register_official_backbone_names`, each only where no one registered it before.
"""
from __future__ import annotations

from detectron2.modeling import BACKBONE_REGISTRY
from torch import nn

from . import backbones  # noqa: F401  (registers the plain backbones)

from .methods.expedit import ExpeditSettings, unexpedited_images
from .reduction.config import (BASE_KEYS, WRAPPER_BACKBONES, base_backbone_name, config_value, official_swin_values,
                               settings_from_config)
from .reduction.core import apply_patch, family_of

__all__ = ["ExpeditSettings", "build_token_reduction_backbone", "build_hourglass_swin",
           "reduction_target", "register_official_backbone_names", "unexpedited_images"]


def _follows_a_family(module) -> bool:
    try:
        family_of(module)
    except ValueError:
        return False
    return True


def reduction_target(backbone):
    """The module of ``backbone`` that a method patches: the backbone itself where it follows
    a family; else its ``net`` where that one does (ViTDet's ``SimpleFeaturePyramid`` around
    its ViT); else the backbone, which :func:`apply_patch` then refuses, naming what it lacks."""
    if _follows_a_family(backbone):
        return backbone
    net = getattr(backbone, "net", None)
    return net if isinstance(net, nn.Module) and _follows_a_family(net) else backbone


def build_token_reduction_backbone(cfg, input_shape):
    """``MODEL.TOKEN_REDUCTION.BASE`` (alias ``MODEL.EXPEDIT.BASE``) from the registry,
    patched with the configured method."""
    base = base_backbone_name(cfg)
    key = BASE_KEYS[0] if config_value(cfg, BASE_KEYS[0], "") else BASE_KEYS[1]
    if base in WRAPPER_BACKBONES or base == "D2HourglassSwinTransformer":
        raise ValueError(f"{key} must name a plain backbone, got {base!r}")
    if base not in BACKBONE_REGISTRY:
        raise KeyError(f"{key} {base!r} is not in Detectron2's BACKBONE_REGISTRY (import the "
                       f"project that registers it first; expedit-d2's own Swin is {OUR_SWIN!r})")
    settings = settings_from_config(cfg)  # validated before anything is built
    backbone = BACKBONE_REGISTRY.get(base)(cfg, input_shape)
    if settings is not None:
        apply_patch(reduction_target(backbone), settings)
    return backbone


for _name in WRAPPER_BACKBONES:
    BACKBONE_REGISTRY._do_register(_name, build_token_reduction_backbone)


def build_hourglass_swin(cfg, input_shape):
    """``D2HourglassSwinTransformer``: the official Expedit Swin config keys, mapped onto
    ``TokenReductionBackbone`` over the Swin registered as ``D2SwinTransformer`` (ours where no one
    else registered it). ``MODEL.SWIN.CLUSTERING_LOCATION: -1`` (the official default)
    builds the plain Swin, as the official code never clusters then."""
    try:
        values = official_swin_values(cfg)
    except ValueError as e:
        raise ValueError(f"{e} (official key of D2HourglassSwinTransformer)") from None
    cfg = cfg.clone()
    cfg.defrost()
    base = "D2SwinTransformer" if "D2SwinTransformer" in BACKBONE_REGISTRY else OUR_SWIN
    cfg.MODEL.EXPEDIT.ENABLED = True
    cfg.MODEL.TOKEN_REDUCTION.BASE, cfg.MODEL.EXPEDIT.BASE = base, base
    cfg.MODEL.TOKEN_REDUCTION.METHOD = "expedit"
    for key, value in values.items():
        cfg.MODEL.EXPEDIT[key.rsplit(".", 1)[-1]] = value
    return build_token_reduction_backbone(cfg, input_shape)


#: our Swin's own registry name
OUR_SWIN = "ExpeditD2SwinTransformer"


def official_backbone_names() -> dict:
    """The official registry names our projects' YAMLs use -> what we register under them."""
    return {"D2SwinTransformer": BACKBONE_REGISTRY.get(OUR_SWIN),
            "D2HourglassSwinTransformer": build_hourglass_swin}


def register_official_backbone_names() -> list[str]:
    """Register ``D2SwinTransformer`` (our Swin) and ``D2HourglassSwinTransformer`` (the
    official Expedit keys) in Detectron2's ``BACKBONE_REGISTRY``, each only where the name is
    free: a project that registered its own keeps it. Called by our Mask2Former project so
    that the official YAMLs build unchanged; returns the names registered by this call."""
    done = []
    for name, obj in official_backbone_names().items():
        if name not in BACKBONE_REGISTRY:
            BACKBONE_REGISTRY._do_register(name, obj)
            done.append(name)
    return done
