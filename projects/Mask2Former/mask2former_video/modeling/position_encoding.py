"""The 3D sine position embedding of Mask2Former's video decoder (time, rows, columns).

For a clip (B, T, C, H, W): rows and columns get DETR's normalised sine embedding of
``num_pos_feats`` channels each (rows first, then columns: 2 * num_pos_feats channels), and
the frame index gets one of 2 * num_pos_feats channels (frequencies spaced over that width),
which is *added* to the spatial one. Positions are 1-based and normalised to (0, scale] by
the last one (+ 1e-6), as the official ``PositionEmbeddingSine3D`` computes them with no mask.
"""
from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["PositionEmbeddingSine3D"]


def _sine(positions: torch.Tensor, num_feats: int, temperature: float) -> torch.Tensor:
    """(...,) positions -> (..., num_feats): sin on even channels, cos on odd, interleaved."""
    i = torch.arange(num_feats, dtype=torch.float32, device=positions.device)
    freq = temperature ** (2 * torch.div(i, 2, rounding_mode="floor") / num_feats)
    angles = positions[..., None] / freq
    return torch.stack((angles[..., 0::2].sin(), angles[..., 1::2].cos()), dim=-1).flatten(-2)


class PositionEmbeddingSine3D(nn.Module):
    """(B, T, C, H, W) -> (B, T, 2 * num_pos_feats, H, W). No parameters."""

    def __init__(self, num_pos_feats: int = 64, temperature: float = 10000, normalize: bool = False,
                 scale: float | None = None):
        super().__init__()
        if scale is not None and not normalize:
            raise ValueError("PositionEmbeddingSine3D: a scale needs normalize=True")
        self.num_pos_feats, self.temperature = num_pos_feats, temperature
        self.normalize, self.scale = normalize, 2 * math.pi if scale is None else scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5:
            raise ValueError(f"PositionEmbeddingSine3D expects (B, T, C, H, W), got shape {tuple(x.shape)}")
        B, T, _, H, W = x.shape
        kw = dict(dtype=torch.float32, device=x.device)
        z = torch.arange(1, T + 1, **kw)
        y = torch.arange(1, H + 1, **kw)
        w = torch.arange(1, W + 1, **kw)
        if self.normalize:
            eps = 1e-6
            z, y, w = (v / (v[-1:] + eps) * self.scale for v in (z, y, w))
        n = self.num_pos_feats
        pos_y = _sine(y, n, self.temperature)[:, None, :].expand(H, W, n)  # (H, W, n)
        pos_x = _sine(w, n, self.temperature)[None, :, :].expand(H, W, n)
        pos_z = _sine(z, 2 * n, self.temperature)  # (T, 2n)
        pos = torch.cat((pos_y, pos_x), dim=-1)[None] + pos_z[:, None, None, :]  # (T, H, W, 2n)
        return pos.permute(0, 3, 1, 2)[None].expand(B, T, 2 * n, H, W).to(x.dtype)
