"""Swin Transformer (Swin-T/S/B/L) as a Detectron2 backbone, ``ExpeditD2SwinTransformer``.

Parameter names and shapes equal the official Mask2Former Swin backbone, so its
checkpoints load unchanged. Outputs ``res2..res5`` at strides 4, 8, 16, 32. It is
registered under a name of its own: Mask2Former, OneFormer, MaskDINO and the Expedit forks
register their own ``D2SwinTransformer``, and importing expedit-d2 next to them must not
collide. Our Mask2Former project provides the official names for its YAMLs
(:func:`expedit_d2.expedit_backbone.register_official_backbone_names`).

Structure (timm style)::

    PatchEmbed (4x4 conv)          (B, 3, H, W) -> (B, C, H/4, W/4)
    SwinStage x 4                  blocks of (shifted-)window attention, then PatchMerging
      SwinBlock                    x + DropPath(attn(norm1(x))); x + DropPath(mlp(norm2(x)))
    norm{i}                        LayerNorm of each output stage

A stage runs its blocks in ``forward_blocks(x, H, W)`` (then patch merging), built on
``run_blocks(x, H, W, start, stop, window_size, mask_shift)``, which runs any range of its
blocks on a map with any window size: the seam the token-reduction methods of
:mod:`expedit_d2.reduction` patch (the backbone itself knows nothing of them).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.modeling import BACKBONE_REGISTRY

from ..blocked import map_rows, runs_in_blocks, stack_blocks
from ..layers import DropPath, Mlp, init_linear_and_norm
from .base import MultiScaleBackbone, SwinProtocol

__all__ = ["SwinTransformer", "ExpeditD2SwinTransformer", "WindowMask", "WindowGather", "shifted_window_mask",
           "window_order", "window_gather", "gather_tokens", "window_partition", "window_reverse",
           "relative_position_index", "resized_bias_table"]

#: CPU inference (:mod:`expedit_d2.blocked`): tokens per block of a block's MLP (Swin-L's
#: stage 1: 2048 x 768 hidden = 6 MB) and per block of whole windows in attention (4096 /
#: 144 -> 28 windows of 12 x 12). On the CPU machine at 640 x 640 a stage-1 block took
#: 0.73 of its one-call time and a stage-2 block 0.86 (interleaved, ad hoc); 4096- and
#: 8192-token MLP blocks were slower, 1024 no faster.
MLP_BLOCK_TOKENS = 2048
ATTENTION_BLOCK_TOKENS = 4096


def window_partition(x: torch.Tensor, ws: int) -> torch.Tensor:
    """(B, H, W, C) with H, W multiples of ws -> (B * H/ws * W/ws, ws*ws, C)."""
    B, H, W, C = x.shape
    x = x.view(B, H // ws, ws, W // ws, ws, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, ws * ws, C)


def window_reverse(windows: torch.Tensor, ws: int, H: int, W: int) -> torch.Tensor:
    """(B * H/ws * W/ws, ws*ws, C) -> (B, H, W, C)."""
    C = windows.shape[-1]
    B = windows.shape[0] // ((H // ws) * (W // ws))
    x = windows.view(B, H // ws, W // ws, ws, ws, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(B, H, W, C)


def window_order(H: int, W: int, ws: int, shift: int,
                 device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token orders that fuse a block's roll, window partition, window reverse and crop.

    For an H x W map zero-padded to Hp x Wp (multiples of ws) and flattened row-major:
    ``into`` (Hp*Wp,) lists, in :func:`window_partition` order of the map rolled by
    (-shift, -shift), the padded map's token at each place; ``back`` (H*W,) lists, for
    each token of the H x W map, its place in that window order. So
    ``padded[:, into]`` = partition(roll(padded)) and ``windows[:, back]`` =
    crop(roll back(reverse(windows))), one gather each instead of up to six copies.
    """
    Hp, Wp = H + (-H) % ws, W + (-W) % ws
    rows = (torch.arange(Hp, device=device) + shift) % Hp  # rolled row -> padded row
    cols = (torch.arange(Wp, device=device) + shift) % Wp
    into = rows.view(-1, 1, ws, 1) * Wp + cols.view(1, -1, 1, ws)  # (nWh, nWw, ws, ws)
    # padded row -> rolled row; the offsets kept non-negative (the same numbers), since
    # inductor's index arithmetic fails on a remainder of a possibly negative index
    y = (torch.arange(H, device=device) + (-shift) % Hp) % Hp
    x = (torch.arange(W, device=device) + (-shift) % Wp) % Wp
    back = ((y // ws) * (Wp // ws) * ws * ws + (y % ws) * ws)[:, None] + \
        ((x // ws) * ws * ws + x % ws)[None, :]
    return into.flatten(), back.flatten()


class WindowGather(NamedTuple):
    """A block's token orders for :func:`gather_tokens` (:func:`window_gather`)."""

    source: torch.Tensor  # (Hp*Wp,) in window order: each place's token of the H x W map
    padding: torch.Tensor  # (k,) the places that are zero padding (their source is token 0)
    back: torch.Tensor  # (H*W,) as :func:`window_order`'s


def window_gather(H: int, W: int, ws: int, shift: int, device=None) -> WindowGather:
    """:func:`window_order` read from the unpadded map: the windows are the H x W map's
    tokens at ``source`` with the ``padding`` places zeroed, which is ``padded[:, into]``
    exactly, without making the zero-padded map."""
    into, back = window_order(H, W, ws, shift, device)
    Wp = W + (-W) % ws
    row, col = into // Wp, into % Wp
    inside = (row < H) & (col < W)
    source = torch.where(inside, row * W + col, 0)
    # the places outside, ascending (a stable sort puts them first), in a shape known ahead
    # (nonzero's would depend on the data, a graph break for torch.compile)
    padding = torch.sort(inside.to(torch.uint8), stable=True).indices[:into.numel() - H * W]
    return WindowGather(source, padding, back)


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x.index_select(1, index)`` of (B, L, C) tokens. For one image the gather runs on the
    rows of the (L, C) matrix: whole rows copied, about twice as fast on a CPU."""
    B, L, C = x.shape
    if B == 1:
        return x.reshape(L, C).index_select(0, index).unsqueeze(0)
    return x.index_select(1, index)


def relative_position_index(ws: int, device=None) -> torch.Tensor:
    """(ws*ws, ws*ws) index into a (2ws-1)^2 relative-position table."""
    coords = torch.stack(torch.meshgrid(torch.arange(ws, device=device),
                                        torch.arange(ws, device=device), indexing="ij"))
    coords = coords.flatten(1)  # (2, ws*ws)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (ws - 1)
    return rel[..., 0] * (2 * ws - 1) + rel[..., 1]


def resized_bias_table(table: torch.Tensor, ws: int) -> torch.Tensor:
    """A ((2w-1)^2, heads) relative-position bias table trained for windows of w, resized
    bilinearly (align_corners=False) to ((2ws-1)^2, heads), as the official Expedit hourglass
    Swin resizes it for its clustered windows. A new tensor: the parameter is untouched."""
    side = math.isqrt(table.shape[0])
    if side * side != table.shape[0]:
        raise ValueError(f"relative_position_bias_table has {table.shape[0]} rows, not (2w-1)^2 of a square window")
    grid = table.t().reshape(1, table.shape[1], side, side)
    grid = F.interpolate(grid, size=(2 * ws - 1, 2 * ws - 1), mode="bilinear", align_corners=False)
    return grid.reshape(table.shape[1], -1).t()


def _shift_regions(n: int, ws: int, shift: int) -> list[int]:
    """Region label (0, 1, 2) of each of n rows (or columns), cut by the slices (0, -ws),
    (-ws, -shift), (-shift, None) in that order (a later slice overwrites an earlier one,
    which matters when shift > ws, as in the official expedited stage)."""
    labels = [0] * n
    for label, cut in enumerate((slice(0, -ws), slice(-ws, -shift), slice(-shift, None))):
        for i in range(n)[cut]:
            labels[i] = label
    return labels


def shifted_window_mask(H: int, W: int, ws: int, shift: int, device) -> torch.Tensor:
    """(nW, ws*ws, ws*ws) additive mask (0 / -100) for shifted windows on an H x W map
    (H, W multiples of ws): tokens from different pre-shift regions (:func:`_shift_regions`
    of their row and column) do not attend."""
    rows = torch.tensor(_shift_regions(H, ws, shift), device=device)
    cols = torch.tensor(_shift_regions(W, ws, shift), device=device)
    img = (rows[:, None] * 3 + cols[None, :]).view(1, H, W, 1)
    win = window_partition(img, ws).squeeze(-1)  # (nW, ws*ws)
    different = win[:, None, :] != win[:, :, None]
    return torch.zeros(different.shape, device=device).masked_fill_(different, -100.0)


class WindowMask(NamedTuple):
    """The shifted-window mask of one image and where it is not zero.

    ``values``: (nW, N, N) additive mask, windows in row-major order. ``runs``: the windows
    as consecutive ranges ``(start, stop, masked)``; ``masked`` is False where every value
    of the range is zero. On a Swin map only the last row and column of windows are masked,
    so attention runs the others with the (heads, N, N) bias broadcast and materialises
    bias + mask only for the masked ones (at 640 x 640, stage 1 of Swin-L, 27 of 196).
    """

    values: torch.Tensor
    runs: tuple[tuple[int, int, bool], ...]

    @classmethod
    def shifted(cls, H: int, W: int, ws: int, shift: int, device) -> "WindowMask":
        """The mask of :func:`shifted_window_mask`; its runs follow from the regions alone
        (no values are read back, so it neither syncs a GPU nor breaks a compiled graph)."""
        def uniform(n):
            labels = _shift_regions(n, ws, shift)
            return [len(set(labels[i:i + ws])) == 1 for i in range(0, n, ws)]

        rows, cols = uniform(H), uniform(W)
        masked = [not (r and c) for r in rows for c in cols]
        runs, start = [], 0
        for i in range(1, len(masked) + 1):
            if i == len(masked) or masked[i] != masked[start]:
                runs.append((start, i, masked[start]))
                start = i
        return cls(shifted_window_mask(H, W, ws, shift, device), tuple(runs))


class WindowAttention(nn.Module):
    """Multi-head self-attention in windows with a relative-position bias.

    ``forward(x, mask, window_size)``: x (B*nW, ws*ws, C); mask (nW, N, N) or None. When
    ``window_size`` differs from the trained one, the bias table is resized bilinearly
    (align_corners=False) for that call, without touching the parameter.
    """

    def __init__(self, dim: int, window_size: int, num_heads: int, qkv_bias: bool = True,
                 qk_scale: float | None = None, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.dim, self.window_size, self.num_heads = dim, window_size, num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window_size - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window_size))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def relative_position_bias(self, ws: int | None = None) -> torch.Tensor:
        """(heads, ws*ws, ws*ws) bias for windows of size ws (default: the trained one)."""
        table, index = self.relative_position_bias_table, self.relative_position_index
        if ws is not None and ws != self.window_size:
            table = resized_bias_table(table, ws)
            index = relative_position_index(ws, table.device)
        n = index.shape[0]
        # contiguous: a permuted bias would make (bias + shift mask) permuted too, and the
        # fused attention would copy that (nW, heads, N, N) mask again
        return table[index.reshape(-1)].view(n, n, -1).permute(2, 0, 1).contiguous()

    def forward(self, x: torch.Tensor, mask: WindowMask | torch.Tensor | None = None,
                window_size: int | None = None) -> torch.Tensor:
        """x (B*nW, N, C) -> (B*nW, N, C). ``mask``: a :class:`WindowMask`, or its (nW, N, N)
        values alone (then every window counts as masked), or None. On a CPU in inference,
        in blocks of whole windows of one image (:data:`ATTENTION_BLOCK_TOKENS` tokens)."""
        B_, N, _ = x.shape
        bias = self.relative_position_bias(window_size).unsqueeze(0)  # (1, heads, N, N)
        values = mask if isinstance(mask, torch.Tensor) or mask is None else mask.values
        nW = B_ if values is None else values.shape[0]
        step = max(1, ATTENTION_BLOCK_TOKENS // N)
        if not runs_in_blocks(x, self, B_, step):
            return self._attend(x, bias, mask)
        spans = [(first, s, min(s + step, nW)) for first in range(0, B_, nW) for s in range(0, nW, step)]
        return stack_blocks(((first + s, self._attend(x[first + s:first + e], bias, _mask_windows(mask, s, e)))
                             for first, s, e in spans), B_)

    def _attend(self, x, bias, mask):
        B_, N, C = x.shape
        heads = self.num_heads
        qkv = self.qkv(x).reshape(B_, N, 3, heads, C // heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B_, heads, N, d)
        bias = bias.to(q.dtype)
        dropout = self.attn_drop if self.training else 0.0
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout,
                                                 scale=self.scale).transpose(1, 2)
        else:
            values = mask if isinstance(mask, torch.Tensor) else mask.values
            nW = values.shape[0]
            # On a CPU, one attention call per run of windows saves materialising bias + mask
            # for all windows (measured there); elsewhere the add is cheap and the extra calls
            # are not, so every window counts as masked: one call per image.
            runs = mask.runs if isinstance(mask, WindowMask) and x.device.type == "cpu" \
                else ((0, nW, True),)
            values = values.to(q.dtype).unsqueeze(1)  # (nW, 1, N, N)
            masks = [bias + values[start:stop] if masked else bias for start, stop, masked in runs]
            out = q.new_empty(B_, N, heads, C // heads)
            for first in range(0, B_, nW):  # each image's windows
                for (start, stop, _), attn_mask in zip(runs, masks):
                    w = slice(first + start, first + stop)
                    out[w] = F.scaled_dot_product_attention(
                        q[w], k[w], v[w], attn_mask=attn_mask, dropout_p=dropout,
                        scale=self.scale).transpose(1, 2)
        return self.proj_drop(self.proj(out.reshape(B_, N, C)))


def _mask_windows(mask: WindowMask | torch.Tensor | None, start: int, stop: int):
    """The mask of windows start .. stop - 1 of an image (runs cut to them, renumbered)."""
    if not isinstance(mask, WindowMask):
        return None if mask is None else mask[start:stop]
    runs = tuple((max(a, start) - start, min(b, stop) - start, m) for a, b, m in mask.runs if a < stop and b > start)
    return WindowMask(mask.values[start:stop], runs)


class SwinBlock(nn.Module):
    """One (shifted-)window transformer block. ``forward(x (B, H*W, C), H, W, mask, ws)``."""

    def __init__(self, dim, num_heads, window_size=7, shift_size=0, mlp_ratio=4.0,
                 qkv_bias=True, qk_scale=None, drop=0.0, attn_drop=0.0, drop_path=0.0):
        super().__init__()
        self.window_size, self.shift_size = window_size, shift_size
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window_size, num_heads, qkv_bias, qk_scale,
                                    attn_drop, drop)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def forward(self, x: torch.Tensor, H: int, W: int,
                shift_mask: WindowMask | torch.Tensor | None,
                window_size: int | None = None, orders: dict | None = None) -> torch.Tensor:
        """``orders``: {shift: :func:`window_gather` (H, W, ws, shift)}, computed once per
        stage call by :meth:`SwinStage.run_blocks` (default: computed here). The roll, zero
        padding, window partition, window reverse, roll back and crop are the two gathers."""
        ws = window_size or self.window_size
        shift = ws // 2 if self.shift_size > 0 else 0
        B, L, C = x.shape
        shortcut = x
        if orders is None:
            orders = {shift: window_gather(H, W, ws, shift, x.device)}
        order = orders[shift]
        windows = gather_tokens(self.norm1(x), order.source)
        if order.padding.numel():
            windows.index_fill_(1, order.padding, 0.0)
        x = self.attn(windows.view(-1, ws * ws, C), shift_mask if shift else None, window_size=ws)
        x = gather_tokens(x.view(B, -1, C), order.back)
        x = shortcut + self.drop_path(x)  # a new tensor: the MLP's sums may go into it
        return map_rows(lambda t: self.drop_path(self.mlp(self.norm2(t))), x, MLP_BLOCK_TOKENS, self,
                        residual=True)


class PatchMerging(nn.Module):
    """2x2 neighbourhood concat + LayerNorm + linear 4C -> 2C: (B, H*W, C) -> (B, H/2*W/2, 2C)."""

    def __init__(self, dim: int):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x, H, W):
        B, L, C = x.shape
        x = x.view(B, H, W, C)
        if H % 2 or W % 2:
            x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x.view(B, -1, 4 * C)))


class SwinStage(nn.Module):
    """``depth`` Swin blocks (alternating shift) and an optional PatchMerging.

    ``forward(x (B, H*W, C), H, W) -> (x_out (B, H*W, C), H, W, x_down, H', W')``.
    """

    def __init__(self, dim, depth, num_heads, window_size=7, mlp_ratio=4.0, qkv_bias=True,
                 qk_scale=None, drop=0.0, attn_drop=0.0, drop_path=(), downsample=True):
        super().__init__()
        self.window_size = window_size
        self.blocks = nn.ModuleList([
            SwinBlock(dim, num_heads, window_size, 0 if i % 2 == 0 else window_size // 2,
                      mlp_ratio, qkv_bias, qk_scale, drop, attn_drop,
                      drop_path[i] if len(drop_path) else 0.0)
            for i in range(depth)
        ])
        self.downsample = PatchMerging(dim) if downsample else None

    def run_blocks(self, x, H, W, start=0, stop=None, window_size=None, mask_shift=None):
        """Run blocks[start:stop] on an H x W map with the given window size; the
        shifted-window mask cuts its regions at ``mask_shift`` (default: window // 2, the
        shift the blocks roll by)."""
        ws = window_size or self.window_size
        Hp, Wp = H + (-H) % ws, W + (-W) % ws
        shift = ws // 2 if mask_shift is None else mask_shift
        mask = WindowMask.shifted(Hp, Wp, ws, shift, x.device) if len(self.blocks) > 1 else None
        # the blocks roll by 0 or ws // 2 (whatever the mask's cut): both orders, once
        orders = {s: window_gather(H, W, ws, s, x.device) for s in {0, ws // 2}}
        for blk in self.blocks[start:stop]:
            x = blk(x, H, W, mask, ws, orders)
        return x

    def forward_blocks(self, x, H, W):
        """All blocks of the stage: (B, H*W, C) -> (B, H*W, C)."""
        return self.run_blocks(x, H, W)

    def forward(self, x, H, W):
        x = self.forward_blocks(x, H, W)
        if self.downsample is None:
            return x, H, W, x, H, W
        return x, H, W, self.downsample(x, H, W), (H + 1) // 2, (W + 1) // 2


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection: (B, 3, H, W) -> (B, C, ceil(H/p), ceil(W/p))."""

    def __init__(self, patch_size=4, in_chans=3, embed_dim=96, patch_norm=True):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim) if patch_norm else None

    def forward(self, x):
        p = self.patch_size
        H, W = x.shape[-2:]
        if H % p or W % p:
            x = F.pad(x, (0, (-W) % p, 0, (-H) % p))
        x = self.proj(x)
        if self.norm is not None:
            Wh, Ww = x.shape[-2:]
            x = self.norm(x.flatten(2).transpose(1, 2)).transpose(1, 2).view(-1, x.shape[1], Wh, Ww)
        return x


class SwinTransformer(nn.Module, SwinProtocol):
    """Swin Transformer feature extractor (no classification head)."""

    def __init__(self, pretrain_img_size=224, patch_size=4, in_chans=3, embed_dim=96,
                 depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7, mlp_ratio=4.0,
                 qkv_bias=True, qk_scale=None, drop_rate=0.0, attn_drop_rate=0.0,
                 drop_path_rate=0.2, ape=False, patch_norm=True, out_indices=(0, 1, 2, 3)):
        super().__init__()
        if len(depths) != len(num_heads):
            raise ValueError(f"MODEL.SWIN.DEPTHS {depths} and NUM_HEADS {num_heads} differ in length")
        self.depths, self.num_layers = tuple(depths), len(depths)
        self.embed_dim, self.ape, self.out_indices = embed_dim, ape, tuple(out_indices)
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, patch_norm)
        if ape:
            side = pretrain_img_size // patch_size
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, embed_dim, side, side))
            nn.init.trunc_normal_(self.absolute_pos_embed, std=0.02)
        self.pos_drop = nn.Dropout(drop_rate)
        n = sum(depths)  # stochastic depth rate grows linearly over all blocks
        dpr = [drop_path_rate * i / max(n - 1, 1) for i in range(n)]
        self.layers = nn.ModuleList()
        for i, depth in enumerate(depths):
            self.layers.append(SwinStage(
                embed_dim * 2**i, depth, num_heads[i], window_size, mlp_ratio, qkv_bias,
                qk_scale, drop_rate, attn_drop_rate, dpr[sum(depths[:i]): sum(depths[: i + 1])],
                downsample=i < self.num_layers - 1))
        self.num_features = [embed_dim * 2**i for i in range(self.num_layers)]
        for i in self.out_indices:
            self.add_module(f"norm{i}", nn.LayerNorm(self.num_features[i]))
        self.apply(init_linear_and_norm)

    def forward_stages(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        """(B, 3, H, W) -> {stage index: (B, C_i, H_i, W_i)} for the out_indices."""
        x = self.patch_embed(x)
        Wh, Ww = x.shape[-2:]
        if self.ape:
            pos = F.interpolate(self.absolute_pos_embed, size=(Wh, Ww), mode="bicubic")
            x = x + pos
        x = self.pos_drop(x.flatten(2).transpose(1, 2))
        outs = {}
        for i, stage in enumerate(self.layers):
            x_out, H, W, x, Wh, Ww = stage(x, Wh, Ww)
            if i in self.out_indices:
                y = getattr(self, f"norm{i}")(x_out)
                outs[i] = y.view(-1, H, W, self.num_features[i]).permute(0, 3, 1, 2).contiguous()
        return outs


@BACKBONE_REGISTRY.register()
class ExpeditD2SwinTransformer(SwinTransformer, MultiScaleBackbone):
    """Detectron2 backbone from ``MODEL.SWIN.*`` (the official Mask2Former config keys)."""

    def __init__(self, cfg, input_shape):
        s = cfg.MODEL.SWIN
        super().__init__(
            s.PRETRAIN_IMG_SIZE, s.PATCH_SIZE, input_shape.channels, s.EMBED_DIM, s.DEPTHS,
            s.NUM_HEADS, s.WINDOW_SIZE, s.MLP_RATIO, s.QKV_BIAS, s.QK_SCALE, s.DROP_RATE,
            s.ATTN_DROP_RATE, s.DROP_PATH_RATE, s.APE, s.PATCH_NORM)
        self._setup_outputs(s.OUT_FEATURES, self.num_features, "MODEL.SWIN.OUT_FEATURES")

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self._check_input(x)
        outs = self.forward_stages(x)
        return {f"res{i + 2}": y for i, y in outs.items() if f"res{i + 2}" in self._out_features}
