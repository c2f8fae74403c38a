"""Any timm ``VisionTransformer`` (DeiT, DINOv2 with register tokens, EVA-01, ViT-B/L, ...) or
timm ``Eva`` (EVA-02, the rotary-embedding ViTs ``vit_*_rope_*``) as a Detectron2 token-tap
backbone, ``D2TimmViT``: one family in one file.

    MODEL.BACKBONE.NAME: "D2TimmViT"        (or TokenReductionBackbone with MODEL.TOKEN_REDUCTION.BASE: D2TimmViT)
    MODEL.TIMM_VIT.NAME: "vit_small_patch14_reg4_dinov2"   any timm name building a VisionTransformer or Eva
    MODEL.TIMM_VIT.KWARGS: {depth: 12, ...}                 extra timm.create_model arguments
    MODEL.TIMM_VIT.TAPS: [2, 5, 8, 11]                      blocks whose outputs are res2..res5

The model is built with ``pretrained=False`` (nothing is downloaded; load weights with
``MODEL.WEIGHTS``: the timm state dict sits under ``backbone.vit.``), with
``dynamic_img_size`` and ``dynamic_img_pad`` so that any input size works (the position
embedding is resampled to the token grid, the image padded to whole patches).

It follows the token-tap protocol (see :mod:`expedit_d2.reduction.core` and DPT's
``TOKEN_TAP_PROTOCOL``), so every token-reduction method of the ``"vit"`` family and DPT's
head apply to it unchanged. Shapes: image (B, 3, H, W) -> tokens (B, P + h*w, C) with P
prefix tokens (cls + registers), h*w = ceil(H/p) * ceil(W/p); taps -> res2..res5 maps at
strides 4, 8, 16, 32.

EVA's blocks take the rotary embedding of the grid tokens, ``blk(x, rope=...)``: it is the
optional ``block_inputs(grid)`` of the protocol (one (h*w, D) tensor for every block, or one
(heads, h*w, D) per block for the "mixed" rotary embedding), so token-reduction methods
re-index it to the tokens they keep.
"""
from __future__ import annotations

import torch
from torch import nn

from detectron2.modeling import BACKBONE_REGISTRY

from .base import TokenTapBackbone, register_prenorm_block
from .vit import check_taps


# timm's pre-norm blocks, which the "vit" methods that act inside a block run in parts
register_prenorm_block("timm.models.vision_transformer:Block")
register_prenorm_block("timm.models.eva:EvaBlock")

__all__ = ["D2TimmViT"]


@BACKBONE_REGISTRY.register()
class D2TimmViT(TokenTapBackbone):
    """A timm VisionTransformer (``self.vit``) with DPT-style taps."""

    def __init__(self, cfg, input_shape):
        super().__init__()
        import timm
        from timm.models.eva import Eva
        from timm.models.vision_transformer import VisionTransformer as TimmVisionTransformer

        t = cfg.MODEL.TIMM_VIT
        kwargs = dict(t.KWARGS)
        try:
            self.vit = timm.create_model(t.NAME, pretrained=False, in_chans=input_shape.channels,
                                         dynamic_img_size=True, dynamic_img_pad=True, **kwargs)
        except (RuntimeError, TypeError) as e:  # unknown name, or an argument it does not take
            raise ValueError(f"MODEL.TIMM_VIT.NAME={t.NAME!r} with MODEL.TIMM_VIT.KWARGS={kwargs}: {e}") from e
        if not isinstance(self.vit, (TimmVisionTransformer, Eva)):
            raise ValueError(f"MODEL.TIMM_VIT.NAME={t.NAME!r} builds {type(self.vit).__name__}, not a "
                             "timm VisionTransformer or Eva")
        self.embed_dim = self.vit.embed_dim
        self.num_prefix_tokens = int(self.vit.num_prefix_tokens)
        self.taps = check_taps(t.TAPS, len(self.vit.blocks), key="MODEL.TIMM_VIT.TAPS")
        self.num_cnn_taps, self.tap_channels = 0, [self.embed_dim] * 4
        self._setup_outputs(t.OUT_FEATURES, self.tap_channels, "MODEL.TIMM_VIT.OUT_FEATURES")

    @property
    def blocks(self) -> nn.Module:
        """The transformer blocks (timm's ``nn.Sequential``, Eva's ``nn.ModuleList``)."""
        return self.vit.blocks

    def embed_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int], list]:
        """(B, 3, H, W) -> (tokens (B, P + h*w, C) with prefix tokens and position embedding,
        grid (h, w), [])."""
        v = self.vit
        x = v.patch_embed(x)  # (B, h, w, C) with dynamic_img_size
        grid = (int(x.shape[1]), int(x.shape[2]))
        x = v._pos_embed(x)
        if isinstance(x, tuple):  # Eva: (tokens, rotary embedding); the latter comes from block_inputs
            x = x[0]
        else:
            x = v.patch_drop(x)
        return v.norm_pre(x), grid, []

    @property
    def has_class_token(self) -> bool:
        """Whether the first prefix token is a class token (not a register)."""
        return getattr(self.vit, "cls_token", None) is not None

    @property
    def rotary(self) -> bool:
        """Whether the blocks take a rotary embedding (timm's Eva with ``rope``)."""
        return getattr(self.vit, "rope", None) is not None

    def block_inputs(self, grid: tuple[int, int]) -> list[dict] | None:
        """EVA: ``[{"rope": (h*w, D)}] * depth`` (or (heads, h*w, D) per block, "mixed");
        None for a plain VisionTransformer."""
        if not self.rotary:
            return None
        v = self.vit
        rope = v.rope.get_embed(shape=grid)
        if getattr(v, "rope_mixed", False):  # (depth, heads, h*w, D): one per block
            return [{"rope": r} for r in rope.unbind(0)]
        return [{"rope": rope}] * len(v.blocks)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self._check_input(x)
        taps, grid, _ = self.forward_taps(x, self.taps)
        return self._maps_to_outputs([self._tokens_to_map(t, grid) for t in taps], x.shape[-2:])
