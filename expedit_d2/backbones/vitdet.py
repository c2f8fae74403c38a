"""ViTDet (Li et al., ECCV 2022, "Exploring Plain Vision Transformer Backbones for Object
Detection") for Detectron2 0.6, which lacks ``detectron2.modeling.ViT``: the plain ViT with
window and global attention on a (B, H, W, C) grid and its simple feature pyramid (p2..p6),
registered as ``ExpeditD2ViTDet`` (a name no other project registers).

Module and parameter names equal the ViTDet model-zoo checkpoints (``backbone.net.*`` for the
ViT, ``backbone.simfp_{2..5}.*`` for the pyramid, no parameter in the p6 max-pool), so they
load strictly; the arithmetic is the one of Detectron2's own ``ViT`` / ``SimpleFeaturePyramid``::

    PatchEmbed (16x16 conv)        (B, 3, H, W) -> (B, H/16, W/16, C)
    + get_abs_pos(pos_embed)       pretraining grid (cls row dropped) resized bicubically
    Block x depth                  x + drop_path(attn(norm1(x))) in windows of window_size
                                   (zero-padded) or globally (window_size 0), decomposed
                                   relative positions; x + drop_path(mlp(norm2(x)));
                                   optionally a convolutional residual block
    {"last_feat": (B, C, H/16, W/16)}
    SimpleFeaturePyramid           scale 4: deconv, LN, GELU, deconv; 2: deconv; 1: -;
                                   0.5: max-pool; each then a 1x1 and a 3x3 conv with
                                   channel LayerNorm -> p2..p5, and p6 = max-pool of p5

Keys ``MODEL.VITDET.*`` (:func:`expedit_d2.add_expedit_config`, ViT-B defaults of the model
zoo's ``mask_rcnn_vitdet_b_100ep``). The box and mask heads of the model-zoo Mask R-CNN use
``NORM: "LN"``, which Detectron2 0.6's ``get_norm`` lacks: only the backbone is ViTDet's
here (see ``configs/examples/mask_rcnn_vitdet_b_expedit.yaml``).

Padding: ViTDet pads every image to a square of ``SQUARE_PAD`` (1024) pixels, the test
images being resized to a longer side of 1024. Detectron2 0.6's ``GeneralizedRCNN`` pads to
multiples of ``backbone.size_divisibility`` only, so that is ``SQUARE_PAD`` where it is set:
an image no larger than it is padded to exactly that square, as ViTDet does (a larger one to
the next multiple); ``SQUARE_PAD: 0`` pads to multiples of the coarsest pyramid stride (32).
``padding_constraints`` tells a newer Detectron2 the same.

Token reduction: the ViT (``.net``) follows the ``"windowed"`` family (layout ``"vitdet"``,
:mod:`expedit_d2.reduction.windowed`); the backbones know nothing of any method. By config,
``MODEL.BACKBONE.NAME: TokenReductionBackbone`` with ``MODEL.TOKEN_REDUCTION.BASE: ExpeditD2ViTDet`` builds
this pyramid and patches its ``net`` with ``MODEL.TOKEN_REDUCTION.METHOD``; in Python,
``apply_patch(model.backbone.net, settings)``.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone.fpn import LastLevelMaxPool

from ..layers import DropPath, Mlp, init_linear_and_norm

__all__ = ["ViT", "SimpleFeaturePyramid", "Block", "Attention", "PatchEmbed", "ResBottleneckBlock",
           "ChannelLayerNorm", "get_abs_pos", "get_rel_pos", "add_decomposed_rel_pos", "window_partition",
           "window_unpartition", "build_vitdet_backbone", "VITDET_NAME"]

#: our registry name of the ViTDet backbone (the whole pyramid, its ``net`` the ViT)
VITDET_NAME = "ExpeditD2ViTDet"
_KEY = "MODEL.VITDET."


# --------------------------------------------------------------------------------------
# positions and windows
# --------------------------------------------------------------------------------------
def get_abs_pos(abs_pos: torch.Tensor, has_cls_token: bool, hw) -> torch.Tensor:
    """The absolute position embedding (1, [1 +] g*g, C) of a g x g pretraining grid as a
    (1, h, w, C) map: the cls row dropped, resized bicubically when (h, w) != (g, g)."""
    h, w = int(hw[0]), int(hw[1])
    grid = abs_pos[:, 1:] if has_cls_token else abs_pos
    g = math.isqrt(grid.shape[1])
    if g * g != grid.shape[1]:
        raise ValueError(f"pos_embed holds {grid.shape[1]} grid positions, not a square grid")
    grid = grid.reshape(1, g, g, -1)
    if (g, g) == (h, w):
        return grid
    resized = F.interpolate(grid.permute(0, 3, 1, 2), size=(h, w), mode="bicubic", align_corners=False)
    return resized.permute(0, 2, 3, 1)


def get_rel_pos(q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """(q_size, k_size, C): the relative position embedding of every (query, key) pair along
    one axis, the (L, C) table resized linearly to 2 * max(q_size, k_size) - 1 rows where it
    has another length; the shorter axis' coordinates are scaled to the longer one."""
    length = 2 * max(q_size, k_size) - 1
    if rel_pos.shape[0] != length:
        rel_pos = F.interpolate(rel_pos.t().unsqueeze(0), size=length, mode="linear")[0].t()
    q_scale, k_scale = max(k_size / q_size, 1.0), max(q_size / k_size, 1.0)
    q = torch.arange(q_size)[:, None] * q_scale
    k = torch.arange(k_size)[None, :] * k_scale
    return rel_pos[((q - k) + (k_size - 1) * k_scale).long()]


def add_decomposed_rel_pos(attn, q, rel_pos_h, rel_pos_w, q_size, k_size) -> torch.Tensor:
    """attn (B, qh*qw, kh*kw) plus the decomposed relative positions (MViTv2) of queries
    q (B, qh*qw, C): q . R_h[row(q), row(k)] + q . R_w[col(q), col(k)]."""
    (qh, qw), (kh, kw) = q_size, k_size
    Rh, Rw = get_rel_pos(qh, kh, rel_pos_h), get_rel_pos(qw, kw, rel_pos_w)
    B, _, C = q.shape
    r_q = q.reshape(B, qh, qw, C)
    rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, Rh)
    rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, Rw)
    attn = attn.view(B, qh, qw, kh, kw) + rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]
    return attn.view(B, qh * qw, kh * kw)


def window_partition(x: torch.Tensor, ws: int):
    """(B, H, W, C) -> (windows (B*nW, ws, ws, C) in row-major order, (Hp, Wp)): zero-padded
    at the bottom and right to multiples of ws."""
    B, H, W, C = x.shape
    Hp, Wp = H + (-H) % ws, W + (-W) % ws
    if (Hp, Wp) != (H, W):
        x = F.pad(x, (0, 0, 0, Wp - W, 0, Hp - H))
    x = x.view(B, Hp // ws, ws, Wp // ws, ws, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, ws, ws, C), (Hp, Wp)


def window_unpartition(windows: torch.Tensor, ws: int, padded, hw) -> torch.Tensor:
    """The inverse of :func:`window_partition`: (B*nW, ws, ws, C) -> (B, H, W, C), cropped."""
    (Hp, Wp), (H, W) = padded, hw
    B = windows.shape[0] // (Hp // ws * (Wp // ws))
    x = windows.view(B, Hp // ws, Wp // ws, ws, ws, -1).permute(0, 1, 3, 2, 4, 5).reshape(B, Hp, Wp, -1)
    return x if (Hp, Wp) == (H, W) else x[:, :H, :W].contiguous()


# --------------------------------------------------------------------------------------
# the ViT
# --------------------------------------------------------------------------------------
class PatchEmbed(nn.Module):
    """p x p conv, (B, 3, H, W) -> (B, H/p, W/p, C)."""

    def __init__(self, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).permute(0, 2, 3, 1)


class Attention(nn.Module):
    """Multi-head attention on a (B, H, W, C) grid with decomposed relative positions sized
    for ``input_size`` (resized linearly to the grid it is given)."""

    def __init__(self, dim, num_heads=8, qkv_bias=True, use_rel_pos=False, rel_pos_zero_init=True, input_size=None):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.use_rel_pos = use_rel_pos
        if use_rel_pos:
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[0] - 1, head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[1] - 1, head_dim))
            if not rel_pos_zero_init:
                nn.init.trunc_normal_(self.rel_pos_h, std=0.02)
                nn.init.trunc_normal_(self.rel_pos_w, std=0.02)

    def forward(self, x):
        B, H, W, _ = x.shape
        N, heads = H * W, self.num_heads
        q, k, v = self.qkv(x).reshape(B, N, 3, heads, -1).permute(2, 0, 3, 1, 4).reshape(3, B * heads, N, -1).unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        if self.use_rel_pos:
            attn = add_decomposed_rel_pos(attn, q, self.rel_pos_h, self.rel_pos_w, (H, W), (H, W))
        x = attn.softmax(dim=-1) @ v
        return self.proj(x.view(B, heads, H, W, -1).permute(0, 2, 3, 1, 4).reshape(B, H, W, -1))


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channels of a (N, C, H, W) map (ViTDet's "LN" norm, eps 1e-6)."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x):
        return F.layer_norm(x.permute(0, 2, 3, 1), self.weight.shape, self.weight, self.bias,
                            self.eps).permute(0, 3, 1, 2)


def make_norm(norm: str, channels: int):
    """``"LN"``: :class:`ChannelLayerNorm` (absent from Detectron2 0.6's ``get_norm``); any
    other name as Detectron2's ``get_norm`` ("" -> None)."""
    return ChannelLayerNorm(channels) if norm == "LN" else get_norm(norm, channels)


class ResBottleneckBlock(nn.Module):
    """1x1, 3x3, 1x1 convs (no bias) with channel LayerNorm and GELU, added to the input
    (ViTDet's optional convolutional propagation after a block); last norm zero-initialised."""

    def __init__(self, channels: int, bottleneck: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, bottleneck, 1, bias=False)
        self.norm1 = ChannelLayerNorm(bottleneck)
        self.act1 = nn.GELU()
        self.conv2 = nn.Conv2d(bottleneck, bottleneck, 3, padding=1, bias=False)
        self.norm2 = ChannelLayerNorm(bottleneck)
        self.act2 = nn.GELU()
        self.conv3 = nn.Conv2d(bottleneck, channels, 1, bias=False)
        self.norm3 = ChannelLayerNorm(channels)
        for conv in (self.conv1, self.conv2, self.conv3):
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.norm3.weight)
        nn.init.zeros_(self.norm3.bias)

    def forward(self, x):
        out = x
        for layer in self.children():
            out = layer(out)
        return x + out


class Block(nn.Module):
    """Pre-norm transformer block on a (B, H, W, C) grid, attending in zero-padded windows of
    ``window_size`` or globally (0)."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True, drop_path=0.0, norm_eps=1e-6,
                 use_rel_pos=False, rel_pos_zero_init=True, window_size=0, use_residual_block=False,
                 input_size=None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias, use_rel_pos, rel_pos_zero_init,
                              input_size if window_size == 0 else (window_size, window_size))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.window_size = window_size
        self.use_residual_block = use_residual_block
        if use_residual_block:
            self.residual = ResBottleneckBlock(dim, dim // 2)

    def forward(self, x):
        shortcut, ws = x, self.window_size
        x = self.norm1(x)
        if ws > 0:
            H, W = x.shape[1:3]
            x, padded = window_partition(x, ws)
        x = self.attn(x)
        if ws > 0:
            x = window_unpartition(x, ws, padded, (H, W))
        x = shortcut + self.drop_path(x)
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        if self.use_residual_block:
            x = self.residual(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return x


class ViT(Backbone):
    """ViTDet's plain ViT: ``{out_feature: (B, C, H/p, W/p)}`` after the last block.

    ``img_size`` sizes the global blocks' relative positions ((img_size / p) * 2 - 1 rows),
    ``pretrain_img_size`` the absolute position embedding (plus a cls row where
    ``pretrain_use_cls_token``); both are resized to the input's grid."""

    def __init__(self, img_size=1024, patch_size=16, in_chans=3, embed_dim=768, depth=12, num_heads=12,
                 mlp_ratio=4.0, qkv_bias=True, drop_path_rate=0.0, norm_eps=1e-6, use_abs_pos=True,
                 use_rel_pos=False, rel_pos_zero_init=True, window_size=0, window_block_indexes=(),
                 residual_block_indexes=(), pretrain_img_size=224, pretrain_use_cls_token=True,
                 out_feature="last_feat"):
        super().__init__()
        self.pretrain_use_cls_token = pretrain_use_cls_token
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        if use_abs_pos:
            positions = (pretrain_img_size // patch_size) ** 2 + (1 if pretrain_use_cls_token else 0)
            self.pos_embed = nn.Parameter(torch.zeros(1, positions, embed_dim))
        else:
            self.pos_embed = None
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # linearly up to the rate
        grid = (img_size // patch_size, img_size // patch_size)
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, dpr[i], norm_eps, use_rel_pos, rel_pos_zero_init,
                  window_size if i in window_block_indexes else 0, i in residual_block_indexes, grid)
            for i in range(depth))
        self._out_feature_channels = {out_feature: embed_dim}
        self._out_feature_strides = {out_feature: patch_size}
        self._out_features = [out_feature]
        if self.pos_embed is not None:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():  # in this order (not apply's), as ViTDet initialises
            init_linear_and_norm(m)

    def forward(self, x):
        x = self.patch_embed(x)
        if self.pos_embed is not None:
            x = x + get_abs_pos(self.pos_embed, self.pretrain_use_cls_token, x.shape[1:3])
        for blk in self.blocks:
            x = blk(x)
        return {self._out_features[0]: x.permute(0, 3, 1, 2)}


# --------------------------------------------------------------------------------------
# the simple feature pyramid
# --------------------------------------------------------------------------------------
def _pyramid_stage(scale: float, dim: int, out_channels: int, norm: str) -> tuple[nn.Sequential, int]:
    """The layers of one scale (module indices as in the model-zoo checkpoints)."""
    if scale == 4.0:
        layers, out_dim = [nn.ConvTranspose2d(dim, dim // 2, 2, stride=2), make_norm(norm, dim // 2), nn.GELU(),
                           nn.ConvTranspose2d(dim // 2, dim // 4, 2, stride=2)], dim // 4
    elif scale == 2.0:
        layers, out_dim = [nn.ConvTranspose2d(dim, dim // 2, 2, stride=2)], dim // 2
    elif scale == 1.0:
        layers, out_dim = [], dim
    elif scale == 0.5:
        layers, out_dim = [nn.MaxPool2d(kernel_size=2, stride=2)], dim
    else:
        raise ValueError(f"{_KEY}SCALE_FACTORS: scale {scale} is not one of 4.0, 2.0, 1.0, 0.5")
    bias = norm == ""
    layers += [Conv2d(out_dim, out_channels, 1, bias=bias, norm=make_norm(norm, out_channels)),
               Conv2d(out_channels, out_channels, 3, padding=1, bias=bias, norm=make_norm(norm, out_channels))]
    return nn.Sequential(*layers), out_dim


class SimpleFeaturePyramid(Backbone):
    """ViTDet's pyramid on one map of ``net``: ``simfp_<k>`` per scale factor (stride
    2**k), outputs ``p<k>`` plus those of ``top_block`` (LastLevelMaxPool: p6 from p5)."""

    def __init__(self, net: Backbone, in_feature: str, out_channels: int, scale_factors=(4.0, 2.0, 1.0, 0.5),
                 top_block=None, norm: str = "LN", square_pad: int = 0):
        super().__init__()
        shape = net.output_shape()[in_feature]
        strides = [int(shape.stride / s) for s in scale_factors]
        if any(b != 2 * a for a, b in zip(strides, strides[1:])) or any(s & (s - 1) for s in strides):
            raise ValueError(f"{_KEY}SCALE_FACTORS={list(scale_factors)} give strides {strides}: the pyramid needs "
                             "powers of two, each twice the one before (e.g. 4.0, 2.0, 1.0, 0.5)")
        self.scale_factors = tuple(scale_factors)
        self._stage_names = []
        for scale, stride in zip(scale_factors, strides):
            name = f"simfp_{int(math.log2(stride))}"
            self.add_module(name, _pyramid_stage(scale, shape.channels, out_channels, norm)[0])
            self._stage_names.append(name)
        self.net = net
        self.in_feature = in_feature
        self.top_block = top_block
        self._out_feature_strides = {f"p{int(math.log2(s))}": s for s in strides}
        if top_block is not None:
            last = int(math.log2(strides[-1]))
            for level in range(last + 1, last + 1 + top_block.num_levels):
                self._out_feature_strides[f"p{level}"] = 2**level
        self._out_features = list(self._out_feature_strides)
        self._out_feature_channels = {k: out_channels for k in self._out_features}
        self._size_divisibility = strides[-1]
        self._square_pad = square_pad

    @property
    def size_divisibility(self) -> int:
        """``square_pad`` where set (Detectron2 0.6 pads to multiples of this only: images no
        larger than it become that square, as ViTDet pads them), else the coarsest stride."""
        return self._square_pad if self._square_pad > 0 else self._size_divisibility

    @property
    def padding_constraints(self) -> dict:
        """A newer Detectron2's padding rule (square padding, divisibility)."""
        return {"size_divisibility": self._size_divisibility, "square_size": self._square_pad}

    def forward(self, x):
        features = self.net(x)
        top = features[self.in_feature]
        results = [getattr(self, name)(top) for name in self._stage_names]
        if self.top_block is not None:
            if self.top_block.in_feature in features:
                source = features[self.top_block.in_feature]
            else:
                source = results[self._out_features.index(self.top_block.in_feature)]
            results.extend(self.top_block(source))
        return dict(zip(self._out_features, results))


# --------------------------------------------------------------------------------------
# the registry entry
# --------------------------------------------------------------------------------------
def _indexes(value, key: str, depth: int) -> tuple[int, ...]:
    ok = isinstance(value, Sequence) and not isinstance(value, str) and all(
        isinstance(i, int) and not isinstance(i, bool) and 0 <= i < depth for i in value)
    if not ok:
        raise ValueError(f"{key} must list block indexes in 0..{depth - 1}, got {value!r}")
    return tuple(value)


def build_vitdet_backbone(cfg, input_shape: ShapeSpec) -> SimpleFeaturePyramid:
    """``MODEL.VITDET.*`` -> the simple feature pyramid (p2..p6) over ViTDet's ViT (``.net``)."""
    v = cfg.MODEL.VITDET
    net = ViT(img_size=v.IMG_SIZE, patch_size=v.PATCH_SIZE, in_chans=input_shape.channels, embed_dim=v.EMBED_DIM,
              depth=v.DEPTH, num_heads=v.NUM_HEADS, mlp_ratio=v.MLP_RATIO, qkv_bias=v.QKV_BIAS,
              drop_path_rate=v.DROP_PATH_RATE, norm_eps=v.NORM_EPS, use_abs_pos=v.USE_ABS_POS,
              use_rel_pos=v.USE_REL_POS, window_size=v.WINDOW_SIZE,
              window_block_indexes=_indexes(v.WINDOW_BLOCK_INDEXES, _KEY + "WINDOW_BLOCK_INDEXES", v.DEPTH),
              residual_block_indexes=_indexes(v.RESIDUAL_BLOCK_INDEXES, _KEY + "RESIDUAL_BLOCK_INDEXES", v.DEPTH),
              pretrain_img_size=v.PRETRAIN_IMG_SIZE, pretrain_use_cls_token=v.PRETRAIN_USE_CLS_TOKEN)
    if isinstance(v.SQUARE_PAD, bool) or not isinstance(v.SQUARE_PAD, int) or v.SQUARE_PAD < 0:
        raise ValueError(f"{_KEY}SQUARE_PAD must be an int >= 0 (0: no square padding), got {v.SQUARE_PAD!r}")
    return SimpleFeaturePyramid(net, net._out_features[0], v.OUT_CHANNELS, tuple(v.SCALE_FACTORS),
                                top_block=LastLevelMaxPool(), norm=v.NORM, square_pad=v.SQUARE_PAD)


BACKBONE_REGISTRY._do_register(VITDET_NAME, build_vitdet_backbone)
