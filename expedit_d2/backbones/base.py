"""The Detectron2 side shared by our backbones: named outputs res2..res5 at strides 4..32."""
from __future__ import annotations

import torch
from detectron2.modeling import Backbone, ShapeSpec

__all__ = ["MultiScaleBackbone"]


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
