"""What our backbones share: the family protocols that token reduction and the projects
rely on, and the Detectron2 side (named outputs res2..res5 at strides 4..32).

A *family protocol* (:class:`FamilyProtocol`) is an abstract base class naming what a module
must have for the token-reduction methods of one family. It is checked structurally
(:meth:`FamilyProtocol.problem_of`), so a user's module follows it without subclassing it;
our backbones subclass it, which states the members as abstract methods:

* :class:`TokenTapProtocol` -- ``"vit"``: plain ViTs, ViT-Hybrid, timm ViTs (token taps);
* :class:`TappedBackboneProtocol` -- a token-tap backbone with its taps, what DPT needs;
* :class:`SwinProtocol` -- ``"swin"``: Swin stages with the stage seam;
* the ``"windowed"`` family (SAM, ViTDet) has its protocol with its code,
  :class:`expedit_d2.reduction.windowed.WindowedProtocol`.

:mod:`expedit_d2.reduction.core` finds a backbone's family through these classes
(:func:`~expedit_d2.reduction.core.register_family`).
"""
from __future__ import annotations

import abc
import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from detectron2.modeling import Backbone, ShapeSpec
from torch import nn

__all__ = ["FamilyProtocol", "TokenTapProtocol", "PRENORM_BLOCKS", "register_prenorm_block", "prenorm_block_classes", "TappedBackboneProtocol", "SwinProtocol",
           "MultiScaleBackbone", "TokenTapBackbone", "run_token_taps", "block_inputs_of"]


class FamilyProtocol(abc.ABC):
    """What a module needs for one backbone family's token-reduction methods."""

    #: the family's name (``MODEL.TOKEN_REDUCTION`` methods register patches per family)
    family: ClassVar[str] = ""

    @classmethod
    @abc.abstractmethod
    def problem_of(cls, module: nn.Module) -> str | None:
        """None when ``module`` follows the protocol, else what it lacks (one line)."""

    @classmethod
    def follows(cls, module: nn.Module) -> bool:
        return cls.problem_of(module) is None


class TokenTapProtocol(FamilyProtocol):
    """The ``"vit"`` family: a ViT whose token sequences after given blocks are its output.

    Members::

        num_prefix_tokens: int                  cls (+ register) tokens in front of the grid
        blocks: nn.ModuleList | nn.Sequential   pre-norm transformer blocks, x -> blk(x, **inputs)
        embed_tokens(images) -> (x (B, P + h*w, C), grid (h, w), extras)
        forward_taps(images, taps) -> ([x after each tap block (B, P + h*w, C)], grid, extras)
        block_inputs(grid) -> [dict per block] | None   optional: keyword inputs of the blocks
                                                whose dimension -2 runs over the h*w grid
                                                tokens (EVA's rotary embedding "rope")

    ``extras`` is whatever the embedding computed besides the tokens that the backbone's
    own outputs need, passed through untouched (a hybrid's CNN stage maps; [] otherwise).
    Token reduction patches ``forward_taps``; :func:`run_token_taps` is its plain form.
    """

    family = "vit"

    @abc.abstractmethod
    def embed_tokens(self, images: torch.Tensor):
        """(B, 3, H, W) -> (tokens (B, P + h*w, C), grid (h, w), extras)."""

    def forward_taps(self, images: torch.Tensor, taps):
        """(B, 3, H, W) -> (tokens after each tap block (B, P + h*w, C), grid (h, w), extras)."""
        return run_token_taps(self, images, taps)

    @classmethod
    def problem_of(cls, module: nn.Module) -> str | None:
        for name in ("embed_tokens", "forward_taps"):
            if not callable(getattr(module, name, None)):
                return f"no method {name!r}"
        if not isinstance(getattr(module, "blocks", None), (nn.ModuleList, nn.Sequential)):
            return "no 'blocks' (nn.ModuleList)"
        if not isinstance(getattr(module, "num_prefix_tokens", None), int):
            return "no int 'num_prefix_tokens'"
        return None


#: block classes whose forward is ``x + ls1(attn(norm1(x))); x + ls2(mlp(norm2(x)))``: the
#: "vit" family methods that act inside a block (ToMe, EViT) run those part by part
#: (:func:`expedit_d2.reduction.core.run_vit_block`) and refuse others. Each backbone file
#: registers its own: a class, or ``"module:Class"`` for a library's class that should not be
#: imported just for this (it can only be met once its module is imported).
PRENORM_BLOCKS: list = []


def register_prenorm_block(cls):
    """Register a pre-norm ViT block class or ``"module:Class"`` (usable as a decorator)."""
    if cls not in PRENORM_BLOCKS:
        PRENORM_BLOCKS.append(cls)
    return cls


def prenorm_block_classes() -> tuple[type, ...]:
    """The registered pre-norm block classes whose modules are imported."""
    import sys

    classes = []
    for entry in PRENORM_BLOCKS:
        if isinstance(entry, str):
            module, name = entry.split(":")
            if module not in sys.modules:
                continue
            entry = getattr(sys.modules[module], name)
        classes.append(entry)
    return tuple(classes)


class TappedBackboneProtocol(TokenTapProtocol):
    """A token-tap backbone with its own taps (what DPT's decoder needs of it).

    Members, besides :class:`TokenTapProtocol`'s::

        taps: 4 indices, the first ``num_cnn_taps`` of them into the CNN stage maps (extras)
        num_cnn_taps: int
        tap_channels: channels of the 4 taps
        size_divisibility: int

    ``num_prefix_tokens``' first token is the cls token that DPT's readout uses.
    """

    members = ("taps", "num_cnn_taps", "tap_channels", "size_divisibility")

    @classmethod
    def problem_of(cls, module: nn.Module) -> str | None:
        problem = super().problem_of(module)
        missing = [name for name in cls.members if not hasattr(module, name)]
        if problem is None and missing:
            problem = f"no {', '.join(repr(m) for m in missing)}"
        return problem


class SwinProtocol(FamilyProtocol):
    """The ``"swin"`` family: ``layers``, a non-empty ``nn.ModuleList`` of stages, each with
    ``blocks``, ``window_size`` and the stage seam::

        run_blocks(x, H, W, start, stop, window_size, mask_shift)  blocks start..stop-1
        forward_blocks(x, H, W)                     all blocks of the stage, before merging

    or a stage of the upstream layout that Mask2Former, OneFormer and MaskDINO copy
    (``BasicLayer`` / ``SwinTransformerBlock``), which patching gives that seam
    (:mod:`expedit_d2.reduction.upstream_swin`)."""

    family = "swin"

    @staticmethod
    def has_seam(stage: nn.Module) -> bool:
        """Whether a stage has the family's own seam (``run_blocks``, ``forward_blocks``)."""
        return callable(getattr(stage, "forward_blocks", None)) and callable(getattr(stage, "run_blocks", None))

    @classmethod
    def problem_of(cls, module: nn.Module) -> str | None:
        from ..reduction.upstream_swin import upstream_stage_problem

        layers = getattr(module, "layers", None)
        if not isinstance(layers, nn.ModuleList) or not len(layers):
            return "no 'layers' (a non-empty nn.ModuleList of stages)"
        for i, stage in enumerate(layers):
            problem = None if cls.has_seam(stage) else upstream_stage_problem(stage)
            if problem:
                return f"layers[{i}]{problem}"
        return None


class MultiScaleBackbone(Backbone):
    """Mixin: ``_setup_outputs`` validates the requested names, ``output_shape`` and
    ``size_divisibility`` follow from them."""

    names = ("res2", "res3", "res4", "res5")

    def _setup_outputs(self, requested, channels, config_key: str) -> None:
        names = self.names[: len(channels)]
        unknown = [f for f in requested if f not in names]
        if unknown:
            raise ValueError(f"{config_key} has {unknown}; valid names are {list(names)}")
        self._out_features = list(requested)
        self._out_feature_strides = {n: 4 * 2**i for i, n in enumerate(names)}
        self._out_feature_channels = dict(zip(names, channels))

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4:
            raise ValueError(f"{type(self).__name__} takes (N, C, H, W) input, got {tuple(x.shape)}")

    def output_shape(self):
        return {n: ShapeSpec(channels=self._out_feature_channels[n],
                             stride=self._out_feature_strides[n]) for n in self._out_features}

    @property
    def size_divisibility(self) -> int:
        return 32


class TokenTapBackbone(MultiScaleBackbone, TappedBackboneProtocol):
    """Base of our token-tap backbones (plain ViT, ViT-Hybrid, timm ViTs): their taps, token
    sequences (B, P + h*w, C), become the Detectron2 maps res2..res5 at strides 4..32
    (parameter-free: resized bilinearly up, average-pooled down)."""

    num_prefix_tokens = 1

    def _tokens_to_map(self, t: torch.Tensor, grid) -> torch.Tensor:
        """(B, P + h*w, C) -> (B, C, h, w)."""
        return t[:, self.num_prefix_tokens:].transpose(1, 2).reshape(t.shape[0], -1, *grid)

    @staticmethod
    def _resample(x: torch.Tensor, size) -> torch.Tensor:
        """Parameter-free resampling to ``size``: bilinear up, average-pooled down."""
        if size[0] >= x.shape[-2] and size[1] >= x.shape[-1]:
            return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return F.adaptive_avg_pool2d(x, size)

    def _maps_to_outputs(self, maps, image_size) -> dict[str, torch.Tensor]:
        """Maps at the token stride (or already right-sized) -> the requested res2..res5."""
        H, W = image_size
        out = {}
        for name, m in zip(self.names, maps):
            if name in self._out_features:
                stride = self._out_feature_strides[name]
                size = (math.ceil(H / stride), math.ceil(W / stride))
                out[name] = m if tuple(m.shape[-2:]) == size else self._resample(m, size)
        return out


def run_token_taps(backbone, images: torch.Tensor, taps, reducer=None) -> tuple[list, tuple[int, int], list]:
    """The one block loop of token-tap backbones: ``embed_tokens``, then the blocks up to the
    last tap; returns (tokens after each tap block (B, P + h*w, C), grid, extras).

    ``reducer``: a :class:`~expedit_d2.reduction.core.TokenReducer` driving the loop (a
    patched backbone's ``token_reduction``), or None for the plain computation. The loop
    per block i: ``x = reducer.block(i, blk, x, state, inputs)`` with the block's inputs
    re-indexed to the reducer's tokens, a tap at i reads ``reducer.tap(x, state)``, then
    ``x = reducer.after_block(i, x, state)``.
    """
    from ..reduction.core import TokenReducer, regrid_inputs

    reducer = TokenReducer() if reducer is None else reducer  # the default does nothing
    x, grid, extras = backbone.embed_tokens(images)
    inputs = block_inputs_of(backbone, grid)
    state = reducer.start(x, grid, backbone.num_prefix_tokens)
    wanted, outs = set(taps), {}
    for i, blk in enumerate(backbone.blocks[: max(taps) + 1]):
        x = reducer.block(i, blk, x, state, regrid_inputs(inputs[i], reducer.positions(state)))
        if i in wanted:
            outs[i] = reducer.tap(x, state)
        x = reducer.after_block(i, x, state)
    return [outs[i] for i in taps], grid, extras


def block_inputs_of(backbone, grid) -> list[dict[str, torch.Tensor]]:
    """The keyword inputs of each block, ``blk(x, **inputs[i])``: ``backbone.block_inputs(grid)``
    where the backbone has it (optional part of the token-tap protocol, e.g. EVA's rotary
    embedding ``{"rope": (h*w, D)}``), else none. Every tensor's dimension -2 runs over the h*w
    grid tokens (prefix tokens excluded), so that token-reduction methods can re-index it to
    the tokens they keep (:func:`expedit_d2.reduction.core.regrid_inputs`)."""
    make = getattr(backbone, "block_inputs", None)
    inputs = make(grid) if make is not None else None
    depth = len(backbone.blocks)
    if inputs is None:
        return [{}] * depth
    if len(inputs) != depth:
        raise ValueError(f"{type(backbone).__name__}.block_inputs gave {len(inputs)} entries for {depth} blocks")
    return list(inputs)
