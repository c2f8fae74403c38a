"""The ``"swin"`` family on the upstream Swin layout: the user's own, unmodified Swin.

Mask2Former, OneFormer, MaskDINO and the Expedit forks copy the Swin of
Swin-Transformer-Semantic-Segmentation. Its stages are ``backbone.layers[i]`` (``BasicLayer``)
with ``forward(x, H, W) -> (x_out, H, W, x_down, H', W')``, ``blocks``, ``window_size``,
``shift_size`` and ``downsample``; each block (``SwinTransformerBlock``) has
``window_size``, ``shift_size``, ``norm1``, ``attn`` (``qkv``, ``proj``, ``num_heads``,
``scale``, ``relative_position_bias_table``), ``drop_path``, ``norm2``, ``mlp``, reads
the map size from its ``H`` / ``W`` attributes (set by the stage) and is called as
``blk(x, attn_mask)``.

Patching a stage of that layout (:func:`adapt_upstream_stage`) gives it the swin family's
``run_blocks`` / ``forward_blocks`` seam and a ``forward`` that runs them, so the family's
reducers (:class:`~expedit_d2.reduction.core.SwinWindowReducer`) work on it unchanged:

* blocks at their own window size run the user's code as the stage does (``blk.H, blk.W =
  H, W; blk(x, mask)``, the same 0 / -100 shifted-window mask);
* blocks on a reduced map run with window s in :func:`block_at_window`: the same roll, zero
  padding, windows, attention with the relative-position bias table resized bilinearly to
  s (a new tensor each call, the parameter untouched) and MLP as the official Expedit
  hourglass Swin's ``SwinTransformerBlock`` with ``window_size`` s computes them.

Parameters, buffers and their names are untouched; :func:`~expedit_d2.reduction.remove_patch`
restores the stage's class.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import checkpoint

__all__ = ["upstream_stage_problem", "adapt_upstream_stage", "run_upstream_blocks", "block_at_window",
           "window_attention"]

#: what a stage of the upstream layout must have, and each of its blocks (dotted: nested)
STAGE_ATTRIBUTES = ("blocks", "window_size", "shift_size", "downsample")
BLOCK_ATTRIBUTES = ("window_size", "shift_size", "norm1", "norm2", "mlp", "drop_path", "attn", "attn.qkv",
                    "attn.proj", "attn.num_heads", "attn.scale", "attn.relative_position_bias_table")


def _lacks(obj, dotted: str):
    """(the object that lacks it, the missing name) for a dotted attribute path, or None."""
    for part in dotted.split("."):
        if not hasattr(obj, part):
            return obj, part
        obj = getattr(obj, part)
    return None


def upstream_stage_problem(stage: nn.Module) -> str | None:
    """None when ``stage`` follows the upstream layout, else what it lacks, as an attribute
    path from the stage (``".blocks[0].attn has no 'relative_position_bias_table'"``)."""
    for name in STAGE_ATTRIBUTES:
        if not hasattr(stage, name):
            return f" ({type(stage).__name__}) has no {name!r}"
    if not isinstance(stage.blocks, (nn.ModuleList, nn.Sequential)) or not len(stage.blocks):
        return f".blocks ({type(stage.blocks).__name__}) is not a non-empty nn.ModuleList"
    for j, blk in enumerate(stage.blocks):
        for name in BLOCK_ATTRIBUTES:
            lack = _lacks(blk, name)
            if lack is not None:
                owner, leaf = lack
                path = name.rpartition(".")[0]
                return f".blocks[{j}]{'.' + path if path else ''} ({type(owner).__name__}) has no {leaf!r}"
    return None


def _shifted_window_mask(H: int, W: int, ws: int, shift: int, device) -> torch.Tensor:
    from ..backbones.swin import shifted_window_mask

    return shifted_window_mask(H + (-H) % ws, W + (-W) % ws, ws, shift, device)


def run_upstream_blocks(self, x: torch.Tensor, H: int, W: int, start: int = 0, stop: int | None = None,
                        window_size: int | None = None, mask_shift: int | None = None) -> torch.Tensor:
    """The swin family's ``run_blocks`` on an upstream stage: blocks[start:stop] on an H x W
    map with windows of ``window_size`` (default: the stage's); the shifted-window mask cuts
    its regions at ``mask_shift`` (default: window // 2, the upstream ``shift_size``)."""
    ws = window_size or self.window_size
    shift = ws // 2 if mask_shift is None else mask_shift
    mask = _shifted_window_mask(H, W, ws, shift, x.device)
    for blk in self.blocks[start:stop]:
        if ws == blk.window_size:  # the user's own block, called as their stage calls it
            blk.H, blk.W = H, W
            if getattr(self, "use_checkpoint", False) and torch.is_grad_enabled():
                x = checkpoint.checkpoint(blk, x, mask, use_reentrant=False)
            else:
                x = blk(x, mask)
        else:
            x = block_at_window(blk, x, H, W, ws, mask)
    return x


def _forward_blocks(self, x, H, W):
    return self.run_blocks(x, H, W)


def _stage_forward(self, x, H, W):
    """``BasicLayer.forward`` through ``forward_blocks`` (which a reducer overrides)."""
    x = self.forward_blocks(x, H, W)
    if self.downsample is None:
        return x, H, W, x, H, W
    return x, H, W, self.downsample(x, H, W), (H + 1) // 2, (W + 1) // 2


#: what :func:`adapt_upstream_stage` adds to an upstream stage's (patched) class
UPSTREAM_STAGE_METHODS = {"run_blocks": run_upstream_blocks, "forward_blocks": _forward_blocks,
                          "forward": _stage_forward}


def adapt_upstream_stage(overrides: dict) -> dict:
    """The class overrides that patch an upstream stage: the family seam plus ``overrides``
    (a reducer's ``forward_blocks``)."""
    return {**UPSTREAM_STAGE_METHODS, **overrides}


def window_attention(attn: nn.Module, windows: torch.Tensor, mask: torch.Tensor | None, ws: int) -> torch.Tensor:
    """The upstream ``WindowAttention`` of ``attn`` on windows of ``ws`` (any size): windows
    (B*nW, ws*ws, C) -> (B*nW, ws*ws, C); ``mask`` (nW, N, N) additive or None. The bias table
    is resized to ws when it was trained for another size."""
    from ..backbones.swin import relative_position_index, resized_bias_table

    B_, N, C = windows.shape
    heads = attn.num_heads
    q, k, v = attn.qkv(windows).reshape(B_, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4).unbind(0)
    table = attn.relative_position_bias_table
    if table.shape[0] != (2 * ws - 1) ** 2:
        table = resized_bias_table(table, ws)
    index = relative_position_index(ws, table.device).reshape(-1)
    bias = table[index].view(N, N, heads).permute(2, 0, 1).to(q.dtype)  # (heads, N, N)
    if mask is None:
        attn_mask = bias
    else:
        nW = mask.shape[0]
        q, k, v = (t.view(B_ // nW, nW, heads, N, -1) for t in (q, k, v))
        attn_mask = bias + mask.to(q.dtype)[:, None]  # (nW, heads, N, N)
    drop = attn.attn_drop
    p = (drop.p if isinstance(drop, nn.Dropout) else float(drop or 0.0)) if attn.training else 0.0
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p, scale=attn.scale)
    out = out.reshape(B_, heads, N, -1).transpose(1, 2).reshape(B_, N, C)
    return attn.proj_drop(attn.proj(out)) if hasattr(attn, "proj_drop") else attn.proj(out)


def block_at_window(blk: nn.Module, x: torch.Tensor, H: int, W: int, ws: int, mask: torch.Tensor) -> torch.Tensor:
    """An upstream ``SwinTransformerBlock`` run with windows of ``ws`` instead of its own:
    x (B, H*W, C) -> (B, H*W, C). A shifted block rolls by ws // 2 and uses ``mask``."""
    from ..backbones.swin import window_partition, window_reverse

    B, L, C = x.shape
    if L != H * W:
        raise ValueError(f"{type(blk).__name__}: {L} tokens for an {H}x{W} map")
    shift = ws // 2 if blk.shift_size > 0 else 0
    h = blk.norm1(x).view(B, H, W, C)
    Hp, Wp = H + (-H) % ws, W + (-W) % ws
    if (Hp, Wp) != (H, W):
        h = F.pad(h, (0, 0, 0, Wp - W, 0, Hp - H))
    if shift:
        h = torch.roll(h, shifts=(-shift, -shift), dims=(1, 2))
    out = window_attention(blk.attn, window_partition(h, ws), mask if shift else None, ws)
    h = window_reverse(out, ws, Hp, Wp)
    if shift:
        h = torch.roll(h, shifts=(shift, shift), dims=(1, 2))
    x = x + blk.drop_path(h[:, :H, :W].reshape(B, L, C))
    return x + blk.drop_path(blk.mlp(blk.norm2(x)))
