"""Token reduction as a patch on an unmodified backbone (the way ToMe's ``apply_patch`` works).

A *method* (expedit, tome, evit, pool, ...) is registered once with its settings type and,
per backbone *family*, a patch function ``patch(backbone, settings)``. A family is a
protocol, not a class list (:class:`expedit_d2.backbones.base.FamilyProtocol`, checked
structurally), so any backbone that follows it takes every method of that family without
changes: ``"vit"`` (:class:`~expedit_d2.backbones.base.TokenTapProtocol`), ``"swin"``
(:class:`~expedit_d2.backbones.base.SwinProtocol`) and ``"windowed"``
(:class:`~expedit_d2.reduction.windowed.WindowedProtocol`), each registered with
:func:`register_family`.

On the ``"vit"`` family, methods that change the token set say, per pass, which grid position
each of their grid tokens stands for (:meth:`TokenReducer.positions`); the blocks' grid
inputs are re-indexed to those positions (:func:`regrid_inputs`), so position-aware blocks
(rotary embeddings) see a valid position for every token.

Patching never touches parameters or buffers (checkpoint names stay the same); it attaches
a parameter-free ``token_reduction`` module and swaps the patched module's class for a
subclass that overrides one method (``forward_taps`` or a stage's ``forward_blocks``).
Everything a forward pass needs between blocks and taps lives in a state object created
per pass and handed explicitly from call to call. :func:`remove_patch` restores the
original classes; an unpatched backbone computes bitwise what it computed before.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones.base import (PRENORM_BLOCKS, FamilyProtocol, SwinProtocol, TokenTapProtocol, prenorm_block_classes,
                              register_prenorm_block, run_token_taps)

__all__ = [
    "Method", "register_method", "register_patch", "registered_methods", "get_method",
    "family_of", "apply_patch", "remove_patch", "TokenReducer", "SwinWindowReducer",
    "patch_token_backbone", "patch_swin_stage", "check_blocks", "run_vit_block", "METHOD_KEY",
    "regrid_inputs", "cell_positions", "check_vit_blocks", "has_swin_seam", "register_family", "swap_class",
    "register_prenorm_block", "PRENORM_BLOCKS", "FAMILIES", "reduction_statistics", "ExampleTarget",
    "example_settings",
]

#: the config key that selects the method
METHOD_KEY = "MODEL.TOKEN_REDUCTION.METHOD"


@dataclass(frozen=True)
class ExampleTarget:
    """What a method's example setting is made to match: expedit clustering a ``grid`` (H, W)
    of tokens to ``size`` (h, w) right after block ``location`` (before it for the swin and
    windowed families, whose ``grid`` is one attention window) of a ``depth``-block backbone
    of ``family``. The tests' settings of every method and the benchmarks' "methods at about
    equal GMACs" are each method's example for one target."""

    family: str
    depth: int
    grid: tuple[int, int]
    location: int
    size: tuple[int, int]

    def mean_tokens(self) -> float:
        """Tokens per block, averaged over the blocks, under expedit (the "vit" family:
        blocks 0..location see the whole grid, the rest the clusters)."""
        full, reduced = self.grid[0] * self.grid[1], self.size[0] * self.size[1]
        return ((self.location + 1) * full + (self.depth - self.location - 1) * reduced) / self.depth


@dataclass
class Method:
    """A registered method: how to read its settings, how to patch each family, and an
    example setting (config keys) for an :class:`ExampleTarget`."""

    name: str
    #: ``cfg -> settings`` (validated, errors name the key) or None (configured off)
    from_config: Callable[[Any], Any]
    #: defaults of ``MODEL.TOKEN_REDUCTION.<NODE>`` ({} when the method keeps its keys elsewhere)
    config_node: str | None = None
    config_defaults: dict = field(default_factory=dict)
    patches: dict[str, Callable] = field(default_factory=dict)
    #: ``ExampleTarget -> {dotted config key: value}`` (None where the method has no setting
    #: for the target's family)
    example: Callable[[ExampleTarget], dict | None] | None = None
    #: {config key: its short form in sweep point labels} ("a{v}", "{h}x{w}" for a pair)
    labels: dict = field(default_factory=dict)


_METHODS: dict[str, Method] = {}


def register_method(name: str, from_config, config_node: str | None = None,
                    config_defaults: dict | None = None, example=None, labels: dict | None = None) -> Method:
    """Register a method (once per name); ``example``, ``labels``: see :class:`Method`."""
    if name in _METHODS:
        raise ValueError(f"token-reduction method {name!r} is registered already")
    _METHODS[name] = Method(name, from_config, config_node, dict(config_defaults or {}), example=example,
                            labels=dict(labels or {}))
    return _METHODS[name]


def example_settings(target: ExampleTarget) -> dict[str, dict]:
    """``{method: config keys}``: the registered example of every method that has one for
    ``target``'s family and can patch that family, in registration order."""
    out = {}
    for name, method in _METHODS.items():
        keys = method.example(target) if method.example is not None and target.family in method.patches else None
        if keys is not None:
            out[name] = {METHOD_KEY: name, **keys}
    return out


def register_patch(method: str, family: str):
    """Decorator: ``@register_patch("tome", "vit") def patch(backbone, settings): ...``."""
    if family not in FAMILIES:
        raise ValueError(f"unknown backbone family {family!r}; families: {sorted(FAMILIES)}")

    def deco(fn):
        get_method(method).patches[family] = fn
        return fn

    return deco


def registered_methods() -> dict[str, Method]:
    return dict(_METHODS)


def get_method(name: str) -> Method:
    if name not in _METHODS:
        raise ValueError(f"{METHOD_KEY}={name!r} is not a token-reduction method; "
                         f"methods: {sorted(_METHODS) + ['none']}")
    return _METHODS[name]


# --------------------------------------------------------------------------------------
# families
# --------------------------------------------------------------------------------------
def has_swin_seam(stage: nn.Module) -> bool:
    """Whether a Swin stage has the family's own seam (``run_blocks``, ``forward_blocks``)."""
    return SwinProtocol.has_seam(stage)


#: family name -> its protocol (:class:`~expedit_d2.backbones.base.FamilyProtocol`)
FAMILIES: dict[str, type[FamilyProtocol]] = {}


def register_family(protocol: type[FamilyProtocol]) -> type[FamilyProtocol]:
    """Register a backbone family by its protocol class (once per ``protocol.family``);
    usable as a class decorator."""
    if not (isinstance(protocol, type) and issubclass(protocol, FamilyProtocol)) or not protocol.family:
        raise TypeError(f"register_family takes a FamilyProtocol subclass with a 'family' name, got {protocol!r}")
    if protocol.family in FAMILIES:
        raise ValueError(f"backbone family {protocol.family!r} is registered already")
    FAMILIES[protocol.family] = protocol
    return protocol


register_family(TokenTapProtocol)
register_family(SwinProtocol)


def family_of(backbone: nn.Module) -> str:
    problems = {}
    for name, protocol in FAMILIES.items():
        problems[name] = protocol.problem_of(backbone)
        if problems[name] is None:
            return name
    why = "; ".join(f"{name}: {problem}" for name, problem in problems.items())
    raise ValueError(f"{type(backbone).__name__} follows no token-reduction family protocol ({why}; "
                     "see expedit_d2.reduction.core)")


def apply_patch(backbone: nn.Module, settings) -> nn.Module:
    """Patch ``backbone`` in place with ``settings.method`` (returns it). Parameters untouched.
    Settings that are off (``settings.off``: expedit at location -1, ToMe with r 0, EViT
    keeping every token) apply no patch, for every method alike: the backbone is returned
    as it is."""
    if any(getattr(m, "token_reduction", None) is not None for m in backbone.modules()):
        raise ValueError(f"{type(backbone).__name__} is patched already; remove_patch() first")
    method = get_method(settings.method)
    family = family_of(backbone)
    if family not in method.patches:
        raise ValueError(f"{METHOD_KEY}={settings.method!r} has no patch for the {family!r} family of "
                         f"{type(backbone).__name__} (it has: {sorted(method.patches)})")
    if getattr(settings, "off", False):
        return backbone
    method.patches[family](backbone, settings)
    return backbone


def remove_patch(backbone: nn.Module) -> nn.Module:
    """Undo :func:`apply_patch`: original classes back, reducers removed (returns it)."""
    for m in backbone.modules():
        original = type(m).__dict__.get("_unpatched_class")
        if original is not None:
            m.__class__ = original
            del m.token_reduction
    return backbone


def reduction_statistics(model: nn.Module) -> dict[str, dict[str, int]]:
    """``{method: {name: count}}``: the :meth:`TokenReducer.statistics` of the reducers that
    the patches in ``model`` attached, summed per method (a reducer's method: its
    ``method`` attribute); methods whose counts are all 0 are left out."""
    out: dict[str, dict[str, int]] = {}
    for m in model.modules():
        if isinstance(m, TokenReducer):
            counts = out.setdefault(getattr(m, "method", type(m).__name__), {})
            for name, value in m.statistics().items():
                counts[name] = counts.get(name, 0) + int(value)
    return {method: counts for method, counts in out.items() if any(counts.values())}


def swap_class(module: nn.Module, prefix: str, overrides: dict) -> None:
    base = type(module)
    module.__class__ = type(f"{prefix}{base.__name__}", (base,),
                            {**overrides, "_unpatched_class": base, "__module__": base.__module__})


# --------------------------------------------------------------------------------------
# the "vit" family: a reducer driven by the block loop
# --------------------------------------------------------------------------------------
class TokenReducer(nn.Module):
    """What a method does on a token-tap backbone. No parameters.

    One forward pass: ``state = start(x, grid, P)``; for each block i: ``x = block(i, blk, x,
    state, inputs)`` (``inputs``: the block's keyword inputs, already re-indexed to
    ``positions(state)``), a tap at i reads ``tap(x, state)`` (full grid, (B, P + h*w, C)),
    then ``x = after_block(i, x, state)``. The defaults do nothing (the base computation).
    """

    def start(self, x: torch.Tensor, grid: tuple[int, int], num_prefix_tokens: int):
        return None

    def block(self, index: int, blk: nn.Module, x: torch.Tensor, state, inputs: dict) -> torch.Tensor:
        return blk(x, **inputs)

    def after_block(self, index: int, x: torch.Tensor, state) -> torch.Tensor:
        return x

    def tap(self, x: torch.Tensor, state) -> torch.Tensor:
        return x

    def statistics(self) -> dict[str, int]:
        """Counts this reducer kept over the passes since it was built, for the evaluation's
        results (``{name: count}``, summed over reducers and processes by
        :func:`reduction_statistics`); none by default. Not parameters, not buffers."""
        return {}

    def positions(self, state) -> torch.Tensor | None:
        """The grid position (row-major index into the h*w grid) that each current grid token
        stands for: None while the tokens are the grid itself, else (N',) shared by the batch
        or (B, N') per image. By default the pass state's ``positions`` attribute, which a
        method that changes the token set keeps up to date."""
        return getattr(state, "positions", None)

    def groups(self, state) -> torch.Tensor | None:
        """After a pass: which grid tokens the method put together, as a group label per grid
        token, (B, h*w) or (h*w,) shared by the batch, long, row-major (tokens with the same
        label in an image form one group); None while every token is its own group. Read by
        :func:`expedit_d2.reduction.groups.record_token_groups` for pictures and checks; never
        called during the forward pass. The default: none put together."""
        return None


def regrid_inputs(inputs: dict, positions: torch.Tensor | None) -> dict:
    """Re-index a block's grid inputs to the current tokens.

    Args:
        inputs: name -> tensor (..., h*w, D) whose dimension -2 runs over the grid tokens and
            that broadcasts against attention's (B, heads, N, D) (timm's rotary embeddings:
            (h*w, D), or (heads, h*w, D) per block).
        positions: None (unchanged), (N',) or (B, N') long grid indices.

    Returns:
        name -> (..., N', D) for shared positions, (B, ..., N', D) with the leading dimensions
        padded to 4 (heads broadcast) for per-image positions.
    """
    if positions is None or not inputs:
        return inputs
    out = {}
    for name, t in inputs.items():
        if positions.dim() == 1:
            out[name] = t.index_select(-2, positions)
        else:
            lead = t.dim() - 2
            g = t[..., positions, :].movedim(lead, 0)  # (B, *lead, N', D)
            while g.dim() < 4:
                g = g.unsqueeze(1)
            out[name] = g
    return out


def cell_positions(grid, size, device=None) -> torch.Tensor:
    """(h*w,) long: the grid token nearest the centre of each cell of an H x W grid pooled to
    h x w by ``adaptive_avg_pool2d`` (cell i spans rows floor(i*H/h) .. ceil((i+1)*H/h) - 1),
    row-major. The position a pooled token or a cluster initialised on that cell stands for."""
    (H, W), (h, w) = grid, size

    def centres(n, m):
        i = torch.arange(m, device=device)
        first, last = (i * n) // m, -((-(i + 1) * n) // m) - 1
        return (first + last) // 2

    return (centres(H, h)[:, None] * W + centres(W, w)[None, :]).reshape(-1)


def _reduced_forward_taps(self, images: torch.Tensor, taps):
    """``forward_taps`` of a patched token-tap backbone: the block loop driven by its reducer."""
    return run_token_taps(self, images, taps, self.token_reduction)


def check_blocks(backbone: nn.Module, indices, key: str) -> None:
    """Every block index in ``indices`` must exist in the token-tap backbone; the error names
    ``key``."""
    depth = len(backbone.blocks)
    bad = [i for i in indices if not 0 <= i < depth]
    if bad:
        raise ValueError(f"{key}={bad[0] if len(bad) == 1 else bad} is outside this ViT's blocks 0..{depth - 1}")


def patch_token_backbone(backbone: nn.Module, reducer: TokenReducer, prefix: str) -> None:
    backbone.token_reduction = reducer
    swap_class(backbone, prefix, {"forward_taps": _reduced_forward_taps})


def check_vit_blocks(backbone: nn.Module, indices, key: str) -> None:
    """Methods that act inside a block (ToMe, EViT) run it part by part (:func:`run_vit_block`),
    which knows the pre-norm blocks of :data:`PRENORM_BLOCKS` only (our ViT's, timm's
    ``Block`` and ``EvaBlock``). Any other block class among the blocks ``indices`` is refused
    here, naming ``key``, rather than computed wrongly."""
    known = prenorm_block_classes()
    for i in indices:
        blk = backbone.blocks[i]
        if not isinstance(blk, known):
            raise ValueError(f"{key}: block {i} is a {type(blk).__name__}; this method runs blocks in parts "
                             f"and knows only {', '.join(c.__name__ for c in known)} (pre-norm)")


def _qkv(attn: nn.Module, h: torch.Tensor):
    """(q, k, v), each (B, heads or kv heads, N, d), of timm's/our attention or EVA's."""
    B, N, _ = h.shape
    heads = attn.num_heads
    if getattr(attn, "qkv", None) is not None:
        if getattr(attn, "q_bias", None) is not None:  # EVA: q and v biases, k bias zero
            qkv = F.linear(h, attn.qkv.weight, torch.cat((attn.q_bias, attn.k_bias, attn.v_bias)))
        else:
            qkv = attn.qkv(h)
        return qkv.reshape(B, N, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    kv_heads = getattr(attn, "num_kv_heads", heads)
    q = attn.q_proj(h).reshape(B, N, heads, -1).transpose(1, 2)
    k = attn.k_proj(h).reshape(B, N, kv_heads, -1).transpose(1, 2)
    v = attn.v_proj(h).reshape(B, N, kv_heads, -1).transpose(1, 2)
    return q, k, v


def _rotate(t: torch.Tensor, rope: torch.Tensor, attn: nn.Module, like: torch.Tensor) -> torch.Tensor:
    """EVA's rotary embedding on the grid tokens (after the prefix tokens), as its attention does."""
    from timm.layers import apply_rot_embed_cat

    P = attn.num_prefix_tokens
    half = getattr(attn, "rotate_half", False)
    return torch.cat([t[:, :, :P], apply_rot_embed_cat(t[:, :, P:], rope, half=half)], dim=2).type_as(like)


def _layer_scale(blk: nn.Module, ls: str, gamma: str) -> Callable:
    if getattr(blk, ls, None) is not None:
        return getattr(blk, ls)  # timm Block: ls1 / ls2 (Identity without layer scale)
    g = getattr(blk, gamma, None)  # EvaBlock: gamma_1 / gamma_2 or None
    return (lambda t: t) if g is None else (lambda t: g * t)


def run_vit_block(blk: nn.Module, x: torch.Tensor, *, size: torch.Tensor | None = None,
                  want_metric: bool = False, want_cls_attn: bool = False,
                  num_prefix_tokens: int = 1, between: Callable | None = None,
                  rope: torch.Tensor | None = None) -> torch.Tensor:
    """A pre-norm ViT block run part by part, for methods that act inside it.

    ``x + attn(norm1(x))`` (with ``size``: ToMe's proportional attention, log(size) added to
    the logits; with ``rope``: EVA's rotary embedding of the grid tokens, as the block's
    ``rope`` input), then ``between(x, attention_outputs)`` (a dict: ``metric`` = keys averaged over heads
    (B, N, d), taken before the rotary embedding so that it compares content, ``cls_attn`` =
    the first token's attention to the grid tokens averaged over heads (B, N - P)), then ``x +
    mlp(norm2(x))``. Works with our ``Block``, timm's ``Block`` (layer scale, q/k norm, gate)
    and timm's ``EvaBlock`` (q/v biases, separate projections, grouped k/v heads, scale norm,
    rotary embedding, gamma layer scale); see :func:`check_vit_blocks`. Equals ``blk(x)`` up
    to float rounding when nothing is asked for.
    """
    attn = blk.attn
    for name in ("proj", "num_heads"):
        if not hasattr(attn, name):
            raise ValueError(f"{type(blk).__name__}.attn ({type(attn).__name__}) has no {name!r}: "
                             "this method needs a standard ViT attention (qkv, proj, num_heads)")
    B, N, C = x.shape
    h = blk.norm1(x)
    q, k, v = _qkv(attn, h)
    q, k = getattr(attn, "q_norm", nn.Identity())(q), getattr(attn, "k_norm", nn.Identity())(k)
    attention_outputs = {}
    if want_metric:
        attention_outputs["metric"] = k.mean(dim=1)
    if rope is not None:
        q, k = _rotate(q, rope, attn, v), _rotate(k, rope, attn, v)
    if k.shape[1] != q.shape[1]:  # grouped-query attention: kv head h // groups serves head h
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    scale = getattr(attn, "scale", q.shape[-1] ** -0.5)
    bias = None if size is None else size.log().to(q.dtype)[:, None, None, :, 0]
    if want_cls_attn:
        logits = (q * scale) @ k.transpose(-2, -1)
        if bias is not None:
            logits = logits + bias
        weights = logits.softmax(dim=-1)
        attention_outputs["cls_attn"] = weights[:, :, 0, num_prefix_tokens:].mean(dim=1)
        out = weights @ v
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
    out = getattr(attn, "norm", nn.Identity())(out.transpose(1, 2).reshape(B, N, -1))
    if getattr(attn, "gate", None) is not None:  # gated attention (timm, EVA)
        out = out * attn.gate(h).sigmoid()
    out = attn.proj_drop(attn.proj(out))
    drop1 = getattr(blk, "drop_path1", None) or blk.drop_path
    drop2 = getattr(blk, "drop_path2", None) or blk.drop_path
    x = x + drop1(_layer_scale(blk, "ls1", "gamma_1")(out))
    if between is not None:
        x = between(x, attention_outputs)
    return x + drop2(_layer_scale(blk, "ls2", "gamma_2")(blk.mlp(blk.norm2(x))))


# --------------------------------------------------------------------------------------
# the "swin" family: per-window reduction inside one stage
# --------------------------------------------------------------------------------------
class SwinWindowReducer(nn.Module):
    """Reduce each ws x ws attention window of a Swin stage to s x s tokens before block
    ``block_index`` of the stage, run the rest of the stage on the reduced map with window
    s (blocks roll by s // 2, resized relative-position bias), restore every window at the
    end of the stage (before patch merging). No parameters.

    Subclasses define ``reduce(windows (B*nW, ws*ws, C), ws) -> (windows (B*nW, s*s, C),
    state)``, ``restore(windows (B*nW, s*s, C'), state) -> (B*nW, ws*ws, C')`` and
    ``mask_shift(ws)`` (where the shifted-window mask cuts its regions).

    Shapes: x (B, H*W, C) -> pad to (Hp, Wp) multiples of ws (zeros take part) -> windows ->
    reduced map (B, Hp/ws*s, Wp/ws*s, C) -> later blocks -> restored -> crop -> (B, H*W, C).
    """

    def __init__(self, block_index: int, side: int):
        super().__init__()
        self.block_index, self.side = block_index, side

    def reduce(self, windows, ws):
        raise NotImplementedError

    def restore(self, windows, state):
        raise NotImplementedError

    def mask_shift(self, ws: int) -> int:
        return self.side // 2

    def window_groups(self, state, ws: int) -> torch.Tensor | None:
        """Which tokens of each window ``reduce`` put together: a group label per token of
        every window, (B*nW, ws*ws) or (ws*ws,) shared by the windows, long, row-major inside
        the window; None while every token is its own group. ``state`` is what ``reduce``
        returned. As :meth:`TokenReducer.groups`, for pictures and checks only."""
        return None

    def forward(self, stage, x, H, W):
        from ..backbones.swin import window_partition, window_reverse

        ws, s = stage.window_size, self.side
        x = stage.run_blocks(x, H, W, 0, self.block_index)
        B, _, C = x.shape
        Hp, Wp = H + (-H) % ws, W + (-W) % ws
        grid = F.pad(x.view(B, H, W, C), (0, 0, 0, Wp - W, 0, Hp - H))
        small, state = self.reduce(window_partition(grid, ws), ws)
        h2, w2 = Hp // ws * s, Wp // ws * s
        y = window_reverse(small, s, h2, w2).reshape(B, h2 * w2, C)
        y = stage.run_blocks(y, h2, w2, self.block_index, None, window_size=s, mask_shift=self.mask_shift(ws))
        full = self.restore(window_partition(y.view(B, h2, w2, -1), s), state)
        return window_reverse(full, ws, Hp, Wp)[:, :H, :W].reshape(B, H * W, -1)

    def extra_repr(self) -> str:
        return f"block_index={self.block_index}, side={self.side}"


def _reduced_forward_blocks(self, x, H, W):
    return self.token_reduction(self, x, H, W)


def patch_swin_stage(stage: nn.Module, reducer: SwinWindowReducer, prefix: str) -> None:
    """Attach ``reducer`` and override the stage's ``forward_blocks``; a stage of the upstream
    layout also gets the family seam (:func:`~expedit_d2.reduction.upstream_swin.adapt_upstream_stage`)."""
    from .upstream_swin import adapt_upstream_stage

    overrides = {"forward_blocks": _reduced_forward_blocks}
    if not has_swin_seam(stage):
        overrides = adapt_upstream_stage(overrides)
    stage.token_reduction = reducer
    swap_class(stage, prefix, overrides)


def swin_stage_at(backbone: nn.Module, location: int, key: str):
    """(stage, block index inside it) of global block ``location`` (blocks over all stages)."""
    depths = [len(s.blocks) for s in backbone.layers]
    if not 0 <= location < sum(depths):
        raise ValueError(f"{key}={location} is outside this Swin's blocks 0..{sum(depths) - 1} "
                         f"(depths {depths})")
    first = 0
    for stage, depth in zip(backbone.layers, depths):
        if location < first + depth:
            return stage, location - first
        first += depth
