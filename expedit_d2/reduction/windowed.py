"""The ``"windowed"`` family: plain ViTs whose blocks attend in windows or globally on a
(B, H, W, C) token grid, with decomposed relative positions -- segment-anything's
``ImageEncoderViT`` (SAM) and Detectron2's ViTDet ``ViT``.

Protocol (:class:`WindowedProtocol`): ``backbone.blocks`` (``nn.ModuleList``) of blocks with ``window_size`` (> 0:
windowed attention, padded to multiples of the window; 0: global attention), ``norm1``,
``attn`` (taking (B', h, w, C) and sizing its relative positions to h, w), ``norm2`` and
``mlp``; a *layout* (:data:`LAYOUTS`) that says how the backbone turns images into the
(B, H, W, C) grid before the blocks and what it makes of the grid after them.

A method patches such a backbone with a :class:`WindowedReducer` (per window, like the swin
family): right before block ``location`` every ws x ws window of the zero-padded grid is
reduced to s x s tokens and the windows are stitched into an (Hp/ws*s) x (Wp/ws*s) grid;
later window blocks attend in windows of s, later global blocks on the whole reduced grid;
after the last block every s x s window is restored to ws x ws and the padding cropped,
unless the reduced grid has the input grid's shape (then the official Expedit-SAM encoder
does not reconstruct, and neither do we). The backbone's own forward is replaced by
``head(reducer(embed(images)))`` through a class swap; parameters and their names are
untouched and :func:`~expedit_d2.reduction.remove_patch` restores the class.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones.base import FamilyProtocol
from .core import register_family, swap_class

__all__ = ["WindowedProtocol", "WindowedReducer", "Layout", "LAYOUTS", "layout_of", "partition_windows", "merge_windows",
           "block_at_window", "patch_windowed", "window_size_of", "window_side", "check_location"]

#: what every block of the family has
BLOCK_ATTRIBUTES = ("window_size", "norm1", "attn", "norm2", "mlp")


class Layout(NamedTuple):
    """How a backbone of the family runs around its blocks."""

    #: attributes the backbone must have for this layout
    attributes: tuple[str, ...]
    #: images -> (B, H, W, C) grid before the first block
    embed: Callable
    #: (B, H, W, C) grid after the last block -> the backbone's outputs
    head: Callable


def _sam_embed(self, images):
    x = self.patch_embed(images)
    return x if self.pos_embed is None else x + self.pos_embed


def _sam_head(self, x):
    return self.neck(x.permute(0, 3, 1, 2))


def _vitdet_embed(self, images):
    from ..backbones.vitdet import get_abs_pos

    x = self.patch_embed(images)
    if self.pos_embed is None:
        return x
    return x + get_abs_pos(self.pos_embed, self.pretrain_use_cls_token, x.shape[1:3])


def _vitdet_head(self, x):
    return {self._out_features[0]: x.permute(0, 3, 1, 2)}


#: layout name -> Layout; the first whose attributes the backbone has is used
LAYOUTS: dict[str, Layout] = {
    # segment-anything's ImageEncoderViT: patch_embed, pos_embed added as is, blocks, neck
    "sam": Layout(("patch_embed", "pos_embed", "neck"), _sam_embed, _sam_head),
    # ViTDet's ViT (ours, Detectron2's own): pos_embed resized to the grid (cls row dropped),
    # blocks, {out_feature: (B, C, H, W)}
    "vitdet": Layout(("patch_embed", "pos_embed", "pretrain_use_cls_token", "_out_features"),
                     _vitdet_embed, _vitdet_head),
}


def layout_of(backbone: nn.Module) -> str | None:
    for name, layout in LAYOUTS.items():
        if all(hasattr(backbone, a) for a in layout.attributes):
            return name
    return None


@register_family
class WindowedProtocol(FamilyProtocol):
    """The ``"windowed"`` family (see the module's text): window and global blocks on a
    (B, H, W, C) grid, in a known :data:`LAYOUTS` entry."""

    family = "windowed"

    @classmethod
    def problem_of(cls, module: nn.Module) -> str | None:
        blocks = getattr(module, "blocks", None)
        if not isinstance(blocks, (nn.ModuleList, nn.Sequential)) or not len(blocks):
            return "no 'blocks' (a non-empty nn.ModuleList)"
        for i, blk in enumerate(blocks):
            for name in BLOCK_ATTRIBUTES:
                if not hasattr(blk, name):
                    return f"blocks[{i}] ({type(blk).__name__}) has no {name!r}"
            if isinstance(blk.window_size, bool) or not isinstance(blk.window_size, int):
                return f"blocks[{i}].window_size is not an int"
        if not any(blk.window_size > 0 for blk in blocks):
            return "no windowed block (every window_size is 0)"
        if layout_of(module) is None:
            wanted = "; ".join(f"{n}: {', '.join(layout.attributes)}" for n, layout in LAYOUTS.items())
            return f"no known layout around the blocks ({wanted})"
        return None



def window_size_of(backbone: nn.Module) -> int:
    """The window of the windowed blocks (one size for all of them)."""
    sizes = sorted({blk.window_size for blk in backbone.blocks if blk.window_size > 0})
    if len(sizes) != 1:
        raise ValueError(f"{type(backbone).__name__}: windowed blocks of several sizes {sizes}; "
                         "per-window reduction needs one window size")
    return sizes[0]


def window_side(backbone: nn.Module, size, key: str, verb: str) -> int:
    """s of a per-window setting (h, w): a square s x s with s <= the window, else an error
    naming ``key`` (``verb``: what the method does to each window, for the message)."""
    (h, w), ws = size, window_size_of(backbone)
    if h != w or h > ws:
        raise ValueError(f"{key}={[h, w]}: a windowed ViT {verb} each {ws}x{ws} window into a square s x s grid "
                         f"with s <= {ws}")
    return h


def check_location(backbone: nn.Module, location: int, key: str) -> None:
    depth = len(backbone.blocks)
    if isinstance(location, bool) or not isinstance(location, int) or not 0 <= location < depth:
        raise ValueError(f"{key}={location!r} is outside this ViT's blocks 0..{depth - 1} "
                         "(the windowed family reduces right before block alpha)")


def partition_windows(x: torch.Tensor, ws: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """(B, H, W, C) -> (windows (B*nW, ws*ws, C), (Hp, Wp)): zero-padded bottom and right to
    multiples of ws, windows in row-major order."""
    from ..backbones.swin import window_partition

    B, H, W, C = x.shape
    Hp, Wp = H + (-H) % ws, W + (-W) % ws
    if (Hp, Wp) != (H, W):
        x = F.pad(x, (0, 0, 0, Wp - W, 0, Hp - H))
    return window_partition(x, ws), (Hp, Wp)


def merge_windows(windows: torch.Tensor, ws: int, padded: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """The inverse of :func:`partition_windows`: (B*nW, ws*ws, C) -> (B, H, W, C), cropped."""
    from ..backbones.swin import window_reverse

    x = window_reverse(windows, ws, *padded)
    H, W = size
    return x if tuple(padded) == (H, W) else x[:, :H, :W].contiguous()


def block_at_window(blk: nn.Module, x: torch.Tensor, ws: int) -> torch.Tensor:
    """A block of the family run with windows of ``ws`` instead of its own: the block's own
    steps (SAM's and ViTDet's ``Block.forward``) with another window. x (B, H, W, C)."""
    shortcut = x
    H, W = x.shape[1:3]
    windows, padded = partition_windows(blk.norm1(x), ws)
    C = windows.shape[-1]
    h = blk.attn(windows.view(-1, ws, ws, C))
    h = merge_windows(h.reshape(-1, ws * ws, h.shape[-1]), ws, padded, (H, W))
    drop = getattr(blk, "drop_path", None) or nn.Identity()
    x = shortcut + drop(h)
    x = x + drop(blk.mlp(blk.norm2(x)))
    if getattr(blk, "use_residual_block", False):  # ViTDet's convolutional residual block
        x = blk.residual(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    return x


class WindowedReducer(nn.Module):
    """Reduce every ws x ws window to s x s right before block ``location``, run the later
    blocks on the reduced grid, restore every window after the last block. No parameters.

    Subclasses define ``reduce(windows (B*nW, ws*ws, C), ws) -> (windows (B*nW, s*s, C),
    state)`` and ``restore(windows (B*nW, s*s, C), state) -> (B*nW, ws*ws, C)``.
    """

    def __init__(self, location: int, side: int):
        super().__init__()
        self.location, self.side = location, side

    def reduce(self, windows, ws):
        raise NotImplementedError

    def restore(self, windows, state):
        raise NotImplementedError

    def forward(self, backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
        blocks, s = backbone.blocks, self.side
        for blk in blocks[: self.location]:
            x = blk(x)
        ws = window_size_of(backbone)
        B, H, W, C = x.shape
        windows, (Hp, Wp) = partition_windows(x, ws)
        small, state = self.reduce(windows, ws)
        h, w = Hp // ws * s, Wp // ws * s
        x = merge_windows(small, s, (h, w), (h, w))
        for blk in blocks[self.location:]:
            # global blocks (0) and blocks whose own window is s run as they are
            x = blk(x) if blk.window_size in (0, s) else block_at_window(blk, x, s)
        if (h, w) == (H, W):
            return x
        full = self.restore(partition_windows(x, s)[0], state)
        return merge_windows(full, ws, (Hp, Wp), (H, W))

    def extra_repr(self) -> str:
        return f"location={self.location}, side={self.side}"


def _make_forward(layout: Layout):
    def forward(self, images):
        return layout.head(self, self.token_reduction(self, layout.embed(self, images)))

    return forward


def patch_windowed(backbone: nn.Module, reducer: WindowedReducer, prefix: str) -> None:
    """Attach ``reducer`` and replace the backbone's forward by its layout's embed, the
    reducer's block loop and the layout's head (a class swap; parameters untouched)."""
    ws = window_size_of(backbone)
    if reducer.side > ws:
        raise ValueError(f"{reducer.side}x{reducer.side} tokens per window exceed the {ws}x{ws} windows")
    backbone.token_reduction = reducer
    swap_class(backbone, prefix, {"forward": _make_forward(LAYOUTS[layout_of(backbone)])})
