"""Token pooling, the simplest training-free baseline.

With B batch, P prefix tokens (cls), an H x W token grid pooled to h x w::

    x (B, P + H*W, C) --pool_tokens--> (B, P + h*w, C) --unpool_tokens--> (B, P + H*W, C)

Pooling is ``F.adaptive_avg_pool2d`` (cell i of h averages rows floor(i*H/h) ..
ceil((i+1)*H/h) - 1, likewise columns); unpooling is bilinear upsampling with
``align_corners=False``. Grid tokens are in row-major order; prefix tokens pass through.
Both keep the input dtype.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["pool_tokens", "unpool_tokens"]


def _pair(value, name: str) -> tuple[int, int]:
    ok = isinstance(value, Sequence) and len(value) == 2 and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value
    )
    if not ok:
        raise ValueError(f"{name} must be a pair (h, w) of ints >= 1, got {value!r}")
    return int(value[0]), int(value[1])


def _grid(x: torch.Tensor, grid, num_prefix_tokens: int, name: str) -> torch.Tensor:
    """Check x (B, P + H*W, C) and return its grid part as (B, C, H, W)."""
    H, W = grid
    if isinstance(num_prefix_tokens, bool) or not isinstance(num_prefix_tokens, int) or num_prefix_tokens < 0:
        raise ValueError(f"num_prefix_tokens must be an int >= 0, got {num_prefix_tokens!r}")
    P = num_prefix_tokens
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[1] != P + H * W:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must have shape (B, {P} + {H}*{W}, C) = (B, {P + H * W}, C), got {shape}")
    B, _, C = x.shape
    return x[:, P:].transpose(1, 2).reshape(B, C, H, W)


def _tokens(prefix: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """(B, P, C), (B, C, h, w) -> (B, P + h*w, C) in the prefix's (the input's) dtype."""
    return torch.cat([prefix, grid.to(prefix.dtype).flatten(2).transpose(1, 2)], dim=1)


def _sizes(grid_size, size):
    """Validated ((H, W), (h, w)) with the pooled grid inside the full one."""
    H, W = _pair(grid_size, "grid_size")
    h, w = _pair(size, "size")
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
