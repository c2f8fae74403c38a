"""Segment Anything (SAM) as its users run it, expedited: the official Expedit-SAM settings
in one place, a one-call patch of a ``Sam`` model, and the mask agreement measure of
``tools/sam_amg.py``.

    from segment_anything import SamAutomaticMaskGenerator, sam_model_registry
    from expedit_d2.sam import expedit_sam

    sam = expedit_sam(sam_model_registry["vit_h"](checkpoint="sam_vit_h_4b8939.pth"), "h_a8_81")
    masks = SamAutomaticMaskGenerator(sam).generate(image)  # SamPredictor works the same

The patch is :func:`expedit_d2.apply_patch` on ``sam.image_encoder`` (the ``"windowed"``
family, :mod:`expedit_d2.reduction.windowed`): every padded 14 x 14 window of the token grid
is clustered to s x s right before block alpha, the later blocks run on the clusters and
every window is reconstructed after the last block -- the official Expedit-SAM encoder's
arithmetic, on segment-anything's unmodified ``ImageEncoderViT`` (parameters and checkpoint
names untouched; ``remove_patch(sam.image_encoder)`` gives the base model back).

Sources of the presets (the official release, Expedit-LargeScale-Vision-Transformer/Expedit-SAM):

* README.md, the speed table: SAM ViT-H at 1024 on one 16 GB V100, automatic mask
  generation with 12 points per side and 144 points per batch (one decoder batch per image):
  1.27 images/s unexpedited, and five (clustering location, number of clusters) rows;
* scripts/benchmark.py, the script that times that setting: its ``--hourglass_*`` argument
  defaults, clustering location 6, 100 clusters, 5 iterations, temperature 5e-3 for
  clustering *and* reconstruction, clustering window 5, reconstruction k 20. The README's
  rows change only the location and the number of clusters, so they take the rest from
  these defaults. benchmark.py is the release's ``scripts/amg.py`` (which the README's
  command line runs with ``--use_hourglass``) with a timing loop; amg.py itself was not in
  the copy of the release we read, so ``h_amg`` is benchmark.py's argument block;
* app.py, the Gradio demo's two speed modes ("1.2x faster": location 16, 81 clusters;
  "1.5x faster": location 6, 81 clusters), run through ``HourglassImageEncoderViT``'s
  constructor defaults in segment_anything/modeling/hourglass_image_encoder.py (its latest
  version: 5 iterations, temperature 0.01, clustering window 5, k 20).

The official encoder takes ``hourglass_num_cluster`` as a square count (121 -> 11 x 11 per
window). Its temperatures multiply squared distances (softmax(-tau d), exp(-tau d)), as ours
do (:mod:`expedit_d2.ops`), so the values carry over unchanged.

The presets are ViT-H's (32 blocks). On a shallower encoder (ViT-L: 24, ViT-B: 12)
:func:`sam_settings` moves the clustering location to the same fraction of the depth,
round(alpha * depth / 32): our choice, not a published setting.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Sequence, Union

import numpy as np
import torch

from .expedit_backbone import ExpeditSettings
from .reduction import apply_patch

__all__ = ["SAM_PRESETS", "PRESET_SOURCES", "PUBLISHED_SPEED", "PUBLISHED_BASE_SPEED", "REFERENCE_DEPTH",
           "DEFAULT_PRESET", "official_settings", "sam_settings", "expedit_sam", "image_encoder_of", "build_tiny_sam",
           "mask_ious", "mean_best_iou", "best_iou_means"]

logger = logging.getLogger(__name__)

#: depth of the encoder the presets were published for (SAM ViT-H)
REFERENCE_DEPTH = 32

# scripts/benchmark.py (and scripts/amg.py) argument defaults
_AMG_ITERS, _AMG_TEMPERATURE, _AMG_WINDOW, _AMG_K = 5, 5e-3, 5, 20
# HourglassImageEncoderViT constructor defaults (hourglass_image_encoder.py, latest version)
_ENCODER_ITERS, _ENCODER_TEMPERATURE, _ENCODER_WINDOW, _ENCODER_K = 5, 0.01, 5, 20


def official_settings(clustering_location: int, num_cluster: int, iters: int = _AMG_ITERS,
                      temperature: float = _AMG_TEMPERATURE, window: int = _AMG_WINDOW,
                      k: int = _AMG_K) -> ExpeditSettings:
    """The official encoder's ``hourglass_*`` arguments as :class:`ExpeditSettings`:
    ``num_cluster`` is the number of clusters per window, a square (100 -> 10 x 10), and one
    temperature serves clustering and reconstruction, as in the official encoder."""
    side = math.isqrt(num_cluster) if isinstance(num_cluster, int) and num_cluster > 0 else 0
    if isinstance(num_cluster, bool) or side * side != num_cluster:
        raise ValueError(f"num_cluster={num_cluster!r} must be a square number of clusters per window "
                         "(81, 100, 121, ...), as the official hourglass_num_cluster")
    return ExpeditSettings(clustering_location=clustering_location, num_clusters=(side, side), iters=iters,
                           temperature=temperature, window=window, recon_k=k, recon_temperature=temperature)


#: name -> settings for SAM ViT-H (see the module's docstring for the sources)
SAM_PRESETS: dict[str, ExpeditSettings] = {
    # README.md speed table rows (location, clusters); the rest: scripts/benchmark.py defaults
    "h_a18_121": official_settings(18, 121),
    "h_a14_100": official_settings(14, 100),
    "h_a8_100": official_settings(8, 100),
    "h_a8_81": official_settings(8, 81),
    "h_a6_81": official_settings(6, 81),
    # scripts/benchmark.py's --hourglass_* defaults (amg.py's argument block): --use_hourglass alone
    "h_amg": official_settings(6, 100),
    # app.py speed modes over HourglassImageEncoderViT's constructor defaults
    "h_demo_1.2x": official_settings(16, 81, _ENCODER_ITERS, _ENCODER_TEMPERATURE, _ENCODER_WINDOW, _ENCODER_K),
    "h_demo_1.5x": official_settings(6, 81, _ENCODER_ITERS, _ENCODER_TEMPERATURE, _ENCODER_WINDOW, _ENCODER_K),
}

#: the preset the tool uses unless told otherwise: what the official amg.py runs
DEFAULT_PRESET = "h_amg"

#: name -> where its values come from
PRESET_SOURCES: dict[str, str] = {
    **{name: "Expedit-SAM README.md speed table row; iters/temperature/window/k: scripts/benchmark.py defaults"
       for name in ("h_a18_121", "h_a14_100", "h_a8_100", "h_a8_81", "h_a6_81")},
    "h_amg": "Expedit-SAM scripts/benchmark.py --hourglass_* defaults (its amg.py argument block)",
    "h_demo_1.2x": "Expedit-SAM app.py '1.2x faster'; the rest: HourglassImageEncoderViT defaults",
    "h_demo_1.5x": "Expedit-SAM app.py '1.5x faster'; the rest: HourglassImageEncoderViT defaults",
}

#: name -> (images/s, speed-up) published in the official README (ViT-H, 1024, one V100,
#: AMG with 12 points per side, 144 per batch; unexpedited: 1.27 images/s)
PUBLISHED_SPEED: dict[str, tuple[float, float]] = {
    "h_a18_121": (1.40, 1.10),
    "h_a14_100": (1.52, 1.19),
    "h_a8_100": (1.64, 1.30),
    "h_a8_81": (1.82, 1.44),
    "h_a6_81": (1.89, 1.49),
}
#: the README's unexpedited ViT-H speed, images/s
PUBLISHED_BASE_SPEED = 1.27


def image_encoder_of(model) -> torch.nn.Module:
    """``model.image_encoder`` of a ``Sam``, or the encoder itself."""
    encoder = getattr(model, "image_encoder", model)
    if not hasattr(encoder, "blocks") or not hasattr(encoder, "neck"):
        raise ValueError(f"{type(model).__name__} is neither a segment-anything Sam (with .image_encoder) "
                         "nor its ImageEncoderViT (with .blocks and .neck)")
    return encoder


def sam_settings(preset: Union[str, ExpeditSettings], depth: int = REFERENCE_DEPTH) -> ExpeditSettings:
    """The settings of ``preset`` (a name in :data:`SAM_PRESETS`) for an encoder of ``depth``
    blocks; a ViT-H preset's clustering location is moved to the same fraction of a
    shallower or deeper encoder, round(alpha * depth / 32). :class:`ExpeditSettings` are
    returned as they are (their location is the user's)."""
    if isinstance(preset, ExpeditSettings):
        return preset
    if not isinstance(preset, str) or preset not in SAM_PRESETS:
        raise ValueError(f"unknown SAM preset {preset!r}; the presets are: {', '.join(SAM_PRESETS)} "
                         "(or pass ExpeditSettings)")
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth must be a positive int (the encoder's number of blocks), got {depth!r}")
    settings = SAM_PRESETS[preset]
    if depth == REFERENCE_DEPTH:
        return settings
    alpha = min(depth - 1, math.floor(settings.clustering_location * depth / REFERENCE_DEPTH + 0.5))
    return dataclasses.replace(settings, clustering_location=alpha)


def expedit_sam(sam, preset: Union[str, ExpeditSettings] = DEFAULT_PRESET):
    """Patch ``sam.image_encoder`` (a segment-anything ``Sam``, or the encoder itself) in place
    with ``preset`` (a name in :data:`SAM_PRESETS`, scaled to the encoder's depth, or
    :class:`ExpeditSettings`) and return ``sam``. ``SamPredictor`` and
    ``SamAutomaticMaskGenerator`` run it unchanged; ``remove_patch(sam.image_encoder)``
    undoes it."""
    encoder = image_encoder_of(sam)
    settings = sam_settings(preset, len(encoder.blocks))
    if isinstance(preset, str) and settings.clustering_location != SAM_PRESETS[preset].clustering_location:
        logger.info(f"SAM preset {preset} (ViT-H, {REFERENCE_DEPTH} blocks) on a {len(encoder.blocks)}-block "
                    f"encoder: clustering before block {settings.clustering_location} instead of "
                    f"{SAM_PRESETS[preset].clustering_location}")
    apply_patch(encoder, settings)
    return sam


def build_tiny_sam(img_size: int = 416, embed_dim: int = 64, depth: int = 4, seed: int = 0, pos_scale: float = 5.0):
    """A small ``Sam`` with random weights and SAM's layout (segment-anything's own classes:
    16-pixel patches, 14 x 14 windows, relative positions, global attention in every second
    block, a two-way-transformer mask decoder), for smoke runs and tests. Its position
    embeddings, zeros in SAM's constructor, are a smooth random field (a 4 x 4 grid of
    N(0, pos_scale^2) values upsampled bilinearly): neighbouring tokens are alike and distant
    ones differ, as in a trained model, so that clustering has redundancy to remove
    (independent values per token would make every token unlike its neighbours), and
    distances are large enough for the presets' temperatures (5e-3, 0.01) to tell near from
    far clusters. The default 416 x 416 input makes a 26 x 26 token grid, padded to 28 x 28
    by the 14 x 14 windows, about as much padding as SAM's 64 -> 70."""
    from functools import partial

    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    if img_size % 16:
        raise ValueError(f"img_size={img_size} must be a multiple of the 16-pixel patches")
    torch.manual_seed(seed)
    prompt_dim, grid = 32, img_size // 16
    encoder = ImageEncoderViT(
        img_size=img_size, patch_size=16, embed_dim=embed_dim, depth=depth, num_heads=2, mlp_ratio=4,
        out_chans=prompt_dim, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), qkv_bias=True, use_rel_pos=True,
        global_attn_indexes=tuple(range(1, depth, 2)), window_size=14)
    with torch.no_grad():
        field = torch.randn(1, embed_dim, 4, 4) * pos_scale
        smooth = torch.nn.functional.interpolate(field, size=(grid, grid), mode="bilinear", align_corners=True)
        encoder.pos_embed.copy_(smooth.permute(0, 2, 3, 1))
    sam = Sam(
        image_encoder=encoder,
        prompt_encoder=PromptEncoder(embed_dim=prompt_dim, image_embedding_size=(grid, grid),
                                     input_image_size=(img_size, img_size), mask_in_chans=8),
        mask_decoder=MaskDecoder(num_multimask_outputs=3,
                                 transformer=TwoWayTransformer(depth=2, embedding_dim=prompt_dim, mlp_dim=64,
                                                               num_heads=2),
                                 transformer_dim=prompt_dim, iou_head_depth=3, iou_head_hidden_dim=32),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    return sam.eval()


def _flat_masks(masks, name: str) -> np.ndarray:
    if isinstance(masks, np.ndarray) and masks.ndim == 3:
        arrays = list(masks)
    elif isinstance(masks, Sequence) and not isinstance(masks, (str, bytes)):
        arrays = [np.asarray(m) for m in masks]
    else:
        raise ValueError(f"{name} must be a sequence of (H, W) masks or an (N, H, W) array, got "
                         f"{type(masks).__name__}")
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1 or any(len(s) != 2 for s in shapes):
        raise ValueError(f"{name}: masks must all be (H, W) of one size, got shapes {sorted(shapes)}")
    if not arrays:
        return np.zeros((0, 0), dtype=bool)
    return np.stack([a.astype(bool, copy=False).reshape(-1) for a in arrays])


def mask_ious(a, b, chunk: int = 1 << 18) -> np.ndarray:
    """(N, M) intersection over union of every mask of ``a`` with every mask of ``b`` (each a
    sequence of boolean (H, W) masks of one size, or an (N, H, W) array). Two empty masks
    have IoU 1 (they agree). Pixels are summed in chunks, so N x M masks of megapixel
    images need no N x H x W float copy."""
    A, B = _flat_masks(a, "a"), _flat_masks(b, "b")
    if len(A) and len(B) and A.shape[1] != B.shape[1]:
        raise ValueError(f"a and b are masks of different sizes ({A.shape[1]} vs {B.shape[1]} pixels)")
    inter = np.zeros((len(A), len(B)), dtype=np.float64)
    if len(A) and len(B):
        for start in range(0, A.shape[1], chunk):
            ta = torch.from_numpy(A[:, start:start + chunk]).float()
            tb = torch.from_numpy(B[:, start:start + chunk]).float()
            inter += (ta @ tb.T).double().numpy()  # counts below 2**24 per chunk: exact in float32
    areas_a = A.sum(1, dtype=np.float64)[:, None]
    areas_b = B.sum(1, dtype=np.float64)[None, :]
    union = areas_a + areas_b - inter
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def mean_best_iou(a, b) -> float | None:
    """For each mask of ``a``, its largest IoU with a mask of ``b`` (0 when ``b`` has none),
    averaged over ``a``; None when ``a`` has no masks. Not symmetric: (expedited, base) asks
    how well the base masks cover what the expedited model found, (base, expedited) the
    reverse."""
    return best_iou_means(mask_ious(a, b))[0]


def best_iou_means(ious: np.ndarray) -> tuple[float | None, float | None]:
    """:func:`mean_best_iou` both ways from one (N, M) :func:`mask_ious` matrix of ``a``
    against ``b``: (a to b, b to a)."""
    ious = np.asarray(ious, dtype=np.float64)

    def rows(m):
        if m.shape[0] == 0:
            return None
        return 0.0 if m.shape[1] == 0 else float(m.max(axis=1).mean())

    return rows(ious), rows(ious.T)
