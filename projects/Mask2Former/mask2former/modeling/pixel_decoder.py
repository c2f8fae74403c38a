"""Multi-scale deformable-attention pixel decoder of Mask2Former (pure PyTorch).

Names equal the official ``sem_seg_head.pixel_decoder.*`` parameters. Data flow::

    res3, res4, res5 --input_proj (1x1 conv + GN)--> 3 levels of d = 256 channels
      + sine position embedding + level_embed --6 deformable-attention encoder layers-->
    multi-scale features at strides 32, 16, 8 (for the transformer decoder)
    res2 --adapter_1--> + upsampled stride-8 map --layer_1 (3x3 conv + GN + ReLU)-->
    mask_features (1x1 conv) at stride 4

Multi-scale deformable attention (Zhu et al., Deformable DETR) samples bilinearly as
``grid_sample`` does (zero padding, align_corners=False) and sums the samples with one
``embedding_bag`` call, so it runs on CPU and CUDA alike; no compiled op is needed.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.layers import Conv2d, ShapeSpec, get_norm
from expedit_d2.blocked import map_rows

__all__ = ["ms_deform_attn", "level_shapes", "softmax_last", "MSDeformAttn", "PositionEmbeddingSine", "MSDeformAttnPixelDecoder"]


def ms_deform_attn(value, spatial_shapes, sampling_locations, attention_weights):
    """value (N, S, M, D) over L levels of sizes ``spatial_shapes`` (L, 2) [(H, W)] (the
    official long tensor, or pairs of ints: :func:`level_shapes`);
    sampling_locations (N, Lq, M, L, P, 2) in [0, 1] as (x, y); attention_weights
    (N, Lq, M, L, P) -> (N, Lq, M * D).

    Bilinear sampling as ``grid_sample`` does it (align_corners=False, zeros outside): the
    sample at pixel coordinates (x, y) = (loc_x * W - 0.5, loc_y * H - 0.5) mixes the four
    surrounding pixels with the bilinear weights, corners outside the map weighing 0. Each
    query's output is then one weighted sum over L * P * 4 rows of ``value``, attention
    weight times bilinear weight, and all of them are one ``F.embedding_bag`` call (a
    gather-and-sum kernel; no (N*M, D, Lq, L*P) temporary). Differentiable in ``value``,
    the locations (through the bilinear weights) and the attention weights.
    """
    L, P = sampling_locations.shape[3:5]
    dtype = _sampling_dtype(value, sampling_locations)
    # level-major (coordinate, level, bag, point): each level's arithmetic then runs on
    # (B, P) tensors with its height and width as plain numbers
    loc = sampling_locations.to(dtype).permute(5, 3, 0, 1, 2, 4).reshape(2, L, -1, P)
    return _sample(value, spatial_shapes, lambda lvl, h, w: (loc[0, lvl], loc[1, lvl]), attention_weights, dtype)


def _sampling_dtype(*tensors):
    """Sampling in float32 at least (half-precision coordinates would be off by pixels), as
    autocast runs ``grid_sample``."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def level_shapes(spatial_shapes) -> tuple[tuple[int, int], ...]:
    """The levels' (H, W) as Python ints, from the official (L, 2) tensor or from pairs of
    ints (what the pixel decoder passes: sizes known without reading a tensor, so that
    ``torch.compile`` needs no data-dependent value)."""
    if isinstance(spatial_shapes, torch.Tensor):
        spatial_shapes = spatial_shapes.tolist()
    return tuple((int(h), int(w)) for h, w in spatial_shapes)


def _sample(value, spatial_shapes, locations, attention_weights, dtype):
    """:func:`ms_deform_attn` with the sampling locations given level by level:
    ``locations(level, h, w) -> (x, y)``, each (N * Lq * M, P) in [0, 1] (``dtype``)."""
    N, S, M, D = value.shape
    _, Lq, _, L, P = attention_weights.shape
    B = N * Lq * M  # one bag per (image, query, head)
    shapes = level_shapes(spatial_shapes)
    dev = value.device
    attn = attention_weights.to(dtype).permute(3, 0, 1, 2, 4).reshape(L, B, P)
    # One table of N * M * S rows (image n, head m, position s at pad + (n * M + m) * S + s)
    # between `pad` zero rows. With x0, y0 clamped to [-1, size - 1], a corner's row is right
    # whenever its weight is not 0, and otherwise still inside the padded table.
    pad = max(w for _, w in shapes) + 1
    table = value.to(dtype).permute(0, 2, 1, 3).reshape(N * M * S, D)
    table = torch.cat([table.new_zeros(pad, D), table, table.new_zeros(pad, D)])
    first_row = ((torch.arange(N, device=dev, dtype=torch.int32).view(N, 1, 1) * M
                  + torch.arange(M, device=dev, dtype=torch.int32)) * S + pad).expand(N, Lq, M).reshape(B, 1)
    weights, rows, start = [], [], 0
    for lvl, (h, w) in enumerate(shapes):
        loc_x, loc_y = locations(lvl, h, w)
        x = loc_x * w - 0.5  # (B, P) pixel coordinates
        y = loc_y * h - 0.5
        x0, y0 = x.floor(), y.floor()
        fx, fy = x - x0, y - y0
        # bilinear weights of the two columns and two rows, 0 where they fall outside the
        # map; the attention weight rides on the rows
        wx0, wx1 = (1 - fx) * ((x0 >= 0) & (x0 < w)), fx * ((x0 >= -1) & (x0 < w - 1))
        wy0 = (1 - fy) * ((y0 >= 0) & (y0 < h)) * attn[lvl]
        wy1 = fy * ((y0 >= -1) & (y0 < h - 1)) * attn[lvl]
        weights.append(torch.stack([wy0 * wx0, wy0 * wx1, wy1 * wx0, wy1 * wx1], dim=-1))  # (B, P, 4)
        top_left = first_row + start + y0.clamp(-1, h - 1).int() * w + x0.clamp(-1, w - 1).int()
        rows.append(torch.stack([top_left, top_left + 1, top_left + w, top_left + (w + 1)], dim=-1))
        start += h * w
    bags = torch.stack(rows, dim=1).view(B, L * P * 4)  # per bag: level, point, corner
    out = F.embedding_bag(bags, table, per_sample_weights=torch.stack(weights, dim=1).view(B, L * P * 4),
                          mode="sum")  # (B, D)
    return out.view(N, Lq, M * D).to(value.dtype)


def softmax_last(x: torch.Tensor) -> torch.Tensor:
    """``x.softmax(-1)``, the same up to float rounding; on a CPU over the transposed
    (last dim, rest) view, a short last dimension (the 12 sampling points of a head) being
    several times slower to reduce than a long contiguous one (1024 x 1024 pixel decoder:
    ~5 ms against ~16 per layer). The result is then a transposed view."""
    if x.device.type != "cpu" or x.dim() < 2:
        return x.softmax(-1)
    return x.reshape(-1, x.shape[-1]).t().softmax(0).t().view(x.shape)


class MSDeformAttn(nn.Module):
    def __init__(self, d_model=256, n_levels=3, n_heads=8, n_points=4):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} must be divisible by n_heads {n_heads}")
        self.n_levels, self.n_heads, self.n_points = n_levels, n_heads, n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()

    def _reset_parameters(self):
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(self.n_heads, 1, 1, 2)
        grid = grid.repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        for layer in (self.attention_weights,):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        for layer in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, query, reference_points, value_in, spatial_shapes):
        """query (N, Lq, C); reference_points (N, Lq, L, 2) in [0, 1]; value_in (N, S, C).

        The sampling locations are the official ``reference_points + offsets / (W, H)``,
        worked out level by level as the sampling reaches them (the same numbers, without
        the (N, Lq, M, L, P, 2) broadcast, which is slow on a CPU for its short inner
        dimensions)."""
        N, Lq, C = query.shape
        M, L, P = self.n_heads, self.n_levels, self.n_points
        value = self.value_proj(value_in).view(N, value_in.shape[1], M, C // M)
        offsets = self.sampling_offsets(query).view(N, Lq, M, L, P, 2)
        weights = softmax_last(self.attention_weights(query).view(N, Lq, M, L * P)).view(N, Lq, M, L, P)
        dtype = _sampling_dtype(value, offsets, reference_points)
        offsets, ref = offsets.to(dtype), reference_points.to(dtype)

        def locations(lvl, h, w):  # (N * Lq * M, P) each, as ms_deform_attn's per level
            def coordinate(c, size):
                return (ref[:, :, lvl, c, None, None] + offsets[:, :, :, lvl, :, c] / size).reshape(-1, P)
            return coordinate(0, float(w)), coordinate(1, float(h))

        return self.output_proj(_sample(value, spatial_shapes, locations, weights, dtype))


#: tokens per block of the encoder's feed-forward network without autograd on a CPU (1024
#: tokens x d_ffn 1024 = 4 MB of hidden activations; on the CPU machine at 1024 x 1024 about
#: 20% faster than one call over all tokens, and than 2048- or 4096-token blocks)
FFN_BLOCK_TOKENS = 1024


class EncoderLayer(nn.Module):
    def __init__(self, d_model=256, d_ffn=1024, dropout=0.0, n_levels=3, n_heads=8, n_points=4):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src, pos, reference_points, spatial_shapes):
        src = self.norm1(src + self.dropout1(self.self_attn(src + pos, reference_points, src, spatial_shapes)))
        return self.norm2(src + self.dropout3(self.ffn(src)))

    def ffn(self, src):
        """linear2(relu(linear1(src))) over (N, S, C) tokens; in CPU inference in blocks of
        :data:`FFN_BLOCK_TOKENS` tokens (:func:`expedit_d2.blocked.map_rows`): each block's
        (tokens, d_ffn) hidden activations stay in cache instead of one (N * S, d_ffn)
        buffer (88 MB per layer at 1/8 of a 1024 image) written and read back through
        memory; the same rows are multiplied, so the output is the same."""
        return map_rows(self._ffn_block, src, FFN_BLOCK_TOKENS, self)

    def _ffn_block(self, x):
        # relu in place: linear1's output is needed by nothing else (autograd included: relu's
        # backward reads its output)
        return self.linear2(self.dropout2(F.relu(self.linear1(x), inplace=True)))


class Encoder(nn.Module):
    def __init__(self, num_layers, **layer_kwargs):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(**layer_kwargs) for _ in range(num_layers))

    @staticmethod
    def reference_points(spatial_shapes, device, dtype):
        """(1, S, L, 2): each pixel centre, normalised, repeated for every level."""
        points = []
        for h, w in level_shapes(spatial_shapes):
            ys, xs = torch.meshgrid(torch.arange(h, device=device, dtype=dtype) + 0.5,
                                    torch.arange(w, device=device, dtype=dtype) + 0.5, indexing="ij")
            points.append(torch.stack([xs.reshape(-1) / w, ys.reshape(-1) / h], -1))
        points = torch.cat(points, 0)
        return points[None, :, None].expand(1, -1, len(spatial_shapes), 2)

    def forward(self, src, pos, spatial_shapes):
        ref = self.reference_points(spatial_shapes, src.device, src.dtype).expand(src.shape[0], -1, -1, -1)
        for layer in self.layers:
            src = layer(src, pos, ref, spatial_shapes)
        return src


class EncoderOnlyTransformer(nn.Module):
    def __init__(self, d_model=256, nhead=8, num_encoder_layers=6, dim_feedforward=1024,
                 dropout=0.0, num_feature_levels=3, enc_n_points=4):
        super().__init__()
        self.encoder = Encoder(num_encoder_layers, d_model=d_model, d_ffn=dim_feedforward,
                               dropout=dropout, n_levels=num_feature_levels, n_heads=nhead,
                               n_points=enc_n_points)
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        nn.init.normal_(self.level_embed)

    def forward(self, srcs, pos_embeds):
        """Lists of (N, C, H_l, W_l) -> (N, S, C) memory and the levels' ((H_l, W_l), ...)."""
        shapes = tuple((int(s.shape[-2]), int(s.shape[-1])) for s in srcs)
        src = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)
        pos = torch.cat([p.flatten(2).transpose(1, 2) + self.level_embed[i].view(1, 1, -1)
                         for i, p in enumerate(pos_embeds)], 1)
        return self.encoder(src, pos, shapes), shapes


class PositionEmbeddingSine(nn.Module):
    """DETR's normalised sine embedding: (N, C, H, W) -> (N, 2 * num_pos_feats, H, W)."""

    def __init__(self, num_pos_feats=128, temperature=10000, normalize=True, scale=2 * math.pi):
        super().__init__()
        self.num_pos_feats, self.temperature = num_pos_feats, temperature
        self.normalize, self.scale = normalize, scale

    def forward(self, x):
        N, _, H, W = x.shape
        ones = torch.ones(N, H, W, device=x.device, dtype=torch.float32)
        y_embed, x_embed = ones.cumsum(1), ones.cumsum(2)
        if self.normalize:
            eps = 1e-6
            y_embed = y_embed / (y_embed[:, -1:, :] + eps) * self.scale
            x_embed = x_embed / (x_embed[:, :, -1:] + eps) * self.scale
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=x.device)
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_pos_feats)
        pos_x, pos_y = x_embed[..., None] / dim_t, y_embed[..., None] / dim_t
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2).to(x.dtype)


class MSDeformAttnPixelDecoder(nn.Module):
    """``forward_features(features) -> (mask_features (N, mask_dim, H/4, W/4),
    transformer output at stride 32, [num_feature_levels multi-scale maps, coarse to fine])``.

    ``num_feature_levels`` (``MODEL.SEM_SEG_HEAD.NUM_FEATURE_LEVELS``, 3 in every published
    model) keeps the first maps of [transformer levels coarse to fine, then the FPN levels];
    at most ``num_outputs`` exist."""

    def __init__(self, input_shape: dict[str, ShapeSpec], transformer_in_features, conv_dim=256,
                 mask_dim=256, norm="GN", dropout=0.0, nheads=8, dim_feedforward=1024,
                 enc_layers=6, common_stride=4, n_points=4, num_feature_levels=3):
        super().__init__()
        shapes = sorted(input_shape.items(), key=lambda kv: kv[1].stride)
        self.in_features = [k for k, _ in shapes]
        tr = sorted(((k, input_shape[k]) for k in transformer_in_features), key=lambda kv: kv[1].stride)
        self.transformer_in_features = [k for k, _ in tr]
        self.num_levels = len(tr)
        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(spec.channels, conv_dim, 1), nn.GroupNorm(32, conv_dim))
            for _, spec in reversed(tr))  # coarse to fine, as the official ordering
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.zeros_(proj[0].bias)
        self.transformer = EncoderOnlyTransformer(conv_dim, nheads, enc_layers, dim_feedforward,
                                                  dropout, self.num_levels, n_points)
        self.pe_layer = PositionEmbeddingSine(conv_dim // 2, normalize=True)
        self.mask_dim = mask_dim
        self.mask_features = Conv2d(conv_dim, mask_dim, 1)
        nn.init.kaiming_uniform_(self.mask_features.weight, a=1)
        nn.init.zeros_(self.mask_features.bias)
        self.maskformer_num_feature_levels = num_feature_levels
        # FPN-style path for the features finer than the transformer's (res2 for Swin)
        min_tr_stride = tr[0][1].stride
        finer = [(k, s) for k, s in shapes if s.stride < min_tr_stride and s.stride >= common_stride]
        self.lateral_convs, self.output_convs = [], []
        use_bias = norm == ""
        for idx, (name, spec) in enumerate(finer):
            lateral = Conv2d(spec.channels, conv_dim, 1, bias=use_bias, norm=get_norm(norm, conv_dim))
            # relu in place on the norm's fresh output (which no backward needs): one full-size
            # stride-4 map fewer to allocate (64 MB at 1024 x 1024)
            output = Conv2d(conv_dim, conv_dim, 3, padding=1, bias=use_bias,
                            norm=get_norm(norm, conv_dim), activation=functools.partial(F.relu, inplace=True))
            for m in (lateral, output):
                nn.init.kaiming_uniform_(m.weight, a=1)
            self.add_module(f"adapter_{idx + 1}", lateral)
            self.add_module(f"layer_{idx + 1}", output)
            self.lateral_convs.insert(0, lateral)  # applied fine-last, like the official
            self.output_convs.insert(0, output)
        self.finer_features = [k for k, _ in finer][::-1]
        self.num_outputs = self.num_levels + len(finer)
        if not 1 <= num_feature_levels <= self.num_outputs:
            raise ValueError(
                f"MODEL.SEM_SEG_HEAD.NUM_FEATURE_LEVELS={num_feature_levels}: the pixel decoder "
                f"gives 1..{self.num_outputs} maps ({self.num_levels} transformer levels "
                f"{self.transformer_in_features} + {len(finer)} FPN levels)")

    def forward_features(self, features):
        names = self.transformer_in_features[::-1]  # coarse to fine
        srcs = [proj(features[n].float()) for proj, n in zip(self.input_proj, names)]
        pos = [self.pe_layer(s) for s in srcs]
        memory, shapes = self.transformer(srcs, pos)
        N = memory.shape[0]
        out = [m.transpose(1, 2).reshape(N, -1, h, w)
               for m, (h, w) in zip(memory.split([h * w for h, w in shapes], dim=1), shapes)]
        for name, lateral, output in zip(self.finer_features, self.lateral_convs, self.output_convs):
            x = lateral(features[name].float())
            # the transformer's maps are views of (N, S, C) tokens (channels last); upsampling
            # a contiguous copy is several times faster on a CPU (the same up to float rounding)
            up = F.interpolate(out[-1].contiguous(), size=x.shape[-2:], mode="bilinear", align_corners=False)
            # into the lateral's fresh output (its norm's backward does not read it) when the sum
            # keeps its dtype
            y = x.add_(up) if torch.promote_types(x.dtype, up.dtype) == x.dtype else x + up
            out.append(output(y))
        multi_scale = out[: self.maskformer_num_feature_levels]
        return self.mask_features(out[-1]), out[0], multi_scale
