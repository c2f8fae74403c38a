"""Expedit (Liang et al., NeurIPS 2022) as a token-reduction method: settings and patches.

The operators are in :mod:`expedit_d2.ops`; this file says where they go:

* ``"swin"`` -- per attention window: cluster every ws x ws window to s x s right before
  global block alpha, run the rest of that stage on the cluster map (window s), reconstruct
  every window at the end of the stage (docs/methods.md, "Where it acts");
* ``"windowed"`` -- per window, the official Expedit-SAM arithmetic: cluster every padded
  ws x ws window to s x s right before block alpha, later window blocks attend in windows of
  s and global blocks on the stitched grid, top-k reconstruction window by window after the
  last block (the padding cropped);
* ``"vit"`` -- global: cluster the grid tokens to h x w right after block alpha (prefix
  tokens pass through), reconstruct every tap after it; a tap at block alpha is the block's
  exact output (taken before clustering), as the official forward hook records it.

Keys: ``MODEL.EXPEDIT.*`` (see :mod:`expedit_d2.config`); the official Expedit Swin keys map
onto them (:mod:`expedit_d2.reduction.config`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from ..ops import (DEFAULT_ITERS, DEFAULT_MEMORY_LIMIT, DEFAULT_RECON_K, DEFAULT_RECON_TEMPERATURE,
                   DEFAULT_TEMPERATURE, DEFAULT_WINDOW, RECONSTRUCTION_MODES, TokenClustering,
                   TokenReconstruction, nearest_clusters)
from ..reduction.config import (
    NOT_EXPEDITED, check_bool, check_choice, check_odd, check_pair, check_positive_float, check_positive_int)
from ..reduction.core import (
    SwinWindowReducer, TokenReducer, cell_positions, check_blocks, patch_swin_stage, patch_token_backbone,
    reduction_statistics, register_method, register_patch, swin_stage_at)
from ..reduction.windowed import WindowedReducer, check_location, patch_windowed, window_side

__all__ = ["ExpeditSettings", "ExpeditSwinWindows", "ExpeditTokens", "ExpeditWindows", "SWIN_SHIFT_MASKS",
           "SMALL_INPUT_MODES", "unexpedited_images"]

logger = logging.getLogger(__name__)

#: MODEL.EXPEDIT.SWIN_SHIFT_MASK values, see :class:`ExpeditSwinWindows`.
SWIN_SHIFT_MASKS = ("official", "consistent")
#: MODEL.EXPEDIT.SMALL_INPUT values, see :class:`ExpeditTokens`.
SMALL_INPUT_MODES = ("skip", "error")
_KEY = "MODEL.EXPEDIT."


@dataclass(frozen=True)
class ExpeditSettings:
    """Where and how to cluster/reconstruct (``MODEL.EXPEDIT.*``), validated on creation."""

    clustering_location: int  # alpha
    num_clusters: tuple[int, int]  # (h, w)
    iters: int = DEFAULT_ITERS
    temperature: float = DEFAULT_TEMPERATURE
    window: int = DEFAULT_WINDOW  # lambda
    recon_k: int = DEFAULT_RECON_K
    recon_temperature: float = DEFAULT_RECON_TEMPERATURE
    memory_limit: int = DEFAULT_MEMORY_LIMIT
    reconstruction_mode: str = "topk"  # or "nearest" (the official DPT release)
    recon_subtract_min_distance: bool = False  # True: no underflow (not the official formula)
    swin_shift_mask: str = "official"  # or "consistent" (see ExpeditSwinWindows)
    small_input: str = "skip"  # ViT input with fewer tokens than clusters: "skip" or "error"

    method = "expedit"

    @classmethod
    def from_config(cls, cfg) -> "ExpeditSettings | None":
        """None when ``MODEL.EXPEDIT.ENABLED`` is False or ``CLUSTERING_LOCATION`` is -1."""
        e = cfg.MODEL.EXPEDIT
        if not e.ENABLED or e.CLUSTERING_LOCATION == NOT_EXPEDITED:
            return None
        return cls(e.CLUSTERING_LOCATION, check_pair(e.NUM_CLUSTERS, _KEY + "NUM_CLUSTERS"), e.ITERS,
                   e.TEMPERATURE, e.WINDOW, e.RECON_K, e.RECON_TEMPERATURE,
                   int(check_positive_float(e.MEMORY_LIMIT_MB, _KEY + "MEMORY_LIMIT_MB") * 2**20),
                   e.RECONSTRUCTION, e.RECON_SUBTRACT_MIN_DISTANCE, e.SWIN_SHIFT_MASK, e.SMALL_INPUT)

    def __post_init__(self):
        if isinstance(self.clustering_location, bool) or not isinstance(self.clustering_location, int):
            raise ValueError(f"{_KEY}CLUSTERING_LOCATION must be an int, got {self.clustering_location!r}")
        check_pair(self.num_clusters, _KEY + "NUM_CLUSTERS")
        check_positive_int(self.iters, _KEY + "ITERS")
        check_positive_float(self.temperature, _KEY + "TEMPERATURE")
        check_odd(self.window, _KEY + "WINDOW")
        check_positive_int(self.recon_k, _KEY + "RECON_K")
        check_positive_float(self.recon_temperature, _KEY + "RECON_TEMPERATURE")
        check_positive_int(self.memory_limit, _KEY + "MEMORY_LIMIT_MB (in bytes)")
        check_choice(self.reconstruction_mode, _KEY + "RECONSTRUCTION", RECONSTRUCTION_MODES)
        check_bool(self.recon_subtract_min_distance, _KEY + "RECON_SUBTRACT_MIN_DISTANCE")
        if self.small_input not in SMALL_INPUT_MODES:
            raise ValueError(f"{_KEY}SMALL_INPUT must be 'skip' or 'error', got {self.small_input!r}")
        check_choice(self.swin_shift_mask, _KEY + "SWIN_SHIFT_MASK", SWIN_SHIFT_MASKS)

    @property
    def off(self) -> bool:
        """``CLUSTERING_LOCATION`` -1: not expedited (the official default); no patch is applied."""
        return self.clustering_location == NOT_EXPEDITED

    def clustering(self) -> TokenClustering:
        return TokenClustering(self.num_clusters, self.iters, self.temperature, self.window,
                               self.memory_limit)

    def reconstruction(self) -> TokenReconstruction:
        return TokenReconstruction(self.recon_k, self.recon_temperature, self.memory_limit,
                                   self.reconstruction_mode, self.recon_subtract_min_distance)

    def check_recon_k(self, where: str = "") -> None:
        """Top-k reconstruction needs k <= h * w (nearest-centre copy does not use k)."""
        h, w = self.num_clusters
        if self.reconstruction_mode == "topk" and self.recon_k > h * w:
            raise ValueError(f"{_KEY}RECON_K={self.recon_k} exceeds the {h}x{w} clusters{where}")


def example(target):
    """The target itself: cluster to its size at its location (any family)."""
    return {_KEY + "CLUSTERING_LOCATION": target.location, _KEY + "NUM_CLUSTERS": list(target.size)}


register_method("expedit", ExpeditSettings.from_config, example=example,
                labels={_KEY + "CLUSTERING_LOCATION": "a{v}", _KEY + "NUM_CLUSTERS": "{h}x{w}"})


# --------------------------------------------------------------------------------------
# Swin: per window
# --------------------------------------------------------------------------------------
class ExpeditSwinWindows(SwinWindowReducer):
    """Per-window clustering/reconstruction in one Swin stage (see
    :class:`~expedit_d2.reduction.core.SwinWindowReducer` for the flow and shapes).

    The shifted-window mask of the blocks after clustering: ``"official"`` cuts its regions
    at the stage's original shift (trained window // 2, 6 for Swin-L) while the blocks roll
    by s // 2, as the official HourglassBasicLayer does (the published numbers came from
    it); ``"consistent"`` cuts them at s // 2.
    """

    def __init__(self, block_index: int, settings: ExpeditSettings):
        super().__init__(block_index, settings.num_clusters[0])
        self.clustering = settings.clustering()
        self.reconstruction = settings.reconstruction()
        self.shift_mask = settings.swin_shift_mask

    def reduce(self, windows, ws):
        return self.clustering(windows, (ws, ws))

    def restore(self, windows, state):
        return self.reconstruction(windows, state)

    def mask_shift(self, ws: int) -> int:
        return ws // 2 if self.shift_mask == "official" else self.side // 2

    def window_groups(self, state, ws):
        return nearest_clusters(state)  # each token's cluster in its window (nearest final centre)

    def extra_repr(self) -> str:
        return f"block_index={self.block_index}, shift_mask={self.shift_mask}"


@register_patch("expedit", "swin")
def patch_swin(backbone, settings: ExpeditSettings) -> None:
    stage, index = swin_stage_at(backbone, settings.clustering_location, _KEY + "CLUSTERING_LOCATION")
    h, w = settings.num_clusters
    ws = stage.window_size
    if h != w or h > ws:
        raise ValueError(f"{_KEY}NUM_CLUSTERS={[h, w]}: Swin clusters each {ws}x{ws} attention "
                         f"window into a square s x s grid with s <= {ws}")
    settings.check_recon_k(" of a window")
    patch_swin_stage(stage, ExpeditSwinWindows(index, settings), "Expedit")


# --------------------------------------------------------------------------------------
# windowed ViTs (SAM, ViTDet): per window, as the official Expedit-SAM encoder
# --------------------------------------------------------------------------------------
class ExpeditWindows(WindowedReducer):
    """Cluster every ws x ws window to s x s (centres: the window's adaptive average pool;
    zero padding takes part), top-k reconstruction of every window at the end."""

    def __init__(self, settings: ExpeditSettings):
        super().__init__(settings.clustering_location, settings.num_clusters[0])
        self.clustering = settings.clustering()
        self.reconstruction = settings.reconstruction()

    def reduce(self, windows, ws):
        return self.clustering(windows, (ws, ws))

    def restore(self, windows, state):
        return self.reconstruction(windows, state)


@register_patch("expedit", "windowed")
def patch_windowed_vit(backbone, settings: ExpeditSettings) -> None:
    check_location(backbone, settings.clustering_location, _KEY + "CLUSTERING_LOCATION")
    window_side(backbone, settings.num_clusters, _KEY + "NUM_CLUSTERS", "clusters")
    settings.check_recon_k(" of a window")
    patch_windowed(backbone, ExpeditWindows(settings), "Expedit")


# --------------------------------------------------------------------------------------
# ViT: global
# --------------------------------------------------------------------------------------
class ClusteringPass:
    """One forward pass of expedit on a token-tap backbone: the grid and, once clustered, what
    reconstruction needs (the clustering state) and where each cluster stands."""

    def __init__(self, grid, num_prefix_tokens):
        self.grid, self.num_prefix_tokens, self.clustering = grid, num_prefix_tokens, None
        self.positions = None  # once clustered: the grid token at each initial cluster centre


class ExpeditTokens(TokenReducer):
    """Global clustering of the grid tokens right after block ``location`` (prefix tokens
    pass through), reconstruction of every tap after it. No parameters. A cluster stands at
    the grid position of its initial centre's cell (for blocks with rotary embeddings).

    Shapes: (B, P + H*W, C) -> clusters (B, P + h*w, C) -> taps (B, P + H*W, C).
    """

    method = "expedit"

    def __init__(self, location: int, settings: ExpeditSettings):
        super().__init__()
        self.location = location
        self.clustering = settings.clustering()
        self.reconstruction = settings.reconstruction()
        self.small_input = settings.small_input
        #: images run unexpedited because their token grid was smaller than the cluster
        #: grid (a count for the evaluation's results; not a parameter, not a buffer)
        self.unexpedited_images = 0

    def start(self, x, grid, num_prefix_tokens):
        return ClusteringPass(grid, num_prefix_tokens)

    def after_block(self, index, x, state):
        if index != self.location:
            return x
        h, w = self.clustering.num_clusters
        H, W = state.grid
        # fewer tokens than clusters: clustering could only add tokens. One axis of the
        # cluster grid longer than the token grid's is clustered, as officially (KITTI's
        # 28 x 28 clusters on 22 x 76 tokens)
        if h * w > H * W:
            message = (f"{_KEY}NUM_CLUSTERS={[h, w]} makes more clusters ({h * w}) than this input's "
                       f"token grid {[H, W]} (rows, columns) has tokens ({H * W})")
            if self.small_input == "error":
                raise ValueError(message)
            if self.unexpedited_images == 0:
                logger.warning(f"{message}: such inputs run unexpedited ({_KEY}SMALL_INPUT "
                               "'skip'); they are counted, this is said once")
            self.unexpedited_images += x.shape[0]
            return x
        x, state.clustering = self.clustering(x, state.grid, num_prefix_tokens=state.num_prefix_tokens)
        state.positions = cell_positions(state.grid, (h, w), device=x.device)
        return x

    def tap(self, x, state):
        c = state.clustering
        if c is None or x.shape[1] == c.tokens.shape[1] + c.num_prefix_tokens:
            return x  # before clustering, or as many clusters as tokens (the official hook's rule)
        return self.reconstruction(x, c)

    def statistics(self):
        return {"unexpedited_images": self.unexpedited_images}

    def groups(self, state):
        # each token's cluster: the nearest final centre (None: not clustered in this pass)
        return None if state.clustering is None else nearest_clusters(state.clustering)

    def extra_repr(self) -> str:
        return f"location={self.location}"


@register_patch("expedit", "vit")
def patch_vit(backbone, settings: ExpeditSettings) -> None:
    alpha = settings.clustering_location
    check_blocks(backbone, [alpha], _KEY + "CLUSTERING_LOCATION")  # clustering right after block alpha
    settings.check_recon_k()
    patch_token_backbone(backbone, ExpeditTokens(alpha, settings), "Expedit")


def unexpedited_images(model) -> int:
    """How many images the expedit patches in ``model`` ran unexpedited (token grid smaller
    than the cluster grid, ``MODEL.EXPEDIT.SMALL_INPUT: skip``) since it was built."""
    return reduction_statistics(model).get("expedit", {}).get("unexpedited_images", 0)
