"""The Detectron2 side shared by our backbones: named outputs res2..res5 at strides 4..32."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from detectron2.modeling import Backbone, ShapeSpec

__all__ = ["MultiScaleBackbone", "TokenTapBackbone", "run_token_taps", "block_inputs_of"]


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


class TokenTapBackbone(MultiScaleBackbone):
    """Mixin of token-tap backbones (plain ViT, ViT-Hybrid, timm ViTs): their taps, token
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


def run_token_taps(backbone, images: torch.Tensor, taps) -> tuple[list, tuple[int, int], list]:
    """The plain ``forward_taps`` of a token-tap backbone: ``embed_tokens`` then the blocks up
    to the last tap; returns (tokens after each tap block (B, P + h*w, C), grid, extras)."""
    x, grid, extras = backbone.embed_tokens(images)
    inputs = block_inputs_of(backbone, grid)
    wanted, outs = set(taps), {}
    for i, blk in enumerate(backbone.blocks[: max(taps) + 1]):
        x = blk(x, **inputs[i])
        if i in wanted:
            outs[i] = x
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
