"""EViT token reorganisation (Liang et al., ICLR 2022) at inference, training free:
operators, settings and the patch.

One keep step, with B batch, N patch tokens behind one cls token, K = ceil(rate * N)::

    x (B, 1 + N, C), cls_attn (B, N) --evit_keep--> x (B, 1 + K (+ 1), C), KeepInfo

The K patch tokens with the highest cls attention stay (in their original order); the
N - K others are dropped and, with ``fuse``, replaced by one token at the end: their
average weighted by cls attention normalised over the dropped set. (The official code
sums ``attn * x`` over the dropped tokens without normalising.) K = N is the identity.

Dense prediction needs the full grid back at the output taps. Each :class:`KeepInfo`
records the dropped tokens' values at its step; a chain of steps is simply the list of
their infos, oldest first, and ::

    evit_restore(infos, current (B, 1 + N_now, C)) -> (B, 1 + N0, C)

takes kept tokens from ``current`` and every dropped token from the step that dropped
it. A fused token may go on as an ordinary patch token into later steps (as in the
official code); it belongs to no grid position and is ignored at restore.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from ..checks import shape_of
from ..layers import gather_rows, no_autocast
from ..reduction.config import check_bool, check_rate
from ..reduction.core import (
    METHOD_KEY, TokenReducer, check_blocks, check_vit_blocks, patch_token_backbone, register_method, register_patch,
    run_vit_block)

__all__ = ["KeepInfo", "evit_keep", "evit_restore", "dropped_groups", "EViTSettings", "EViTTokens"]


@dataclass(frozen=True)
class KeepInfo:
    """One keep step.

    Attributes:
        kept: (B, K) long, ascending positions (0 .. N - 1) of the kept patch tokens.
        dropped: (B, N - K) long, ascending positions of the dropped patch tokens.
        dropped_values: (B, N - K, C) the dropped tokens' values at this step.
        num_tokens: N, patch tokens entering the step (cls not counted).
        fused: whether a fused token was appended after the kept tokens.
    """

    kept: torch.Tensor
    dropped: torch.Tensor
    dropped_values: torch.Tensor
    num_tokens: int
    fused: bool

    @property
    def num_out(self) -> int:
        """Patch tokens leaving the step, fused token included: K (+ 1)."""
        return self.kept.shape[1] + int(self.fused)


def evit_keep(x: torch.Tensor, cls_attn: torch.Tensor, keep_rate: float, fuse: bool = True):
    """Keep the patch tokens the cls token attends to most.

    Args:
        x: (B, 1 + N, C) cls token then N patch tokens, any float dtype.
        cls_attn: (B, N) the cls token's attention to each patch token (EViT averages
            it over heads). Ties: the lower position is kept first.
        keep_rate: in (0, 1]; K = math.ceil(keep_rate * N) tokens stay (as in the
            official code, so float products round up: 0.7 * 10 keeps 8).
        fuse: append one token fusing the dropped ones.

    Returns:
        x_new: (B, 1 + K, C), plus the fused token (B, 2 + K, C) if ``fuse`` and K < N;
            x itself when K = N.
        info: :class:`KeepInfo` for :func:`evit_restore`.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[1] < 2:
        shape = shape_of(x)
        raise ValueError(f"x must have shape (B, 1 + N, C) with N >= 1, got {shape}")
    B, N, C = x.shape[0], x.shape[1] - 1, x.shape[2]
    if not isinstance(cls_attn, torch.Tensor) or tuple(cls_attn.shape) != (B, N):
        shape = shape_of(cls_attn)
        raise ValueError(
            f"cls_attn must have shape (B, N) = {(B, N)} for x of shape {tuple(x.shape)}, got {shape}"
        )
    K = math.ceil(check_rate(keep_rate, "keep_rate") * N)
    if K >= N:
        every = torch.arange(N, device=x.device).expand(B, N)
        none = every[:, :0]
        return x, KeepInfo(every, none, x[:, 1:1], N, False)

    order = cls_attn.argsort(dim=1, descending=True, stable=True)
    kept, dropped = order[:, :K].sort(dim=1).values, order[:, K:].sort(dim=1).values
    patches = x[:, 1:]
    dropped_values = gather_rows(patches, dropped)  # (B, N - K, C)
    parts = [x[:, :1], gather_rows(patches, kept)]
    if fuse:
        with no_autocast(x.device):
            w = cls_attn.gather(1, dropped).float()  # (B, N - K)
            w = w / w.sum(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
            fused = (w.unsqueeze(-1) * dropped_values.float()).sum(dim=1, keepdim=True)
        parts.append(fused.to(x.dtype))
    return torch.cat(parts, dim=1), KeepInfo(kept, dropped, dropped_values, N, bool(fuse))


def evit_restore(infos: Sequence[KeepInfo], current: torch.Tensor) -> torch.Tensor:
    """Restore the full token sequence at a tap after a chain of keep steps.

    Args:
        infos: the :class:`KeepInfo` of every step so far, oldest first; step i + 1
            must take the tokens step i put out (``num_tokens == num_out``).
        current: (B, 1 + N_now, C) cls token then the current patch tokens, with the
            last step's fused token, if any, at the end (N_now = infos[-1].num_out).

    Returns:
        (B, 1 + N0, C), N0 = infos[0].num_tokens, in current's dtype: cls and kept
        tokens from ``current``, each dropped token as it was at its step.
    """
    infos = list(infos)
    if not infos:
        return current
    for i, (a, b) in enumerate(zip(infos, infos[1:])):
        if b.num_tokens != a.num_out:
            raise ValueError(
                f"infos[{i + 1}] takes {b.num_tokens} patch tokens, but infos[{i}] put out {a.num_out}"
            )
    B, N0 = infos[0].kept.shape[0], infos[0].num_tokens
    n_now = infos[-1].num_out
    ok = isinstance(current, torch.Tensor) and current.dim() == 3
    if not ok or tuple(current.shape[:2]) != (B, 1 + n_now):
        shape = shape_of(current)
        raise ValueError(f"current must have shape (B, 1 + N_now, C) = ({B}, {1 + n_now}, C), got {shape}")

    C = current.shape[2]
    # out has one spare row, N0, collecting the values of fused tokens (origin -1)
    out = current.new_empty(B, N0 + 1, C)
    origin = torch.arange(N0, device=current.device).expand(B, N0)  # grid index of each patch token
    spare = origin.new_full((B, 1), N0)
    for info in infos:
        to = origin.gather(1, info.dropped).unsqueeze(-1).expand(-1, -1, C)
        out.scatter_(1, to, info.dropped_values.to(out.dtype))
        origin = origin.gather(1, info.kept)
        if info.fused:
            origin = torch.cat([origin, spare], dim=1)
    out.scatter_(1, origin.unsqueeze(-1).expand(-1, -1, C), current[:, 1:])
    return torch.cat([current[:, :1], out[:, :N0]], dim=1)


def dropped_groups(infos: Sequence[KeepInfo]) -> torch.Tensor:
    """(B, N0) long group labels of the N0 original patch tokens after a chain of keep steps:
    a token kept through every step is a group of its own (label: its position), the tokens
    dropped at step i (fused into that step's token) form group N0 + i. A fused token that a
    later step drops has no grid position and adds nobody (its members stay in step i's
    group), as at :func:`evit_restore`. For pictures and checks."""
    infos = list(infos)
    B, N0 = infos[0].kept.shape[0], infos[0].num_tokens
    device = infos[0].kept.device
    # one spare column, N0, collects the fused tokens (no grid position)
    labels = torch.arange(N0 + 1, device=device).expand(B, N0 + 1).clone()
    origin = torch.arange(N0, device=device).expand(B, N0)  # grid position of each current token
    spare = origin.new_full((B, 1), N0)
    for step, info in enumerate(infos):
        labels.scatter_(1, origin.gather(1, info.dropped), N0 + step)
        origin = origin.gather(1, info.kept)
        if info.fused:
            origin = torch.cat([origin, spare], dim=1)
    return labels[:, :N0]


# ======================================================================================
# the method: settings (MODEL.TOKEN_REDUCTION.EVIT.*) and the ViT patch
# ======================================================================================
_KEY = "MODEL.TOKEN_REDUCTION.EVIT."


@dataclass(frozen=True)
class EViTSettings:
    """At each block of ``locations``, keep ``keep_rate`` of the grid tokens by the cls
    token's attention (between attention and MLP, as EViT does), fusing the rest into one
    token (``fuse``); every tap restores the dropped tokens from their last values."""

    locations: tuple[int, ...]
    keep_rate: float
    fuse: bool = True

    method = "evit"

    @classmethod
    def from_config(cls, cfg) -> "EViTSettings | None":
        e = cfg.MODEL.TOKEN_REDUCTION.EVIT
        return cls(tuple(e.LOCATIONS), e.KEEP_RATE, e.FUSE)

    @property
    def off(self) -> bool:
        """``KEEP_RATE`` 1 or no ``LOCATIONS``: every token kept; no patch is applied."""
        return self.keep_rate >= 1 or not self.locations

    def __post_init__(self):
        locs = list(self.locations)
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in locs) or \
                locs != sorted(set(locs)):
            raise ValueError(f"{_KEY}LOCATIONS must be increasing block indices >= 0, got {locs!r}")
        check_rate(self.keep_rate, _KEY + "KEEP_RATE")
        check_bool(self.fuse, _KEY + "FUSE")


def example(target):
    """"vit" only: keep a rate of the tokens at a quarter, half and three quarters of the
    depth (blocks 3, 6, 9 of 12, EViT's own), the rate (two decimals) chosen for the
    target's mean tokens per block (block i holds rate ** (locations before i) of them)."""
    if target.family != "vit":
        return None
    depth = target.depth
    locations = sorted({depth // 4, depth // 2, 3 * depth // 4} - {depth - 1}) or [0]
    share = target.mean_tokens() / (target.grid[0] * target.grid[1])

    def mean_share(rate):
        return sum(rate ** sum(loc < i for loc in locations) for i in range(depth)) / depth

    low, high = 0.0, 1.0
    for _ in range(40):  # mean_share increases with the rate
        mid = (low + high) / 2
        low, high = (mid, high) if mean_share(mid) < share else (low, mid)
    rate = min(0.99, max(0.01, round(high, 2)))
    return {_KEY + "LOCATIONS": locations, _KEY + "KEEP_RATE": rate}


register_method("evit", EViTSettings.from_config, "EVIT",
                {"LOCATIONS": [3, 6, 9], "KEEP_RATE": 1.0, "FUSE": True}, example=example,
                labels={_KEY + "LOCATIONS": "l{v}", _KEY + "KEEP_RATE": "k{v}"})


class KeepingPass:
    """One forward pass of EViT: the prefix count, what every keep step kept and fused (for
    the taps' restore) and where each current grid token stands."""

    def __init__(self, num_prefix_tokens):
        self.num_prefix_tokens, self.infos, self.positions = num_prefix_tokens, [], None


def _cls_and_grid(x, P):
    """(B, P + N, C) -> (B, 1 + N, C): the cls token (first) and the grid tokens."""
    return x if P == 1 else torch.cat([x[:, :1], x[:, P:]], dim=1)


def _with_prefix(x, y, P):
    """Put the prefix tokens of x back in front of y's grid part."""
    return y if P == 1 else torch.cat([x[:, :P], y[:, 1:]], dim=1)


class EViTTokens(TokenReducer):
    """EViT on a token-tap backbone (the first prefix token is the cls token; other prefix
    tokens, e.g. registers, are kept). Shapes: (B, P + N, C) -> keep -> (B, P + K (+ 1), C)
    -> taps (B, P + N, C). Kept tokens keep their grid positions; the fused token stands at
    the position of the dropped token the cls token attended to most (for blocks with
    rotary embeddings)."""

    def __init__(self, settings: EViTSettings):
        super().__init__()
        self.locations, self.keep_rate, self.fuse = set(settings.locations), settings.keep_rate, settings.fuse

    def start(self, x, grid, num_prefix_tokens):
        if num_prefix_tokens < 1:
            raise ValueError("EViT needs a cls token (num_prefix_tokens >= 1)")
        return KeepingPass(num_prefix_tokens)

    def block(self, index, blk, x, state, inputs):
        if index not in self.locations or self.keep_rate >= 1:
            return blk(x, **inputs)
        P = state.num_prefix_tokens

        def keep(x, attention_outputs):
            cls_attn = attention_outputs["cls_attn"]
            y, info = evit_keep(_cls_and_grid(x, P), cls_attn, self.keep_rate, self.fuse)
            if info.dropped.shape[1] == 0:
                return x
            state.infos.append(info)
            pos = state.positions
            if pos is None:
                pos = torch.arange(info.num_tokens, device=x.device).expand(x.shape[0], -1)
            parts = [pos.gather(1, info.kept)]
            if info.fused:
                heaviest = info.dropped.gather(1, cls_attn.gather(1, info.dropped).argmax(dim=1, keepdim=True))
                parts.append(pos.gather(1, heaviest))
            state.positions = torch.cat(parts, dim=1)
            return _with_prefix(x, y, P)

        return run_vit_block(blk, x, want_cls_attn=True, num_prefix_tokens=P, between=keep, **inputs)

    def tap(self, x, state):
        if not state.infos:
            return x
        P = state.num_prefix_tokens
        return _with_prefix(x, evit_restore(state.infos, _cls_and_grid(x, P)), P)

    def groups(self, state):
        return None if not state.infos else dropped_groups(state.infos)

    def extra_repr(self) -> str:
        return f"locations={sorted(self.locations)}, keep_rate={self.keep_rate}, fuse={self.fuse}"


@register_patch("evit", "vit")
def patch_vit(backbone, settings: EViTSettings) -> None:
    check_blocks(backbone, settings.locations, _KEY + "LOCATIONS")
    if not getattr(backbone, "has_class_token", True):
        raise ValueError(f"{METHOD_KEY}='evit' ranks tokens by the class token's attention, and "
                         f"{type(backbone).__name__} has no class token (its prefix tokens are registers)")
    check_vit_blocks(backbone, settings.locations, METHOD_KEY + "='evit'")
    patch_token_backbone(backbone, EViTTokens(settings), "EViT")


@register_patch("evit", "windowed")
def refuse_windowed(backbone, settings: EViTSettings) -> None:
    """EViT is refused on windowed ViTs, with the reason."""
    raise ValueError(f"{METHOD_KEY}='evit' does not apply to {type(backbone).__name__}, a windowed ViT: EViT ranks "
                     "tokens by a class token's attention, which SAM / ViTDet encoders do not have, and the tokens "
                     "it drops would leave ragged windows that window attention and the decomposed relative "
                     "positions cannot take; use expedit or pool (per window)")
