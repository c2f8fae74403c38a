"""The built-in cases of ``tools/benchmark_backbone.py``: Detectron2 backbone configs at
published settings, the settings of the other token-reduction methods at about their GMACs
(:func:`method_settings`, from each method's registered example), and segment-anything's
image encoders at the published Expedit-SAM rows (:class:`SamCase`, :func:`sam_method_settings`).

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
from ..methods import ExpeditSettings, PoolSettings, ToMeSettings
from ..reduction import ExampleTarget, example_settings, registered_methods, settings_from_config
from ..reduction.config import as_opts
from ..sam import PUBLISHED_SPEED, SAM_PRESETS, build_tiny_sam, sam_settings

__all__ = ["swin_l_cfg", "vit_hybrid_cfg", "vit_l16_cfg", "example_target", "method_settings", "methods", "SAM_ENCODERS",
           "SAM_ENCODER_COMMON", "SAM_TINY_DEPTH", "SAM_ROWS", "sam_method_settings", "sam_methods", "sam_setting_text",
           "build_sam_encoder", "SamCase", "CASES", "DEFAULT_CASES"]


def swin_l_cfg():
    """Swin-L (Mask2Former, 384 pretraining) with the COCO panoptic setting (docs/fidelity.md)."""
    cfg = get_cfg()
    add_expedit_config(cfg)
    s = cfg.MODEL.SWIN
    s.EMBED_DIM, s.DEPTHS, s.NUM_HEADS = 192, [2, 2, 18, 2], [6, 12, 24, 48]
    s.WINDOW_SIZE, s.PRETRAIN_IMG_SIZE = 12, 384
    cfg.MODEL.BACKBONE.NAME = "ExpeditD2SwinTransformer"
    e = cfg.MODEL.EXPEDIT
    cfg.MODEL.TOKEN_REDUCTION.BASE = "ExpeditD2SwinTransformer"
    e.CLUSTERING_LOCATION, e.NUM_CLUSTERS = 10, [8, 8]
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
    cfg.MODEL.TOKEN_REDUCTION.BASE = name
    e.CLUSTERING_LOCATION, e.NUM_CLUSTERS = alpha, clusters
    e.ITERS, e.WINDOW, e.TEMPERATURE, e.RECON_K, e.RECON_TEMPERATURE = 5, 5, 1.0, 20, 1.0
    e.RECONSTRUCTION = "nearest"  # what the official DPT release runs (docs/fidelity.md)
    return cfg


def vit_hybrid_cfg():
    """DPT-Hybrid (R50 + ViT-B/16) with the NYUv2 setting alpha 4, 16x16 (docs/fidelity.md)."""
    return _vit_cfg("D2ViTHybrid", [0, 1, 8, 11], 4, [16, 16])


def vit_l16_cfg():
    """ViT-L/16 (DPT-Large taps); the DPT clustering settings with alpha 8, 16x16 (no
    published setting for ViT-L: one third of the depth, like alpha 4 of 12)."""
    return _vit_cfg("D2ViT", [5, 11, 17, 23], 8, [16, 16], EMBED_DIM=1024, DEPTH=24, NUM_HEADS=16)


def example_target(family: str, cfg, size) -> ExampleTarget:
    """The expedit setting of a built-in case (``family`` "vit" or "swin", its config, its
    input (H, W)) as the target of every method's registered example: each method then has
    a setting of about the same mean tokens per block, and about the same GMACs."""
    e = cfg.MODEL.EXPEDIT
    if family == "swin":
        s = cfg.MODEL.SWIN
        return ExampleTarget("swin", sum(s.DEPTHS), (s.WINDOW_SIZE, s.WINDOW_SIZE), e.CLUSTERING_LOCATION,
                             tuple(e.NUM_CLUSTERS))
    v = cfg.MODEL.VIT
    grid = (size[0] // v.PATCH_SIZE, size[1] // v.PATCH_SIZE)
    return ExampleTarget("vit", v.DEPTH, grid, e.CLUSTERING_LOCATION, tuple(e.NUM_CLUSTERS))


def method_settings(family: str, cfg, size) -> dict[str, dict]:
    """{method: config keys} of every registered method for a built-in case
    (:func:`example_target`): e.g. on DPT-Hybrid at 640 x 480 (expedit alpha 4, 16 x 16),
    pooling to 16 x 16 after block 4, ToMe r 92 from block 0, EViT keeping 0.5 at blocks 3,
    6, 9."""
    return example_settings(example_target(family, cfg, size))


def methods() -> tuple[str, ...]:
    """The registered token-reduction methods (the ``--method`` choices)."""
    return tuple(registered_methods())

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

def sam_method_settings(method: str, expedit: ExpeditSettings, depth: int):
    """The settings of ``method`` for a SAM case whose expedit setting is ``expedit`` (a
    published row): expedit's own, else the method's registered example for it (every 14 x 14
    window reduced to the row's s x s right before the row's block alpha: pooling averages,
    ToMe merges 196 - s*s tokens of each window at once). None where the method has no
    setting for windowed ViTs."""
    if method == "expedit":
        return expedit
    ws = SAM_ENCODER_COMMON["window_size"]
    target = ExampleTarget("windowed", depth, (ws, ws), expedit.clustering_location, tuple(expedit.num_clusters))
    keys = example_settings(target).get(method)
    if keys is None:
        return None
    cfg = get_cfg()
    add_expedit_config(cfg)
    cfg.merge_from_list(as_opts(keys))
    return settings_from_config(cfg)


def sam_methods() -> tuple[str, ...]:
    """The methods with a setting for SAM's windows."""
    e = sam_settings(SAM_ROWS[0], SAM_TINY_DEPTH)
    return tuple(m for m in methods() if sam_method_settings(m, e, SAM_TINY_DEPTH) is not None)


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
        """The settings of ``method`` (one of :func:`sam_methods`) for this case."""
        settings = sam_method_settings(method, sam_settings(self.row, self.depth), self.depth)
        if settings is None:
            raise ValueError(f"--method {method} has no setting for SAM's windows (methods: {', '.join(sam_methods())})")
        return settings

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
