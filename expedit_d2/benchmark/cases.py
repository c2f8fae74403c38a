"""The built-in cases of ``tools/benchmark_backbone.py``: Detectron2 backbone configs at
published settings, the settings of the other token-reduction methods at about their GMACs
(:data:`METHOD_SETTINGS`), and segment-anything's image encoders at the published
Expedit-SAM rows (:class:`SamCase`, :data:`SAM_METHODS`).

:data:`CASES` maps a case's name to ``(config factory, (H, W), description)`` or to a
:class:`SamCase`; :data:`DEFAULT_CASES` are those run when none are named.
"""
from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple

import torch
from detectron2.config import get_cfg
from torch import nn

from ..config import add_expedit_config
from ..methods import PoolSettings, ToMeSettings
from ..sam import PUBLISHED_SPEED, SAM_PRESETS, build_tiny_sam, sam_settings

__all__ = ["swin_l_cfg", "vit_hybrid_cfg", "vit_l16_cfg", "METHOD_SETTINGS", "METHODS", "SAM_ENCODERS",
           "SAM_ENCODER_COMMON", "SAM_TINY_DEPTH", "SAM_ROWS", "SAM_METHODS", "sam_setting_text",
           "build_sam_encoder", "SamCase", "CASES", "DEFAULT_CASES"]


def swin_l_cfg():
    """Swin-L (Mask2Former, 384 pretraining) with the COCO panoptic setting (SPEC 5)."""
    cfg = get_cfg()
    add_expedit_config(cfg)
    s = cfg.MODEL.SWIN
    s.EMBED_DIM, s.DEPTHS, s.NUM_HEADS = 192, [2, 2, 18, 2], [6, 12, 24, 48]
    s.WINDOW_SIZE, s.PRETRAIN_IMG_SIZE = 12, 384
    cfg.MODEL.BACKBONE.NAME = "ExpeditD2SwinTransformer"
    e = cfg.MODEL.EXPEDIT
    e.BASE, e.CLUSTERING_LOCATION, e.NUM_CLUSTERS = "ExpeditD2SwinTransformer", 10, [8, 8]
    e.ITERS, e.WINDOW, e.TEMPERATURE, e.RECON_K, e.RECON_TEMPERATURE = 5, 7, 0.05, 10, 0.05
    return cfg


def _vit_cfg(name, taps, alpha, clusters, **vit):
    cfg = get_cfg()
    add_expedit_config(cfg)
    cfg.MODEL.BACKBONE.NAME = name
    for k, v in vit.items():
        setattr(cfg.MODEL.VIT, k, v)
    cfg.MODEL.VIT.TAPS = taps
    e = cfg.MODEL.EXPEDIT
    e.BASE, e.CLUSTERING_LOCATION, e.NUM_CLUSTERS = name, alpha, clusters
    e.ITERS, e.WINDOW, e.TEMPERATURE, e.RECON_K, e.RECON_TEMPERATURE = 5, 5, 1.0, 20, 1.0
    e.RECONSTRUCTION = "nearest"  # what the official DPT release runs (SPEC 3)
    return cfg


def vit_hybrid_cfg():
    """DPT-Hybrid (R50 + ViT-B/16) with the NYUv2 setting alpha 4, 16x16 (SPEC 5)."""
    return _vit_cfg("D2ViTHybrid", [0, 1, 8, 11], 4, [16, 16])


def vit_l16_cfg():
    """ViT-L/16 (DPT-Large taps); the DPT clustering settings with alpha 8, 16x16 (no
    published setting for ViT-L: one third of the depth, like alpha 4 of 12)."""
    return _vit_cfg("D2ViT", [5, 11, 17, 23], 8, [16, 16], EMBED_DIM=1024, DEPTH=24, NUM_HEADS=16)


#: per method, a setting of the built-in ViT cases with about the GMACs of their expedit
#: setting (DPT-Hybrid alpha 4, 16x16: ratio 0.61 at 640x480): pool to the same grid at the
#: same block, ToMe merging from block 0, EViT keeping half the tokens at blocks 3, 6, 9
METHOD_SETTINGS = {
    "vit": {
        "tome": {"MODEL.TOKEN_REDUCTION.TOME.R": 90, "MODEL.TOKEN_REDUCTION.TOME.START_BLOCK": 0},
        "evit": {"MODEL.TOKEN_REDUCTION.EVIT.LOCATIONS": [3, 6, 9], "MODEL.TOKEN_REDUCTION.EVIT.KEEP_RATE": 0.5},
        "pool": {"MODEL.TOKEN_REDUCTION.POOL.LOCATION": 4, "MODEL.TOKEN_REDUCTION.POOL.SIZE": [16, 16]},
    },
    "swin": {
        "pool": {"MODEL.TOKEN_REDUCTION.POOL.LOCATION": 10, "MODEL.TOKEN_REDUCTION.POOL.SIZE": [8, 8]},
    },
}
METHODS = ("expedit", "tome", "evit", "pool")

# --------------------------------------------------------------------------------------
# SAM image encoders: segment-anything's ImageEncoderViT, built as sam_model_registry builds
# it (not a Detectron2 backbone), at the published Expedit-SAM rows
# --------------------------------------------------------------------------------------
#: ImageEncoderViT's arguments per model type, as segment-anything's build_sam.py gives them
SAM_ENCODERS = {
    "vit_b": dict(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11)),
    "vit_l": dict(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23)),
    "vit_h": dict(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31)),
}
#: the arguments build_sam.py gives every model type (norm_layer: LayerNorm, eps 1e-6)
SAM_ENCODER_COMMON = dict(img_size=1024, patch_size=16, mlp_ratio=4, qkv_bias=True, use_rel_pos=True,
                          window_size=14, out_chans=256)
#: depth of the "tiny" encoder (expedit_d2.sam.build_tiny_sam's default: SAM's layout, 4 blocks)
SAM_TINY_DEPTH = 4
#: the published Expedit-SAM rows (official README speed table, ViT-H on a V100)
SAM_ROWS = tuple(PUBLISHED_SPEED)

#: per method, the setting of a SAM case at about the GMACs of its expedit row: every 14 x 14
#: window reduced to the row's s x s right before the row's block alpha (pool: average pooling;
#: ToMe: merging 196 - s*s tokens of each window at once)
SAM_METHODS = {
    "expedit": lambda e: e,
    "pool": lambda e: PoolSettings(location=e.clustering_location, size=tuple(e.num_clusters)),
    "tome": lambda e: ToMeSettings(r=SAM_ENCODER_COMMON["window_size"] ** 2 - e.num_clusters[0] ** 2,
                                   start_block=e.clustering_location),
}


def sam_setting_text(settings) -> str:
    """A SAM case's setting in a few words (the table's)."""
    if isinstance(settings, PoolSettings):
        return f"pool before block {settings.location} to {settings.size[0]}x{settings.size[1]}/window"
    if isinstance(settings, ToMeSettings):
        side = math.isqrt(SAM_ENCODER_COMMON["window_size"] ** 2 - settings.r)
        return f"tome r {settings.r}/window before block {settings.start_block} ({side}x{side}/window)"
    (h, w), e = settings.num_clusters, settings
    return (f"expedit alpha {e.clustering_location}, {h}x{w}/window (iters {e.iters}, temperature "
            f"{e.temperature:g}, window {e.window}, k {e.recon_k})")


def build_sam_encoder(model_type: str, img_size: int = 1024, seed: int = 0) -> nn.Module:
    """segment-anything's ``ImageEncoderViT`` of ``model_type`` ("vit_b", "vit_l", "vit_h" with
    ``sam_model_registry``'s arguments; "tiny": :func:`expedit_d2.sam.build_tiny_sam`'s
    encoder) for ``img_size`` x ``img_size`` inputs, random weights (seeded)."""
    if model_type == "tiny":
        return build_tiny_sam(img_size=img_size, depth=SAM_TINY_DEPTH, seed=seed).image_encoder
    from segment_anything.modeling import ImageEncoderViT

    torch.manual_seed(seed)
    return ImageEncoderViT(**{**SAM_ENCODER_COMMON, "img_size": img_size}, **SAM_ENCODERS[model_type],
                           norm_layer=partial(nn.LayerNorm, eps=1e-6))


class SamCase(NamedTuple):
    """A SAM image encoder at a published Expedit-SAM row (a name in
    :data:`expedit_d2.sam.SAM_PRESETS`), scaled to the encoder's depth by
    :func:`expedit_d2.sam.sam_settings`."""

    model_type: str
    row: str
    size: int = 1024

    @property
    def depth(self) -> int:
        return SAM_TINY_DEPTH if self.model_type == "tiny" else SAM_ENCODERS[self.model_type]["depth"]

    def settings(self, method: str):
        """The settings of ``method`` (a key of :data:`SAM_METHODS`) for this case."""
        return SAM_METHODS[method](sam_settings(self.row, self.depth))

    @property
    def what(self) -> str:
        e, published = sam_settings(self.row, self.depth), SAM_PRESETS[self.row]
        s = e.num_clusters[0]
        scaled = "" if self.depth == 32 else (
            f", ViT-H row alpha {published.clustering_location} scaled to {self.depth} blocks")
        return f"SAM {self.model_type} image encoder, Expedit-SAM row {self.row} (alpha {e.clustering_location}, " \
               f"{s}x{s}/window{scaled})"


CASES = {
    "swin_l_640": (swin_l_cfg, (640, 640), "Swin-L, COCO panoptic setting (alpha 10, 8x8/window)"),
    "swin_l_1024": (swin_l_cfg, (1024, 1024), "Swin-L, COCO panoptic setting (alpha 10, 8x8/window)"),
    "vit_hybrid_640x480": (vit_hybrid_cfg, (480, 640), "DPT-Hybrid backbone, NYUv2 setting (alpha 4, 16x16)"),
    "vit_l16_640x480": (vit_l16_cfg, (480, 640), "ViT-L/16 DPT taps (alpha 8, 16x16)"),
}
#: what runs without --cases: the Detectron2 backbones (the SAM cases run when named)
DEFAULT_CASES = tuple(CASES)
CASES.update({f"sam_{model_type}_1024_{row[2:]}": SamCase(model_type, row)
              for model_type in ("vit_b", "vit_h") for row in SAM_ROWS})
CASES["sam_tiny_416_a8_81"] = SamCase("tiny", "h_a8_81", 416)  # smoke runs: seconds on a CPU
