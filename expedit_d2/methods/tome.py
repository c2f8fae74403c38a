"""Token Merging (Bolya et al., ICLR 2023), training free: operators, settings and the patch.

One merge step, with B batch, N tokens, r merged away, M = N - r::

    info = bipartite_soft_matching(metric (B, N, C'), r)
    x (B, N, C), size (B, N, 1) --merge_wavg--> x (B, M, C), size (B, M, 1)
    x (B, M, C) --unmerge--> x (B, N, C)

Matching: after the ``num_protected`` leading tokens (cls), which are never merged,
tokens alternate between set A (even offsets) and set B (odd offsets). Each A token
finds its most cosine-similar B token; the r A tokens with the highest such
similarity are merged into their match (ties: the lower A index first).

Everything a step does is one map ``dest`` (B, N): the merged token that each token
goes into. The merged sequence holds the protected tokens, then the unmerged A tokens,
then the B tokens, each group in its original order (r = 0 is the identity instead).
Several steps chain through a ``source`` map (B, N0) from the N0 original tokens to the
current ones: ``source = update_source(source, info)`` after every step, then
``unmerge_with_source(x, source)`` restores the full (B, N0, C) sequence.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..checks import shape_of
from ..layers import gather_rows, no_autocast
from ..reduction.config import check_bool, check_int_at_least
from ..reduction.core import (
    METHOD_KEY, TokenReducer, check_blocks, check_vit_blocks, patch_token_backbone, register_method, register_patch,
    run_vit_block)
from ..reduction.windowed import WindowedReducer, check_location, patch_windowed, window_size_of

__all__ = [
    "ToMeSettings",
    "ToMeTokens",
    "ToMeWindows",
    "MergeInfo",
    "bipartite_soft_matching",
    "merge_wavg",
    "unmerge",
    "update_source",
    "unmerge_with_source",
    "merged_positions",
]


@dataclass(frozen=True)
class MergeInfo:
    """One merge step.

    Attributes:
        dest: (B, N) long, the index in the merged sequence (0 .. N - r - 1) of the
            token that each input token goes into.
        num_tokens: N, tokens before the merge.
        r: tokens merged away (after clamping); N - r tokens remain.
        num_protected: P, leading tokens kept as they are (in front).
    """

    dest: torch.Tensor
    num_tokens: int
    r: int
    num_protected: int = 0

    @property
    def num_out(self) -> int:
        """Tokens after the merge, N - r."""
        return self.num_tokens - self.r


def _check_tokens(x: torch.Tensor, name: str, batch: int, tokens: int, what: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        shape = shape_of(x)
        raise ValueError(f"{name} must have shape (B, N, C), got {shape}")
    if x.shape[0] != batch or x.shape[1] != tokens:
        raise ValueError(
            f"{name} has shape {tuple(x.shape)}, but {what} needs batch {batch} and {tokens} tokens"
        )


def bipartite_soft_matching(metric: torch.Tensor, r: int, num_protected: int = 1) -> MergeInfo:
    """Plan one ToMe merge of r tokens.

    Args:
        metric: (B, N, C') features to match on (ToMe uses the attention keys averaged
            over heads); similarity is their cosine, computed in float32.
        r: tokens to merge away, >= 0; clamped to |A| (to 0 when B is empty).
        num_protected: leading tokens (cls) that are never merged, 0 <= P <= N.

    Returns:
        :class:`MergeInfo` for :func:`merge_wavg` / :func:`unmerge`.
    """
    if not isinstance(metric, torch.Tensor) or metric.dim() != 3:
        shape = shape_of(metric)
        raise ValueError(f"metric must have shape (B, N, C), got {shape}")
    if not metric.is_floating_point():
        raise ValueError(f"metric must be a floating-point tensor, got {metric.dtype}")
    r = check_int_at_least(r, "r", 0)
    P = check_int_at_least(num_protected, "num_protected", 0)
    B, N, _ = metric.shape
    if P > N:
        raise ValueError(f"num_protected={P} exceeds the number of tokens N={N}")
    n_a, n_b = (N - P + 1) // 2, (N - P) // 2
    r = min(r, n_a) if n_b > 0 else 0
    device = metric.device
    if r == 0:
        return MergeInfo(torch.arange(N, device=device).expand(B, N), N, 0, P)

    with no_autocast(device):
        m = F.normalize(metric[:, P:].float(), dim=-1)
        scores = m[:, 0::2] @ m[:, 1::2].transpose(1, 2)  # (B, n_a, n_b) cosines A x B
    best, match = scores.max(dim=-1)  # (B, n_a): best similarity, its B index
    order = best.argsort(dim=-1, descending=True, stable=True)
    merged = torch.zeros(B, n_a, dtype=torch.bool, device=device)
    top = order[:, :r]
    merged.scatter_(1, top, torch.ones_like(top, dtype=torch.bool))  # (the src form traces)

    # positions in the merged sequence: protected 0..P-1, unmerged A next, then B
    b_pos = P + (n_a - r) + torch.arange(n_b, device=device)  # (n_b,)
    a_pos = torch.where(merged, b_pos[match], P - 1 + (~merged).cumsum(dim=1))  # (B, n_a)
    dest = torch.empty(B, N, dtype=torch.long, device=device)
    dest[:, :P] = torch.arange(P, device=device)
    dest[:, P::2] = a_pos
    dest[:, P + 1 :: 2] = b_pos
    return MergeInfo(dest, N, r, P)


def merge_wavg(info: MergeInfo, x: torch.Tensor, size: torch.Tensor | None = None):
    """Merge tokens by size-weighted average (a merged token's size is its members' sum).

    Args:
        info: the step from :func:`bipartite_soft_matching`.
        x: (B, N, C) tokens, any float dtype (averaged in float32).
        size: (B, N, 1) tokens' sizes (original tokens each one represents); None
            means all ones (float32).

    Returns:
        x_merged: (B, N - r, C) in x's dtype, order as in the module docstring; the
            protected tokens are copied exactly.
        size_merged: (B, N - r, 1) in size's dtype.
    """
    B, N = info.dest.shape
    _check_tokens(x, "x", B, N, "the merge")
    if size is None:
        size = torch.ones(B, N, 1, device=x.device)
    elif not isinstance(size, torch.Tensor) or tuple(size.shape) != (B, N, 1):
        shape = shape_of(size)
        raise ValueError(f"size must have shape (B, N, 1) = {(B, N, 1)}, got {shape}")
    if info.r == 0:
        return x, size
    M, C = info.num_out, x.shape[2]
    index = info.dest.unsqueeze(-1)  # (B, N, 1)
    with no_autocast(x.device):
        s = size.float()
        total = s.new_zeros(B, M, 1).scatter_add_(1, index, s)
        summed = s.new_zeros(B, M, C).scatter_add_(1, index.expand(B, N, C), x.float() * s)
    merged = (summed / total).to(x.dtype)
    merged[:, : info.num_protected] = x[:, : info.num_protected]
    return merged, total.to(size.dtype)


def unmerge_with_source(x: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Copy merged tokens back: out[b, i] = x[b, source[b, i]].

    Args:
        x: (B, M, C) current (merged) tokens.
        source: (B, N0) long, the current token that each original token is in.

    Returns:
        (B, N0, C) in x's dtype.
    """
    if not isinstance(source, torch.Tensor) or source.dim() != 2 or source.dtype != torch.long:
        is_tensor = isinstance(source, torch.Tensor)
        desc = f"{tuple(source.shape)} {source.dtype}" if is_tensor else type(source).__name__
        raise ValueError(f"source must be a (B, N0) long tensor, got {desc}")
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[0] != source.shape[0]:
        shape = shape_of(x)
        raise ValueError(f"x must have shape (B, M, C) with B = {source.shape[0]}, got {shape}")
    return gather_rows(x, source)


def unmerge(info: MergeInfo, x_merged: torch.Tensor) -> torch.Tensor:
    """Undo one merge: (B, N - r, C) -> (B, N, C), each token gets its merged token's value."""
    B = info.dest.shape[0]
    _check_tokens(x_merged, "x_merged", B, info.num_out, f"a merge of {info.num_tokens} - {info.r} tokens")
    return unmerge_with_source(x_merged, info.dest)


def update_source(source: torch.Tensor | None, info: MergeInfo) -> torch.Tensor:
    """Compose the original -> current map with one more merge.

    Args:
        source: (B, N0) long map from original tokens to the N tokens entering this
            merge, or None before the first merge (the identity).
        info: the merge step.

    Returns:
        (B, N0) long map from original tokens to the N - r merged tokens.
    """
    if source is None:
        return info.dest
    if not isinstance(source, torch.Tensor) or source.dim() != 2 or source.shape[0] != info.dest.shape[0]:
        shape = shape_of(source)
        raise ValueError(f"source must have shape (B, N0) with B = {info.dest.shape[0]}, got {shape}")
    return info.dest.gather(1, source)


def merged_positions(info: MergeInfo, positions: torch.Tensor) -> torch.Tensor:
    """Where the merged tokens stand on the grid: a merged token takes the position of its B
    token (the one the A tokens merge into), every other token keeps its own.

    Args:
        info: the merge step (its protected tokens have no position).
        positions: (B, N - P) long grid positions of the tokens entering the merge.

    Returns:
        (B, N - r - P) long.
    """
    B, N = info.dest.shape
    P, M = info.num_protected, info.num_out
    if tuple(positions.shape) != (B, N - P):
        raise ValueError(f"positions must have shape (B, N - P) = {(B, N - P)}, got {tuple(positions.shape)}")
    if info.r == 0:
        return positions
    dest = info.dest[:, P:]
    is_a = torch.arange(N - P, device=dest.device) % 2 == 0
    merged_away = is_a & (dest >= P + (N - P + 1) // 2 - info.r)  # A tokens gone into their B token
    slot = torch.where(merged_away, torch.full_like(dest, M), dest)  # one spare slot, M, takes them
    return positions.new_zeros(B, M + 1).scatter_(1, slot, positions)[:, P:M]


# ======================================================================================
# the method: settings (MODEL.TOKEN_REDUCTION.TOME.*) and the ViT patch
# ======================================================================================
_KEY = "MODEL.TOKEN_REDUCTION.TOME."


@dataclass(frozen=True)
class ToMeSettings:
    """Merge ``r`` tokens in every block from ``start_block`` on (between attention and MLP,
    as ToMe does), with proportional attention; every tap is unmerged to the full grid."""

    r: int
    start_block: int = 0
    proportional_attention: bool = True

    method = "tome"

    @classmethod
    def from_config(cls, cfg) -> "ToMeSettings | None":
        t = cfg.MODEL.TOKEN_REDUCTION.TOME
        return cls(t.R, t.START_BLOCK, t.PROPORTIONAL_ATTENTION)

    @property
    def off(self) -> bool:
        """``R`` 0: nothing merged; no patch is applied."""
        return self.r == 0

    def __post_init__(self):
        check_int_at_least(self.r, _KEY + "R", 0)
        check_int_at_least(self.start_block, _KEY + "START_BLOCK", 0)
        check_bool(self.proportional_attention, _KEY + "PROPORTIONAL_ATTENTION")


def example(target):
    """"vit": merge from block 0 with ``r`` chosen for the target's mean tokens per block
    (block i holds about N - r (i + 1/2) tokens); "windowed": merge every window to the
    target's size at its location. None for "swin"."""
    if target.family == "windowed":
        return {_KEY + "R": target.grid[0] * target.grid[1] - target.size[0] * target.size[1],
                _KEY + "START_BLOCK": target.location}
    if target.family != "vit":
        return None
    full = target.grid[0] * target.grid[1]
    r = max(1, round(2 * (full - target.mean_tokens()) / target.depth))
    return {_KEY + "R": r, _KEY + "START_BLOCK": 0}


register_method("tome", ToMeSettings.from_config, "TOME",
                {"R": 0, "START_BLOCK": 0, "PROPORTIONAL_ATTENTION": True}, example=example,
                labels={_KEY + "R": "r{v}", _KEY + "START_BLOCK": "s{v}"})


class MergeState:
    """One forward pass: prefix count, sizes of the current tokens, original -> current map,
    grid positions of the current grid tokens (None: the grid itself)."""

    def __init__(self, num_prefix_tokens):
        self.num_prefix_tokens, self.size, self.source, self.positions = num_prefix_tokens, None, None, None


class ToMeTokens(TokenReducer):
    """ToMe on a token-tap backbone: blocks from ``start_block`` merge ``r`` tokens each
    (prefix tokens protected), taps copy merged tokens back to their members. A merged
    token stands at its B token's grid position (for blocks with rotary embeddings).

    Shapes: (B, P + N, C) -> block i merges to (B, P + N_i - r, C) -> taps (B, P + N, C).
    """

    def __init__(self, settings: ToMeSettings):
        super().__init__()
        self.r, self.start_block = settings.r, settings.start_block
        self.proportional_attention = settings.proportional_attention

    def start(self, x, grid, num_prefix_tokens):
        return MergeState(num_prefix_tokens)

    def block(self, index, blk, x, state, inputs):
        merge_here = self.r > 0 and index >= self.start_block
        size = state.size if self.proportional_attention else None
        if not merge_here and size is None:
            return blk(x, **inputs)

        def merge(x, attention_outputs):
            P = state.num_prefix_tokens
            info = bipartite_soft_matching(attention_outputs["metric"], self.r, P)
            if info.r == 0:
                return x
            x, state.size = merge_wavg(info, x, state.size)
            state.source = update_source(state.source, info)
            if state.positions is None:
                state.positions = torch.arange(info.num_tokens - P, device=x.device).expand(x.shape[0], -1)
            state.positions = merged_positions(info, state.positions)
            return x

        return run_vit_block(blk, x, size=size, want_metric=merge_here,
                             between=merge if merge_here else None, **inputs)

    def tap(self, x, state):
        return x if state.source is None else unmerge_with_source(x, state.source)

    def groups(self, state):
        # the merged token each grid token ended in (prefix tokens are never merged)
        return None if state.source is None else state.source[:, state.num_prefix_tokens:]

    def extra_repr(self) -> str:
        return f"r={self.r}, start_block={self.start_block}, prop_attn={self.proportional_attention}"


@register_patch("tome", "vit")
def patch_vit(backbone, settings: ToMeSettings) -> None:
    check_blocks(backbone, [settings.start_block], _KEY + "START_BLOCK")
    check_vit_blocks(backbone, range(settings.start_block, len(backbone.blocks)), METHOD_KEY + "='tome'")
    patch_token_backbone(backbone, ToMeTokens(settings), "ToMe")


# --------------------------------------------------------------------------------------
# windowed ViTs (SAM, ViTDet): the same merge count in every window, once
# --------------------------------------------------------------------------------------
class ToMeWindows(WindowedReducer):
    """ToMe per window on a windowed ViT, merging the same number of tokens in every window
    so that the windows stay aligned grids.

    Right before block ``start_block``, each ws x ws window's tokens are merged, by
    bipartite soft matching on the tokens themselves (cosine) and size-weighted averages,
    in rounds of at most half the tokens, until s*s = ws*ws - ``r`` remain (``r`` must leave
    a square). The s*s merged tokens of a window are laid out on an s x s grid in the
    row-major order of the grid position each stands for (a merged token stands at its B
    token's, as on plain ViTs), so later window blocks attend within the window at window s
    and global blocks see the stitched grid. After the last block every original token takes
    its merged token's value (unmerge). The blocks' own attention runs unchanged, so there
    is no proportional attention here.
    """

    def __init__(self, location: int, side: int):
        super().__init__(location, side)

    def reduce(self, windows, ws):
        x, size, source = windows, None, None
        positions = torch.arange(ws * ws, device=x.device).expand(x.shape[0], -1)
        left = ws * ws - self.side ** 2
        while left > 0:
            info = bipartite_soft_matching(x, left, num_protected=0)
            x, size = merge_wavg(info, x, size)
            source = update_source(source, info)
            positions = merged_positions(info, positions)
            left -= int(info.r)  # an int under torch.jit.trace too (fvcore), where shapes are tensors
        order = positions.argsort(dim=1)  # merged tokens by the grid position they stand for
        x = gather_rows(x, order)
        return x, order.argsort(dim=1).gather(1, source)  # original token -> its place on the grid

    def restore(self, windows, source):
        return unmerge_with_source(windows, source)


@register_patch("tome", "windowed")
def patch_windowed_vit(backbone, settings: ToMeSettings) -> None:
    check_location(backbone, settings.start_block, _KEY + "START_BLOCK")
    ws = window_size_of(backbone)
    side = math.isqrt(max(ws * ws - settings.r, 0))
    if not 0 < settings.r < ws * ws or side * side != ws * ws - settings.r:
        raise ValueError(f"{_KEY}R={settings.r}: a windowed ViT merges R of each window's {ws}x{ws} tokens so "
                         f"that a square s x s remains (R = {ws * ws} - s*s, e.g. {ws * ws - (ws - 1) ** 2} for "
                         f"s = {ws - 1})")
    patch_windowed(backbone, ToMeWindows(settings.start_block, side), "ToMe")
