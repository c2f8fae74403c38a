"""Token pooling, the simplest training-free baseline: operators, settings and patches.

With B batch, P prefix tokens (cls), an H x W token grid pooled to h x w::

    x (B, P + H*W, C) --pool_tokens--> (B, P + h*w, C) --unpool_tokens--> (B, P + H*W, C)

Pooling is ``F.adaptive_avg_pool2d`` (cell i of h averages rows floor(i*H/h) ..
ceil((i+1)*H/h) - 1, likewise columns); unpooling is bilinear upsampling with
``align_corners=False``. Grid tokens are in row-major order; prefix tokens pass through.
Both keep the input dtype.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..checks import check_int_at_least, check_pair, shape_of
from ..ops import initial_cells
from ..reduction.core import (
    SwinWindowReducer, TokenReducer, cell_positions, check_blocks, patch_swin_stage, patch_token_backbone,
    register_method, register_patch, swin_stage_at)
from ..reduction.windowed import WindowedReducer, check_location, patch_windowed, window_side

__all__ = ["pool_tokens", "unpool_tokens", "cell_labels", "PoolSettings", "PoolTokens", "PoolSwinWindows", "PoolWindows"]


def _grid(x: torch.Tensor, grid, num_prefix_tokens: int, name: str) -> torch.Tensor:
    """Check x (B, P + H*W, C) and return its grid part as (B, C, H, W)."""
    H, W = grid
    if isinstance(num_prefix_tokens, bool) or not isinstance(num_prefix_tokens, int) or num_prefix_tokens < 0:
        raise ValueError(f"num_prefix_tokens must be an int >= 0, got {num_prefix_tokens!r}")
    P = num_prefix_tokens
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[1] != P + H * W:
        shape = shape_of(x)
        raise ValueError(f"{name} must have shape (B, {P} + {H}*{W}, C) = (B, {P + H * W}, C), got {shape}")
    B, _, C = x.shape
    return x[:, P:].transpose(1, 2).reshape(B, C, H, W)


def _tokens(prefix: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """(B, P, C), (B, C, h, w) -> (B, P + h*w, C) in the prefix's (the input's) dtype."""
    return torch.cat([prefix, grid.to(prefix.dtype).flatten(2).transpose(1, 2)], dim=1)


def _sizes(grid_size, size):
    """Validated ((H, W), (h, w)) with the pooled grid inside the full one."""
    H, W = check_pair(grid_size, "grid_size")
    h, w = check_pair(size, "size")
    if h > H or w > W:
        raise ValueError(f"size {(h, w)} must not exceed grid_size {(H, W)}")
    return (H, W), (h, w)


def pool_tokens(x: torch.Tensor, grid_size, size, num_prefix_tokens: int = 0) -> torch.Tensor:
    """Average-pool the token grid.

    Args:
        x: (B, P + H*W, C) prefix tokens then the grid in row-major order.
        grid_size: (H, W) of the token grid.
        size: (h, w) of the pooled grid, 1 <= h <= H, 1 <= w <= W.
        num_prefix_tokens: P >= 0.

    Returns:
        (B, P + h*w, C) in x's dtype; h, w = H, W returns x unchanged.
    """
    (H, W), (h, w) = _sizes(grid_size, size)
    grid = _grid(x, (H, W), num_prefix_tokens, "x")
    if (h, w) == (H, W):
        return x
    return _tokens(x[:, :num_prefix_tokens], F.adaptive_avg_pool2d(grid, (h, w)))


def unpool_tokens(x: torch.Tensor, grid_size, size, num_prefix_tokens: int = 0) -> torch.Tensor:
    """Upsample a pooled token grid back to the full grid, bilinearly.

    Args:
        x: (B, P + h*w, C) prefix tokens then the pooled grid in row-major order.
        grid_size: (H, W) of the full grid, H >= h, W >= w.
        size: (h, w) of the pooled grid in x.
        num_prefix_tokens: P >= 0.

    Returns:
        (B, P + H*W, C) in x's dtype; h, w = H, W returns x unchanged.
    """
    (H, W), (h, w) = _sizes(grid_size, size)
    grid = _grid(x, (h, w), num_prefix_tokens, "x")
    if (h, w) == (H, W):
        return x
    up = F.interpolate(grid, size=(H, W), mode="bilinear", align_corners=False)
    return _tokens(x[:, :num_prefix_tokens], up)


def cell_labels(grid_size, size, device=None) -> torch.Tensor:
    """(H*W,) long: the pooled cell (0 .. h*w - 1, row-major) of each token of an H x W grid
    pooled to h x w. Adaptive pooling's cells overlap where h does not divide H; a token is
    put in the cell its row and column start in (``initial_cells``: the cell expedit's
    clustering starts each token in), for pictures and checks."""
    (H, W), (h, w) = _sizes(grid_size, size)
    rows = torch.tensor(initial_cells(H, h), device=device)
    cols = torch.tensor(initial_cells(W, w), device=device)
    return (rows[:, None] * w + cols[None, :]).reshape(-1)


# ======================================================================================
# the method: settings (MODEL.TOKEN_REDUCTION.POOL.*) and patches
# ======================================================================================
_KEY = "MODEL.TOKEN_REDUCTION.POOL."


@dataclass(frozen=True)
class PoolSettings:
    """Pool the token grid to ``size`` right after block ``location`` (ViT: global, after the
    block; Swin: per attention window, before global block ``location`` as expedit does),
    bilinear unpooling at the taps (ViT) or at the end of the stage (Swin)."""

    location: int
    size: tuple[int, int]

    method = "pool"

    @classmethod
    def from_config(cls, cfg) -> "PoolSettings | None":
        p = cfg.MODEL.TOKEN_REDUCTION.POOL
        if p.LOCATION == -1:
            return None
        return cls(p.LOCATION, check_pair(p.SIZE, _KEY + "SIZE"))  # SIZE: [h, w] or n -> (h, w)

    #: a pooling location is a block index (>= 0); ``LOCATION`` -1 in a config reads as no
    #: settings at all (:meth:`from_config`)
    off = False

    def __post_init__(self):
        check_int_at_least(self.location, _KEY + "LOCATION", 0)
        check_pair(self.size, _KEY + "SIZE")


def example(target):
    """Pool to expedit's size at expedit's location (any family)."""
    return {_KEY + "LOCATION": target.location, _KEY + "SIZE": list(target.size)}


register_method("pool", PoolSettings.from_config, "POOL", {"LOCATION": -1, "SIZE": [8, 8]}, example=example,
                labels={_KEY + "LOCATION": "a{v}", _KEY + "SIZE": "{h}x{w}"})


class PoolSwinWindows(SwinWindowReducer):
    """Average-pool every ws x ws window to s x s, bilinear unpooling at the end of the stage;
    the shifted-window mask of the pooled blocks is the self-consistent one (s // 2)."""

    def reduce(self, windows, ws):
        return pool_tokens(windows, (ws, ws), (self.side, self.side)), ws

    def restore(self, windows, ws):
        return unpool_tokens(windows, (ws, ws), (self.side, self.side))

    def window_groups(self, state, ws):
        return cell_labels((ws, ws), (self.side, self.side))


@register_patch("pool", "swin")
def patch_swin(backbone, settings: PoolSettings) -> None:
    stage, index = swin_stage_at(backbone, settings.location, _KEY + "LOCATION")
    (h, w), ws = settings.size, stage.window_size
    if h != w or h > ws:
        raise ValueError(f"{_KEY}SIZE={[h, w]}: Swin pools each {ws}x{ws} attention window to a "
                         f"square s x s grid with s <= {ws}")
    patch_swin_stage(stage, PoolSwinWindows(index, h), "Pool")


class PoolWindows(WindowedReducer):
    """Average-pool every ws x ws window of a windowed ViT to s x s right before block
    ``location``; bilinear unpooling of every window after the last block."""

    def reduce(self, windows, ws):
        return pool_tokens(windows, (ws, ws), (self.side, self.side)), ws

    def restore(self, windows, ws):
        return unpool_tokens(windows, (ws, ws), (self.side, self.side))


@register_patch("pool", "windowed")
def patch_windowed_vit(backbone, settings: PoolSettings) -> None:
    check_location(backbone, settings.location, _KEY + "LOCATION")
    side = window_side(backbone, settings.size, _KEY + "SIZE", "pools")
    patch_windowed(backbone, PoolWindows(settings.location, side), "Pool")


class PoolingPass:
    """One forward pass of pooling on a token-tap backbone: the grid, whether it was pooled yet
    and where each pooled token stands."""

    def __init__(self, grid, num_prefix_tokens):
        self.grid, self.num_prefix_tokens, self.pooled = grid, num_prefix_tokens, False
        self.positions = None  # once pooled: the grid token at each cell's centre


class PoolTokens(TokenReducer):
    """Pool the grid tokens to ``size`` right after block ``location``; a tap after it is
    unpooled bilinearly (a tap at ``location`` is exact). An input whose grid is smaller
    than ``size`` in either direction runs unpooled. A pooled token stands at the grid
    position of its cell's centre (for blocks with rotary embeddings)."""

    def __init__(self, settings: PoolSettings):
        super().__init__()
        self.location, self.size = settings.location, settings.size

    def start(self, x, grid, num_prefix_tokens):
        return PoolingPass(grid, num_prefix_tokens)

    def after_block(self, index, x, state):
        (h, w), (H, W) = self.size, state.grid
        if index != self.location or h > H or w > W:
            return x
        state.pooled = True
        state.positions = cell_positions(state.grid, self.size, device=x.device)
        return pool_tokens(x, state.grid, self.size, state.num_prefix_tokens)

    def tap(self, x, state):
        if not state.pooled:
            return x
        return unpool_tokens(x, state.grid, self.size, state.num_prefix_tokens)

    def groups(self, state):
        return cell_labels(state.grid, self.size) if state.pooled else None

    def extra_repr(self) -> str:
        return f"location={self.location}, size={self.size}"


@register_patch("pool", "vit")
def patch_vit(backbone, settings: PoolSettings) -> None:
    check_blocks(backbone, [settings.location], _KEY + "LOCATION")
    patch_token_backbone(backbone, PoolTokens(settings), "Pool")
