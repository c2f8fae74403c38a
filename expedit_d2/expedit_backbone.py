"""The one wrapping mechanism: build a registered backbone and install the hooks.

``MODEL.BACKBONE.NAME: "ExpeditBackbone"`` builds ``MODEL.EXPEDIT.BASE`` from Detectron2's
``BACKBONE_REGISTRY`` and, when ``MODEL.EXPEDIT.ENABLED``, hands it to the adapter of its
family, which installs token clustering/reconstruction hooks (the operators of
:mod:`expedit_d2.ops`). Parameters are untouched, so any checkpoint of the base backbone
loads as is. ``D2HourglassSwinTransformer`` is a thin alias reading the official Expedit
config keys.

Adding a backbone family = writing one adapter: a function ``(backbone, settings)`` that
installs the hooks, registered with :func:`register_adapter` for the backbone's class.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable

import torch.nn.functional as F
from torch import nn

from detectron2.modeling import BACKBONE_REGISTRY

from .backbones.swin import SwinTransformer, window_partition, window_reverse
from .backbones.vit import VisionTransformer
from .ops import (
    DEFAULT_MEMORY_LIMIT,
    RECONSTRUCTION_MODES,
    TokenClustering,
    TokenReconstruction,
    _pair,
    _positive_float,
    _positive_int,
    _window,
)

__all__ = ["ExpeditSettings", "expedite", "register_adapter", "build_expedit_backbone",
           "unexpedited_images"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExpeditSettings:
    """Where and how to cluster/reconstruct (``MODEL.EXPEDIT.*``)."""

    clustering_location: int  # alpha
    num_clusters: tuple[int, int]  # (h, w)
    iters: int = 5
    temperature: float = 0.05
    window: int = 7  # lambda
    recon_k: int = 10
    recon_temperature: float = 0.05
    memory_limit: int = DEFAULT_MEMORY_LIMIT
    reconstruction_mode: str = "topk"  # or "nearest" (the official DPT release)
    recon_subtract_min_distance: bool = False  # True: no underflow (not the official formula)
    swin_shift_mask: str = "official"  # or "consistent" (see SwinWindowExpedit)
    small_input: str = "skip"  # ViT input with fewer tokens than clusters: "skip" or "error"

    @classmethod
    def from_config(cls, cfg) -> "ExpeditSettings":
        e = cfg.MODEL.EXPEDIT
        nc = e.NUM_CLUSTERS
        if isinstance(nc, int):
            nc = (nc, nc)
        if len(nc) != 2:
            raise ValueError(f"MODEL.EXPEDIT.NUM_CLUSTERS must be [h, w], got {nc!r}")
        return cls(int(e.CLUSTERING_LOCATION), (int(nc[0]), int(nc[1])), e.ITERS,
                   e.TEMPERATURE, e.WINDOW, e.RECON_K, e.RECON_TEMPERATURE,
                   int(e.MEMORY_LIMIT_MB * 2**20), e.RECONSTRUCTION,
                   e.RECON_SUBTRACT_MIN_DISTANCE, e.SWIN_SHIFT_MASK, e.SMALL_INPUT)

    def __post_init__(self):
        """Validate every field, naming its config key."""
        key = "MODEL.EXPEDIT."
        _pair(self.num_clusters, key + "NUM_CLUSTERS")
        _positive_int(self.iters, key + "ITERS")
        _positive_float(self.temperature, key + "TEMPERATURE")
        _window(self.window, key + "WINDOW")
        _positive_int(self.recon_k, key + "RECON_K")
        _positive_float(self.recon_temperature, key + "RECON_TEMPERATURE")
        _positive_int(self.memory_limit, key + "MEMORY_LIMIT_MB (in bytes)")
        if self.reconstruction_mode not in RECONSTRUCTION_MODES:
            raise ValueError(f"{key}RECONSTRUCTION must be one of {list(RECONSTRUCTION_MODES)}, "
                             f"got {self.reconstruction_mode!r}")
        if not isinstance(self.recon_subtract_min_distance, bool):
            raise ValueError(f"{key}RECON_SUBTRACT_MIN_DISTANCE must be True or False, "
                             f"got {self.recon_subtract_min_distance!r}")
        if self.small_input not in SMALL_INPUT_MODES:
            raise ValueError(f"{key}SMALL_INPUT must be 'skip' or 'error', got {self.small_input!r}")
        if self.swin_shift_mask not in SWIN_SHIFT_MASKS:
            raise ValueError(f"{key}SWIN_SHIFT_MASK must be one of {list(SWIN_SHIFT_MASKS)}, "
                             f"got {self.swin_shift_mask!r}")

    def clustering(self) -> TokenClustering:
        return TokenClustering(self.num_clusters, self.iters, self.temperature, self.window,
                               self.memory_limit)

    def reconstruction(self) -> TokenReconstruction:
        return TokenReconstruction(self.recon_k, self.recon_temperature, self.memory_limit,
                                   self.reconstruction_mode, self.recon_subtract_min_distance)


#: MODEL.EXPEDIT.SWIN_SHIFT_MASK values, see :class:`SwinWindowExpedit`.
SWIN_SHIFT_MASKS = ("official", "consistent")
#: MODEL.EXPEDIT.SMALL_INPUT values, see :class:`ViTTokenExpedit`.
SMALL_INPUT_MODES = ("skip", "error")
#: CLUSTERING_LOCATION that means "not expedited" (the official default and meaning).
NOT_EXPEDITED = -1


_ADAPTERS: dict[type, Callable] = {}


def register_adapter(cls: type):
    """Decorator: ``@register_adapter(MyBackbone) def hook_mine(backbone, settings): ...``."""

    def deco(fn):
        _ADAPTERS[cls] = fn
        return fn

    return deco


def expedite(backbone: nn.Module, settings: ExpeditSettings) -> nn.Module:
    """Install clustering/reconstruction hooks on ``backbone`` (in place; returns it)."""
    for cls in type(backbone).__mro__:
        if cls in _ADAPTERS:
            _ADAPTERS[cls](backbone, settings)
            return backbone
    known = ", ".join(sorted(c.__name__ for c in _ADAPTERS))
    raise ValueError(
        f"MODEL.EXPEDIT.BASE builds {type(backbone).__name__}, which has no expedit adapter "
        f"(backbones with one: {known})"
    )


def build_expedit_backbone(cfg, input_shape):
    """``ExpeditBackbone``: ``MODEL.EXPEDIT.BASE`` from the registry, hooks installed."""
    base = cfg.MODEL.EXPEDIT.BASE
    if base in ("ExpeditBackbone", "D2HourglassSwinTransformer"):
        raise ValueError(f"MODEL.EXPEDIT.BASE must name a plain backbone, got {base!r}")
    if base not in BACKBONE_REGISTRY:
        raise KeyError(f"MODEL.EXPEDIT.BASE {base!r} is not in Detectron2's BACKBONE_REGISTRY")
    backbone = BACKBONE_REGISTRY.get(base)(cfg, input_shape)
    if cfg.MODEL.EXPEDIT.ENABLED and cfg.MODEL.EXPEDIT.CLUSTERING_LOCATION != NOT_EXPEDITED:
        expedite(backbone, ExpeditSettings.from_config(cfg))
    return backbone


build_expedit_backbone.__name__ = "ExpeditBackbone"
BACKBONE_REGISTRY.register(build_expedit_backbone)


def build_hourglass_swin(cfg, input_shape):
    """``D2HourglassSwinTransformer``: the official Expedit Swin config keys, mapped onto
    ``ExpeditBackbone`` over ``D2SwinTransformer``. ``MODEL.SWIN.CLUSTERING_LOCATION: -1``
    (the official default) builds the plain Swin, as the official code never clusters then."""
    s = cfg.MODEL.SWIN
    side = math.isqrt(int(s.TOKEN_CLUSTERING_BLOCK.NUM_SPIXELS))
    if side * side != s.TOKEN_CLUSTERING_BLOCK.NUM_SPIXELS:
        raise ValueError("MODEL.SWIN.TOKEN_CLUSTERING_BLOCK.NUM_SPIXELS must be a square "
                         f"(clusters per window), got {s.TOKEN_CLUSTERING_BLOCK.NUM_SPIXELS}")
    cfg = cfg.clone()
    cfg.defrost()
    e = cfg.MODEL.EXPEDIT
    e.ENABLED, e.BASE = True, "D2SwinTransformer"
    e.CLUSTERING_LOCATION = s.CLUSTERING_LOCATION
    e.NUM_CLUSTERS = [side, side]
    e.ITERS = s.TOKEN_CLUSTERING_BLOCK.N_ITERS
    e.TEMPERATURE = s.TOKEN_CLUSTERING_BLOCK.TEMPERATURE
    e.WINDOW = s.TOKEN_CLUSTERING_BLOCK.WINDOW_SIZE
    e.RECON_K = s.TOKEN_RECONSTRUCTION_BLOCK.K
    e.RECON_TEMPERATURE = s.TOKEN_RECONSTRUCTION_BLOCK.TEMPERATURE
    return build_expedit_backbone(cfg, input_shape)


build_hourglass_swin.__name__ = "D2HourglassSwinTransformer"
BACKBONE_REGISTRY.register(build_hourglass_swin)


# ======================================================================================
# Swin adapter
# ======================================================================================
class SwinWindowExpedit(nn.Module):
    """Stage hook: per-window clustering before block ``block_index`` of the stage, the
    rest of the stage on the cluster map with window s (blocks roll by s // 2, resized
    relative-position bias), per-window reconstruction at the end of the stage (before
    patch merging). No parameters.

    The shifted-window mask of the blocks after clustering: ``shift_mask="official"`` cuts
    its regions at the stage's original shift (trained window // 2, 6 for Swin-L) while the
    blocks roll by s // 2, as the official HourglassBasicLayer does (the published numbers
    came from it); ``"consistent"`` cuts them at s // 2.

    Shapes: x (B, H*W, C) -> pad to (Hp, Wp) multiples of the window ws -> windows
    (B*nW, ws*ws, C) -> clusters (B*nW, s*s, C) -> map (B, Hp/ws*s, Wp/ws*s, C) ->
    later blocks -> reconstruction (B*nW, ws*ws, C) -> crop -> (B, H*W, C).
    """

    def __init__(self, block_index: int, settings: ExpeditSettings):
        super().__init__()
        self.block_index = block_index
        self.clustering = settings.clustering()
        self.reconstruction = settings.reconstruction()
        self.shift_mask = settings.swin_shift_mask

    def forward(self, stage, x, H, W):
        ws = stage.window_size
        s = self.clustering.num_clusters[0]
        x = stage.run_blocks(x, H, W, 0, self.block_index)
        B, _, C = x.shape
        Hp, Wp = H + (-H) % ws, W + (-W) % ws
        grid = F.pad(x.view(B, H, W, C), (0, 0, 0, Wp - W, 0, Hp - H))  # zeros take part
        clusters, state = self.clustering(window_partition(grid, ws), (ws, ws))
        h2, w2 = Hp // ws * s, Wp // ws * s
        y = window_reverse(clusters, s, h2, w2).reshape(B, h2 * w2, C)
        mask_shift = ws // 2 if self.shift_mask == "official" else s // 2
        y = stage.run_blocks(y, h2, w2, self.block_index, None, window_size=s, mask_shift=mask_shift)
        full = self.reconstruction(window_partition(y.view(B, h2, w2, -1), s), state)
        return window_reverse(full, ws, Hp, Wp)[:, :H, :W].reshape(B, H * W, -1)

    def extra_repr(self) -> str:
        return f"block_index={self.block_index}, shift_mask={self.shift_mask}"


@register_adapter(SwinTransformer)
def expedite_swin(backbone: SwinTransformer, settings: ExpeditSettings) -> None:
    alpha, depths = settings.clustering_location, backbone.depths
    if not 0 <= alpha < sum(depths):
        raise ValueError(
            f"MODEL.EXPEDIT.CLUSTERING_LOCATION={alpha} is outside this Swin's blocks "
            f"0..{sum(depths) - 1} (depths {list(depths)})"
        )
    h, w = settings.num_clusters
    ws = backbone.layers[0].window_size
    if h != w or h > ws:
        raise ValueError(
            f"MODEL.EXPEDIT.NUM_CLUSTERS={[h, w]}: Swin clusters each {ws}x{ws} attention "
            f"window into a square s x s grid with s <= {ws}"
        )
    if settings.reconstruction_mode == "topk" and settings.recon_k > h * w:
        raise ValueError(f"MODEL.EXPEDIT.RECON_K={settings.recon_k} exceeds the {h}x{w} "
                         "clusters of a window")
    for stage in backbone.layers:
        stage.expedit = None
    first = 0
    for stage, depth in zip(backbone.layers, depths):
        if alpha < first + depth:
            stage.expedit = SwinWindowExpedit(alpha - first, settings)
            return
        first += depth


# ======================================================================================
# ViT adapter (plain and hybrid)
# ======================================================================================
class ViTTokenExpedit(nn.Module):
    """Global clustering of the patch tokens right after block ``location`` (the cls
    token passes through), reconstruction of every tap after it. No parameters.

    Shapes: (B, 1 + H*W, C) -> clusters (B, 1 + h*w, C) -> taps (B, 1 + H*W, C).
    """

    def __init__(self, location: int, settings: ExpeditSettings):
        super().__init__()
        self.location = location
        self.clustering = settings.clustering()
        self.reconstruction = settings.reconstruction()
        self.small_input = settings.small_input
        #: images run unexpedited because their token grid was smaller than the cluster
        #: grid (a count for the evaluation's results; not a parameter, not a buffer)
        self.unexpedited_images = 0

    def cluster(self, x, grid):
        """(B, 1 + H*W, C) -> (clusters, state); an input whose token grid is smaller than
        the cluster grid is left as it is, state None (or an error, SMALL_INPUT "error")."""
        h, w = self.clustering.num_clusters
        if h > grid[0] or w > grid[1]:
            message = (f"MODEL.EXPEDIT.NUM_CLUSTERS={[h, w]} is larger than this input's token "
                       f"grid {list(grid)} (rows, columns)")
            if self.small_input == "error":
                raise ValueError(message)
            if self.unexpedited_images == 0:
                logger.warning(f"{message}: such inputs run unexpedited (MODEL.EXPEDIT.SMALL_INPUT "
                               "'skip'); they are counted, this is said once")
            self.unexpedited_images += x.shape[0]
            return x, None
        return self.clustering(x, grid, num_prefix_tokens=1)

    def reconstruct(self, x, state):
        if x.shape[1] == state.tokens.shape[1] + state.num_prefix_tokens:
            return x  # as many clusters as tokens: the official hook leaves such taps as they are
        return self.reconstruction(x, state)

    def extra_repr(self) -> str:
        return f"location={self.location}"


@register_adapter(VisionTransformer)
def expedite_vit(backbone: VisionTransformer, settings: ExpeditSettings) -> None:
    alpha = settings.clustering_location
    if not 0 <= alpha < backbone.depth:
        raise ValueError(
            f"MODEL.EXPEDIT.CLUSTERING_LOCATION={alpha} is outside this ViT's blocks "
            f"0..{backbone.depth - 1} (clustering happens right after block alpha)")
    h, w = settings.num_clusters
    if settings.reconstruction_mode == "topk" and settings.recon_k > h * w:
        raise ValueError(f"MODEL.EXPEDIT.RECON_K={settings.recon_k} exceeds the {h}x{w} clusters")
    backbone.expedit = ViTTokenExpedit(alpha, settings)


def unexpedited_images(model: nn.Module) -> int:
    """How many images the hooks in ``model`` ran unexpedited (token grid smaller than the
    cluster grid, ``MODEL.EXPEDIT.SMALL_INPUT: skip``) since it was built."""
    return sum(getattr(m, "unexpedited_images", 0) for m in model.modules())
