"""The optimiser recipe the projects share (Mask2Former's): per-parameter groups (backbone
lr x ``SOLVER.BACKBONE_MULTIPLIER``, no weight decay on norms / embeddings / position
tables), ``SOLVER.OPTIMIZER`` SGD or AdamW, and gradient clipping of the whole model's norm
(``SOLVER.CLIP_GRADIENTS.CLIP_TYPE: full_model``) besides Detectron2's own clip types.
:func:`add_solver_config` adds the keys (Detectron2-like defaults: SGD, multiplier 1)."""
from __future__ import annotations

import torch
from torch import nn

from detectron2.solver.build import maybe_add_gradient_clipping

__all__ = ["add_solver_config", "build_optimizer"]

_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.GroupNorm,
          nn.InstanceNorm1d, nn.InstanceNorm2d, nn.LayerNorm, nn.LocalResponseNorm)


def _param_groups(cfg, model: nn.Module) -> list[dict]:
    s = cfg.SOLVER
    groups, seen = [], set()
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            lr, wd = s.BASE_LR, s.WEIGHT_DECAY
            if module_name.startswith("backbone"):
                lr *= s.BACKBONE_MULTIPLIER
            if name in ("relative_position_bias_table", "absolute_pos_embed", "pos_embed", "cls_token"):
                wd = 0.0
            if isinstance(module, _NORMS):
                wd = s.WEIGHT_DECAY_NORM
            if isinstance(module, nn.Embedding):
                wd = s.WEIGHT_DECAY_EMBED
            groups.append({"params": [p], "lr": lr, "weight_decay": wd})
    return groups


def _with_full_model_clipping(optim_cls, max_norm: float):
    class FullModelClipping(optim_cls):
        def step(self, closure=None):
            params = [p for group in self.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, max_norm)
            return super().step(closure=closure)

    FullModelClipping.__name__ = optim_cls.__name__ + "WithFullModelGradientClip"
    return FullModelClipping


def add_solver_config(cfg) -> None:
    """``SOLVER.OPTIMIZER``, ``BACKBONE_MULTIPLIER``, ``WEIGHT_DECAY_EMBED`` (kept if present)."""
    for key, value in (("OPTIMIZER", "SGD"), ("BACKBONE_MULTIPLIER", 1.0), ("WEIGHT_DECAY_EMBED", 0.0)):
        if key not in cfg.SOLVER:
            cfg.SOLVER[key] = value


def build_optimizer(cfg, model: nn.Module) -> torch.optim.Optimizer:
    s = cfg.SOLVER
    kind = s.OPTIMIZER.upper()
    if kind == "SGD":
        cls, kwargs = torch.optim.SGD, {"momentum": s.MOMENTUM}
    elif kind == "ADAMW":
        cls, kwargs = torch.optim.AdamW, {}
    else:
        raise ValueError(f"SOLVER.OPTIMIZER {s.OPTIMIZER!r}: use 'SGD' or 'ADAMW'")
    clip = s.CLIP_GRADIENTS
    full_model = clip.ENABLED and clip.CLIP_TYPE == "full_model" and clip.CLIP_VALUE > 0
    if full_model:
        cls = _with_full_model_clipping(cls, clip.CLIP_VALUE)
    optimizer = cls(_param_groups(cfg, model), s.BASE_LR, **kwargs)
    if not full_model:
        optimizer = maybe_add_gradient_clipping(cfg, optimizer)
    return optimizer
