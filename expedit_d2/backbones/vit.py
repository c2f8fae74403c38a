"""Plain ViT (ViT-B/16, ViT-L/16) and ViT-Hybrid (ResNet-50 stem + ViT-B/16) backbones.

Parameter names equal the ``pretrained.model.*`` rows of the official DPT checkpoints
(timm's layout, including the unused classifier ``norm``/``head``), so those weights map
one-to-one (strip the ``pretrained.model.`` prefix).

Structure::

    patch embedding      ViT: 16x16 conv;  Hybrid: ResNetV2 (stem + 3 stages) + 1x1 conv
    + cls token, + position embedding (resized bilinearly to the token grid)
    Block x depth        x + attn(norm1(x)); x + mlp(norm2(x))      (B, 1 + N, C)

``forward_taps(x)`` returns the DPT taps: the token sequences (cls first) after the tap
blocks, or for the hybrid's ResNet taps the stage feature maps. The Detectron2
``forward(x)`` returns the taps as maps ``res2..res5`` at strides 4, 8, 16, 32
(parameter-free: ViT taps at stride 16 are resized bilinearly / average-pooled), so
any multi-scale meta-architecture can use it.

Token-tap protocol (what DPT and the token-reduction methods of
:mod:`expedit_d2.reduction` use): ``num_prefix_tokens`` (1, the cls token), ``blocks``,
``embed_tokens(images) -> (tokens, grid, stage maps)``, ``forward_taps(images, taps)``,
``taps``, ``num_cnn_taps`` (hybrid: 2 taps index ResNet stages) and ``tap_channels``.
The backbone itself knows nothing of any method; a method patches a built backbone.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.modeling import BACKBONE_REGISTRY

from ..blocked import cpu_inference
from .base import TokenTapBackbone, TokenTapProtocol, register_prenorm_block

from ..layers import DropPath, Mlp

__all__ = ["VisionTransformer", "ResNetV2", "D2ViT", "D2ViTHybrid", "check_taps"]


# --------------------------------------------------------------------------------------
# ResNetV2 (BiT-style, non-pre-activation) stem of ViT-Hybrid
# --------------------------------------------------------------------------------------
def _same_pad(x: torch.Tensor, k: int, s: int, value: float = 0.0) -> torch.Tensor:
    """TF 'SAME' padding for a k x k window with stride s."""
    ih, iw = x.shape[-2:]
    ph = max((math.ceil(ih / s) - 1) * s + k - ih, 0)
    pw = max((math.ceil(iw / s) - 1) * s + k - iw, 0)
    if ph or pw:
        x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=value)
    return x


class StdConv2dSame(nn.Conv2d):
    """Weight-standardised conv (per output channel, biased variance) with SAME padding.

    Without autograd (inference) the standardised weight is computed once per weight
    version and reused (a cache, not a parameter: any in-place update of the weight, a
    checkpoint load or a move to another device invalidates it); with autograd it is
    recomputed every call so gradients flow, and under ``torch.compile`` it is part of the
    graph (a cache written during forward would break the graph at every conv)."""

    def __init__(self, cin, cout, k, stride=1, eps=1e-8):
        super().__init__(cin, cout, k, stride=stride, padding=0, bias=False)
        self.eps = eps
        self._standardized = None  # (key of the weight it was computed from, tensor)

    def _standardize(self, w):
        flat = w.reshape(w.shape[0], -1)
        var, mean = torch.var_mean(flat, dim=1, unbiased=False, keepdim=True)
        return ((flat - mean) / torch.sqrt(var + self.eps)).view_as(w)

    def standardized_weight(self) -> torch.Tensor:
        w = self.weight
        if ((torch.is_grad_enabled() and w.requires_grad) or w.device.type == "meta"
                or torch.compiler.is_compiling()):
            return self._standardize(w)
        key = (w._version, w.data_ptr(), w.dtype, w.device)
        if self._standardized is None or self._standardized[0] != key:
            self._standardized = (key, self._standardize(w))
        return self._standardized[1]

    def forward(self, x):
        return F.conv2d(_same_pad(x, self.kernel_size[0], self.stride[0]), self.standardized_weight(),
                        None, self.stride)


class GroupNormAct(nn.GroupNorm):
    def __init__(self, channels, act=True, groups=32, eps=1e-5):
        super().__init__(groups, channels, eps=eps)
        self.act = act

    def forward(self, x):
        x = super().forward(x)
        # in place: the norm's output is fresh and its backward does not read it
        return x.relu_() if self.act else x


class Downsample(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv = StdConv2dSame(cin, cout, 1, stride)
        self.norm = GroupNormAct(cout, act=False)

    def forward(self, x):
        return self.norm(self.conv(x))


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride) -> 1x1, GroupNorm after each, ReLU after the residual sum."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        mid = cout // 4
        self.downsample = Downsample(cin, cout, stride) if stride != 1 or cin != cout else None
        self.conv1, self.norm1 = StdConv2dSame(cin, mid, 1), GroupNormAct(mid)
        self.conv2, self.norm2 = StdConv2dSame(mid, mid, 3, stride), GroupNormAct(mid)
        self.conv3, self.norm3 = StdConv2dSame(mid, cout, 1), GroupNormAct(cout, act=False)

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.norm1(self.conv1(x))
        x = self.norm2(self.conv2(x))
        x = self.norm3(self.conv3(x))
        return x.add_(shortcut).relu_()  # in place on the norm's fresh output


class ResNetStage(nn.Module):
    def __init__(self, cin, cout, depth, stride):
        super().__init__()
        self.blocks = nn.Sequential(*[Bottleneck(cin if i == 0 else cout, cout, stride if i == 0 else 1)
                                      for i in range(depth)])

    def forward(self, x):
        return self.blocks(x)


class Stem(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv = StdConv2dSame(cin, cout, 7, 2)
        self.norm = GroupNormAct(cout)

    def forward(self, x):  # conv, norm, 3x3/2 max pool with SAME padding
        x = _same_pad(self.norm(self.conv(x)), 3, 2, value=float("-inf"))
        return max_pool_3x3_s2(x) if cpu_inference(x, self) else F.max_pool2d(x, 3, 2)


def max_pool_3x3_s2(x: torch.Tensor) -> torch.Tensor:
    """``F.max_pool2d(x, 3, 2)`` (no padding), bitwise: the maxima of three strided row views,
    then of three strided column views. (..., H, W) -> (..., (H - 1) // 2, (W - 1) // 2).

    On a CPU, PyTorch's NCHW max pooling (which also writes the argmax indices) took 22 ms
    where this takes 6, at the hybrid stem's 64 x 241 x 321 padded map. For inference only:
    at ties ``torch.maximum`` splits the gradient, where max pooling gives it to one input.
    """
    H, W = x.shape[-2:]
    if H < 3 or W < 3:
        raise ValueError(f"3x3 max pooling needs a map of at least 3 x 3, got {tuple(x.shape)}")
    rows = torch.maximum(x[..., 0:H - 2:2, :], x[..., 1:H - 1:2, :])
    torch.maximum(rows, x[..., 2:H:2, :], out=rows)
    out = torch.maximum(rows[..., 0:W - 2:2], rows[..., 1:W - 1:2])
    return torch.maximum(out, rows[..., 2:W:2], out=out)


class ResNetV2(nn.Module):
    """(B, 3, H, W) -> stage maps at strides 4, 8, 16 (256, 512, 1024 channels for R50)."""

    def __init__(self, layers=(3, 4, 9), in_chans=3, stem_chs=64):
        super().__init__()
        self.stem = Stem(in_chans, stem_chs)
        chs = [256 * 2**i for i in range(len(layers))]
        self.stages = nn.ModuleList(
            ResNetStage(stem_chs if i == 0 else chs[i - 1], chs[i], d, 1 if i == 0 else 2)
            for i, d in enumerate(layers))
        self.out_channels = chs

    def forward(self, x) -> list[torch.Tensor]:
        x = self.stem(x)
        outs = []
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        return outs


# --------------------------------------------------------------------------------------
# ViT
# --------------------------------------------------------------------------------------
class Attention(nn.Module):
    def __init__(self, dim, num_heads, qkv_bias=True, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, C)))


@register_prenorm_block
class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True, drop=0.0, attn_drop=0.0,
                 drop_path=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias, attn_drop, drop)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def forward(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """ViT: p x p conv; Hybrid: ResNetV2 then a 1x1 conv on its last stage."""

    def __init__(self, patch_size, in_chans, embed_dim, hybrid_layers=None):
        super().__init__()
        self.backbone = None
        if hybrid_layers:
            self.backbone = ResNetV2(hybrid_layers, in_chans)
            self.proj = nn.Conv2d(self.backbone.out_channels[-1], embed_dim, 1)
            self.patch_size = 4 * 2 ** (len(hybrid_layers) - 1)
        else:
            self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)
            self.patch_size = patch_size

    def forward(self, x):
        """-> (tokens (B, N, C), grid (h, w), ResNet stage maps or [])."""
        stages = []
        if self.backbone is not None:  # SAME padding: ceil(H / 16) x ceil(W / 16) tokens
            stages = self.backbone(x)
            x = stages[-1]
        else:  # pad right/bottom to whole patches
            p = self.patch_size
            x = F.pad(x, (0, (-x.shape[-1]) % p, 0, (-x.shape[-2]) % p))
        x = self.proj(x)
        grid = (int(x.shape[-2]), int(x.shape[-1]))  # python ints, also under jit tracing
        return x.flatten(2).transpose(1, 2), grid, stages


class VisionTransformer(nn.Module, TokenTapProtocol):
    """ViT feature extractor with DPT taps; ``taps`` index blocks (hybrid: the first
    ``len(hybrid_layers) - 1`` taps may instead index ResNet stages, see D2ViTHybrid)."""

    def __init__(self, img_size=384, patch_size=16, in_chans=3, embed_dim=768, depth=12,
                 num_heads=12, mlp_ratio=4.0, qkv_bias=True, drop_rate=0.0, attn_drop_rate=0.0,
                 drop_path_rate=0.0, num_classes=1000, hybrid_layers=None):
        super().__init__()
        self.embed_dim, self.depth = embed_dim, depth
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, hybrid_layers)
        self.pretrain_grid = img_size // self.patch_embed.patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.pretrain_grid**2, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_rate,
                                          attn_drop_rate, dpr[i]) for i in range(depth))
        # classifier of the pretrained model: unused for dense prediction, kept so that the
        # official checkpoints load without unexpected keys
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes else nn.Identity()
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def resized_pos_embed(self, grid) -> torch.Tensor:
        """(1, 1 + h*w, C): the grid part resized bilinearly (align_corners=False)."""
        g = self.pretrain_grid
        if tuple(grid) == (g, g):
            return self.pos_embed
        cls_pos, grid_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        grid_pos = grid_pos.reshape(1, g, g, -1).permute(0, 3, 1, 2)
        grid_pos = F.interpolate(grid_pos, size=tuple(grid), mode="bilinear", align_corners=False)
        return torch.cat([cls_pos, grid_pos.flatten(2).transpose(1, 2)], dim=1)

    #: tokens in front of the grid (the cls token)
    num_prefix_tokens = 1

    def embed_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int], list]:
        """(B, 3, H, W) -> (tokens (B, 1 + h*w, C) with cls and position embedding, grid
        (h, w), ResNet stage maps of the hybrid or [])."""
        tokens, grid, stages = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        return self.pos_drop(x + self.resized_pos_embed(grid)), grid, stages


class _D2ViTBase(VisionTransformer, TokenTapBackbone):
    """Shared Detectron2 side: taps -> res2..res5 maps at strides 4, 8, 16, 32."""


def _vit_kwargs(v, in_chans):
    return dict(img_size=v.IMG_SIZE, patch_size=v.PATCH_SIZE, in_chans=in_chans,
                embed_dim=v.EMBED_DIM, depth=v.DEPTH, num_heads=v.NUM_HEADS,
                mlp_ratio=v.MLP_RATIO, qkv_bias=v.QKV_BIAS, drop_rate=v.DROP_RATE,
                attn_drop_rate=v.ATTN_DROP_RATE, drop_path_rate=v.DROP_PATH_RATE,
                num_classes=v.NUM_CLASSES)


def check_taps(taps, depth, first_block_tap=0, key="MODEL.VIT.TAPS"):
    """4 increasing tap indices, those from ``first_block_tap`` on inside 0..depth-1."""
    taps = [int(t) for t in taps]
    if len(taps) != 4 or taps != sorted(taps) or len(set(taps)) != 4:
        raise ValueError(f"{key} must be 4 increasing indices, got {taps}")
    bad = [t for t in taps[first_block_tap:] if not 0 <= t < depth]
    if bad:
        raise ValueError(f"{key} {taps}: block indices {bad} outside 0..{depth - 1}")
    return taps


@BACKBONE_REGISTRY.register()
class D2ViT(_D2ViTBase):
    """Plain ViT from ``MODEL.VIT.*``; taps (e.g. ViT-L/16 [5, 11, 17, 23]) become
    res2 (x4 upsampled), res3 (x2), res4 (as is), res5 (/2)."""

    def __init__(self, cfg, input_shape):
        v = cfg.MODEL.VIT
        super().__init__(**_vit_kwargs(v, input_shape.channels))
        self.taps = check_taps(v.TAPS, self.depth)
        self.num_cnn_taps, self.tap_channels = 0, [self.embed_dim] * 4
        self._setup_outputs(v.OUT_FEATURES, self.tap_channels, "MODEL.VIT.OUT_FEATURES")

    def forward(self, x):
        self._check_input(x)
        taps, grid, _ = self.forward_taps(x, self.taps)
        return self._maps_to_outputs([self._tokens_to_map(t, grid) for t in taps], x.shape[-2:])


@BACKBONE_REGISTRY.register()
class D2ViTHybrid(_D2ViTBase):
    """ViT-Hybrid (DPT-Hybrid: ResNet-50 stages (3, 4, 9) + ViT-B/16). DPT taps
    [0, 1, 8, 11]: the first two index ResNet stages (res2 stride 4, res3 stride 8), the
    last two ViT blocks (res4 stride 16, res5 = /2)."""

    def __init__(self, cfg, input_shape):
        v = cfg.MODEL.VIT
        super().__init__(**_vit_kwargs(v, input_shape.channels), hybrid_layers=tuple(v.HYBRID_LAYERS))
        self.taps = check_taps(v.TAPS, self.depth, first_block_tap=2)
        rn = self.patch_embed.backbone.out_channels
        if not (0 <= self.taps[0] < len(rn) and 0 <= self.taps[1] < len(rn)):
            raise ValueError(f"MODEL.VIT.TAPS {self.taps}: the first two index ResNet stages 0..{len(rn) - 1}")
        self.num_cnn_taps = 2
        self.tap_channels = [rn[self.taps[0]], rn[self.taps[1]], self.embed_dim, self.embed_dim]
        self._setup_outputs(v.OUT_FEATURES, self.tap_channels, "MODEL.VIT.OUT_FEATURES")

    def forward(self, x):
        self._check_input(x)
        taps, grid, stages = self.forward_taps(x, self.taps[2:])
        maps = [stages[self.taps[0]], stages[self.taps[1]]] + [self._tokens_to_map(t, grid) for t in taps]
        return self._maps_to_outputs(maps, x.shape[-2:])
