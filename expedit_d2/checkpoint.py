"""Key maps from official checkpoint layouts onto our modules.

* Mask2Former model-zoo ``.pkl`` files need no map: our backbone's names are the
  official ones under ``backbone.``; Detectron2's ``DetectionCheckpointer`` loads them.
* DPT ``.pt`` files hold a plain state dict whose backbone lives under
  ``pretrained.model.`` (timm's ViT / ViT-Hybrid names): :func:`dpt_backbone_state_dict`
  strips the prefix so it loads with ``strict=True`` into ``D2ViT`` / ``D2ViTHybrid`` /
  ``ExpeditBackbone``.
"""
from __future__ import annotations

import os

import torch

__all__ = ["DPT_BACKBONE_PREFIX", "read_state_dict", "dpt_backbone_state_dict"]

DPT_BACKBONE_PREFIX = "pretrained.model."


def read_state_dict(path: str) -> dict:
    """A state dict from a ``.pt``/``.pth`` file (a bare state dict, or one under "model"
    or "state_dict"); raises naming the file if it is missing or not a state dict."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    data = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict"):
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return data


def dpt_backbone_state_dict(state_dict: dict) -> dict:
    """The ``pretrained.model.*`` entries of a DPT state dict, prefix removed."""
    out = {k[len(DPT_BACKBONE_PREFIX):]: v for k, v in state_dict.items()
           if k.startswith(DPT_BACKBONE_PREFIX)}
    if not out:
        some = ", ".join(list(state_dict)[:3])
        raise KeyError(f"no '{DPT_BACKBONE_PREFIX}*' keys: not a DPT checkpoint (keys start: {some})")
    return out
