"""Config keys of the DPT project (``MODEL.DPT``), added by :func:`add_dpt_config`."""
from detectron2.config import CfgNode as CN

from expedit_d2 import add_expedit_config


def add_dpt_config(cfg) -> None:
    """expedit-d2's keys plus ``MODEL.DPT`` (defaults: DPT-Hybrid on NYUv2). The project's
    expediting defaults (the official Expedit-DPT settings) are in configs/Base-DPT-NYUv2.yaml,
    not here: library defaults are not overridden behind the user's back."""
    add_expedit_config(cfg)
    cfg.MODEL.DPT = CN()
    # output width of act_postprocess{1..4}; DPT-Large [256, 512, 1024, 1024]. For the hybrid
    # the first two are the ResNet stage widths, taken from the backbone.
    cfg.MODEL.DPT.REASSEMBLE_FEATURES = [256, 512, 768, 768]
    cfg.MODEL.DPT.FUSION_FEATURES = 256
    # absolute depth from the head's output: 1 / (SCALE * out + SHIFT) (official NYUv2 values)
    cfg.MODEL.DPT.INVERT = True
    cfg.MODEL.DPT.SCALE = 0.000305
    cfg.MODEL.DPT.SHIFT = 0.1378
    # valid ground-truth depth for the training loss, metres
    cfg.MODEL.DPT.MIN_DEPTH = 1e-3
    cfg.MODEL.DPT.MAX_DEPTH = 10.0
