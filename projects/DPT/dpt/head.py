"""DPT decoder: reassemble (readout "project"), fusion blocks and the depth head.

Module names follow the official DPT checkpoints, so their ``pretrained.act_postprocess*``
and ``scratch.*`` entries load one-to-one (see :mod:`dpt.checkpoint`)::

    reassemble.act_postprocess{1..4}   <- pretrained.act_postprocess{1..4}
    scratch.layer{1..4}_rn             3x3 convs to the fusion width (no bias)
    scratch.refinenet{1..4}            fusion blocks (two residual conv units, x2 upsampling)
    scratch.output_conv                depth head (conv, x2 upsampling, conv, ReLU, 1x1 conv, ReLU)

Shapes: taps -> reassembled maps at strides 4, 8, 16, 32 -> fused at stride 2 -> the
head's (B, 1, H, W) output at the input resolution.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from expedit_d2.blocked import cpu_inference

__all__ = ["DPTReassemble", "DPTScratch"]


class ProjectReadout(nn.Module):
    """Readout "project": concat the cls token to every patch token, Linear + GELU."""

    def __init__(self, dim: int):
        super().__init__()
        self.project = nn.Sequential(nn.Linear(2 * dim, dim), nn.GELU())

    def forward(self, x):  # (B, 1 + N, C) -> (B, N, C)
        readout = x[:, :1].expand(-1, x.shape[1] - 1, -1)
        return self.project(torch.cat([x[:, 1:], readout], dim=-1))


class TokensToMap(nn.Module):
    """(B, N, C) -> (B, C, h, w) for the grid given at call time (no parameters)."""

    def forward(self, x, grid):
        return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], *grid)


class _Reassemble(nn.Sequential):
    """Index layout of the official ``act_postprocess{i}``: 0 readout, 1-2 token->map,
    3 1x1 conv, 4 resampling (transposed conv x4 / x2, none, or 3x3 stride-2 conv)."""

    def __init__(self, dim: int, out: int, resample: str):
        layers = [ProjectReadout(dim), nn.Identity(), TokensToMap(), nn.Conv2d(dim, out, 1)]
        if resample == "up4":
            layers.append(nn.ConvTranspose2d(out, out, 4, stride=4))
        elif resample == "up2":
            layers.append(nn.ConvTranspose2d(out, out, 2, stride=2))
        elif resample == "down2":
            layers.append(nn.Conv2d(out, out, 3, stride=2, padding=1))
        super().__init__(*layers)

    def forward(self, x, grid):
        x = self[0](x)
        x = self[2](x, grid)
        for layer in list(self)[3:]:
            x = layer(x)
        return x


class DPTReassemble(nn.Module):
    """ViT taps -> maps at strides 4, 8, 16, 32. For the hybrid backbone the first two taps
    are ResNet stage maps already (``num_cnn_taps=2``): those pass through unchanged."""

    RESAMPLE = ("up4", "up2", "none", "down2")

    def __init__(self, dim: int, features=(256, 512, 1024, 1024), num_cnn_taps: int = 0):
        super().__init__()
        self.num_cnn_taps = num_cnn_taps
        for i in range(4):
            if i >= num_cnn_taps:
                self.add_module(f"act_postprocess{i + 1}", _Reassemble(dim, features[i], self.RESAMPLE[i]))

    def forward(self, taps, grid):
        out = []
        for i, t in enumerate(taps):
            out.append(t if i < self.num_cnn_taps else getattr(self, f"act_postprocess{i + 1}")(t, grid))
        return out


class ResidualConvUnit(nn.Module):
    def __init__(self, features: int):
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, 3, padding=1)
        self.conv2 = nn.Conv2d(features, features, 3, padding=1)

    def forward(self, x):
        # x + conv2(relu(conv1(relu(x)))), the ReLU and the sum in the convolutions' own
        # fresh outputs (neither convolution's backward reads its output; x + y == y + x)
        h = F.relu_(self.conv1(F.relu(x)))
        return self.conv2(h).add_(x)


class FusionBlock(nn.Module):
    """x (+ unit1(skip)) -> unit2 -> x2 bilinear (align_corners=True) -> 1x1 conv."""

    def __init__(self, features: int):
        super().__init__()
        self.resConfUnit1 = ResidualConvUnit(features)
        self.resConfUnit2 = ResidualConvUnit(features)
        self.out_conv = nn.Conv2d(features, features, 1)

    def forward(self, x, skip=None):
        if skip is not None:
            if skip.shape[-2:] != x.shape[-2:]:  # odd sizes: match the finer map
                x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=True)
            x = self.resConfUnit1(skip).add_(x)  # x + unit1(skip), into the unit's fresh output
        x = self.resConfUnit2(x)
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
        return self.out_conv(x)


class DPTScratch(nn.Module):
    """Fusion and head: reassembled maps -> (B, 1, 2 * H_4, 2 * W_4) (the input size)."""

    def __init__(self, in_channels, features: int = 256, non_negative: bool = True):
        super().__init__()
        for i, c in enumerate(in_channels):
            self.add_module(f"layer{i + 1}_rn", nn.Conv2d(c, features, 3, padding=1, bias=False))
        for i in range(4):
            self.add_module(f"refinenet{i + 1}", FusionBlock(features))
        self.output_conv = nn.Sequential(
            nn.Conv2d(features, features // 2, 3, padding=1),
            _Upsample2x(),
            nn.Conv2d(features // 2, 32, 3, padding=1),
            nn.ReLU(inplace=True),  # on the convolutions' fresh outputs
            nn.Conv2d(32, 1, 1),
            nn.ReLU(inplace=True) if non_negative else nn.Identity(),
        )
        if non_negative:
            # from-scratch training only (checkpoints overwrite it): with the default bias
            # about half of all initialisations output 0 everywhere, where the ReLU passes
            # no gradient and training never starts
            nn.init.constant_(self.output_conv[4].bias, 1.0)

    def forward(self, maps):
        # In CPU inference the maps go channels-last: oneDNN takes NCHW maps through a blocked
        # layout, reordering every input and output (the 256- and 128-channel maps at strides
        # 2 and 1 are tens to hundreds of MB, each reorder buffer fresh memory), and takes
        # channels-last maps as they are; the results differ by float rounding. On a GPU and
        # in training the maps stay NCHW (not measured there).
        if cpu_inference(maps[0], self):
            maps = [m.contiguous(memory_format=torch.channels_last) for m in maps]
        rn = [getattr(self, f"layer{i + 1}_rn")(m) for i, m in enumerate(maps)]
        path = self.refinenet4(rn[3])
        path = self.refinenet3(path, rn[2])
        path = self.refinenet2(path, rn[1])
        path = self.refinenet1(path, rn[0])
        return self.output_conv(path)


class _Upsample2x(nn.Module):
    def forward(self, x):
        return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
