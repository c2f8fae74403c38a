"""Mask2Former head: official parameter names, deformable attention, forward shapes."""
import pytest
import torch
import torch.nn.functional as F

from detectron2.layers import ShapeSpec

from mask2former.modeling.head import MaskFormerHead
from mask2former.modeling.pixel_decoder import MSDeformAttn, ms_deform_attn, softmax_last
from tests.compile_check import compiled_in_inference
from tests.numerics import assert_close_f32
from tests.reference_keys import read_keys

SWIN_L = {"res2": ShapeSpec(channels=192, stride=4), "res3": ShapeSpec(channels=384, stride=8),
          "res4": ShapeSpec(channels=768, stride=16), "res5": ShapeSpec(channels=1536, stride=32)}


@pytest.mark.parametrize("task, classes", [("coco_panoptic", 133), ("coco_instance", 80), ("ade20k_panoptic", 150)])
def test_head_names_and_shapes_equal_official(task, classes):
    official = {k[len("sem_seg_head."):]: v for k, v in read_keys(f"mask2former_swinL_{task}").items()
                if k.startswith("sem_seg_head.")}
    with torch.device("meta"):
        head = MaskFormerHead(SWIN_L, classes, num_queries=200)
    assert {k: tuple(v.shape) for k, v in head.state_dict().items()} == official


def _naive_bilinear(img, x, y):
    """img (D, H, W); (x, y) in [0, 1] with align_corners=False; zeros outside."""
    D, H, W = img.shape
    px, py = x * W - 0.5, y * H - 0.5
    x0, y0 = int(torch.floor(torch.tensor(px))), int(torch.floor(torch.tensor(py)))
    out = torch.zeros(D)
    for yy in (y0, y0 + 1):
        for xx in (x0, x0 + 1):
            if 0 <= yy < H and 0 <= xx < W:
                out += img[:, yy, xx] * (1 - abs(px - xx)) * (1 - abs(py - yy))
    return out


def test_deformable_attention_core_matches_naive_sampling():
    torch.manual_seed(0)
    shapes = torch.tensor([[4, 5], [2, 3]])
    N, M, D, Lq, L, P = 2, 2, 3, 4, 2, 3
    S = int((shapes[:, 0] * shapes[:, 1]).sum())
    value = torch.randn(N, S, M, D)
    loc = torch.rand(N, Lq, M, L, P, 2) * 1.2 - 0.1  # some samples fall outside
    w = torch.rand(N, Lq, M, L, P)
    out = ms_deform_attn(value, shapes, loc, w)
    assert out.shape == (N, Lq, M * D)
    starts = [0, 20]
    for n in range(N):
        for q in range(Lq):
            for m in range(M):
                acc = torch.zeros(D)
                for lvl, (h, wd) in enumerate(shapes.tolist()):
                    img = value[n, starts[lvl]: starts[lvl] + h * wd, m].t().reshape(D, h, wd)
                    for p in range(P):
                        acc += w[n, q, m, lvl, p] * _naive_bilinear(img, float(loc[n, q, m, lvl, p, 0]),
                                                                   float(loc[n, q, m, lvl, p, 1]))
                torch.testing.assert_close(out[n, q, m * D:(m + 1) * D], acc, atol=1e-5, rtol=1e-5)


def _grid_sample_reference(value, shapes, loc, w):
    """The same sum through grid_sample, one level and point at a time (float64)."""
    N, _, M, D = value.shape
    _, Lq, _, L, P, _ = loc.shape
    out, start = 0, 0
    for lvl, (h, wd) in enumerate(shapes.tolist()):
        v = value[:, start: start + h * wd].permute(0, 2, 3, 1).reshape(N * M, D, h, wd)
        start += h * wd
        for p in range(P):
            grid = (2 * loc[:, :, :, lvl, p] - 1).transpose(1, 2).reshape(N * M, Lq, 1, 2)
            sampled = F.grid_sample(v, grid, mode="bilinear", padding_mode="zeros", align_corners=False)[..., 0]
            out = out + sampled * w[:, :, :, lvl, p].transpose(1, 2).reshape(N * M, 1, Lq)
    return out.view(N, M, D, Lq).permute(0, 3, 1, 2).reshape(N, Lq, M * D)


def test_deformable_attention_far_outside_and_its_gradients_match_grid_sample():
    """Samples anywhere (far outside every map, on its edges) and the gradients with respect
    to the values, the sampling locations and the attention weights, against grid_sample."""
    torch.manual_seed(1)
    shapes = torch.tensor([[5, 7], [3, 2], [1, 1]])
    N, M, D, Lq, L, P = 2, 3, 4, 6, 3, 2
    S = int((shapes[:, 0] * shapes[:, 1]).sum())
    value = torch.randn(N, S, M, D, dtype=torch.float64, requires_grad=True)
    loc = torch.rand(N, Lq, M, L, P, 2, dtype=torch.float64) * 5 - 2  # most fall outside
    loc[0, 0, 0, 0, 0] = torch.tensor([0.0, 1.0], dtype=torch.float64)  # on the edges
    loc.requires_grad_(True)
    w = torch.rand(N, Lq, M, L, P, dtype=torch.float64, requires_grad=True)
    got, want = ms_deform_attn(value, shapes, loc, w), _grid_sample_reference(value, shapes, loc, w)
    torch.testing.assert_close(got, want)
    g = torch.randn_like(got)
    grads = torch.autograd.grad(got, (value, loc, w), g)
    want_grads = torch.autograd.grad(want, (value, loc, w), g)
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_deformable_attention_samples_in_float32_for_half_inputs(dtype):
    torch.manual_seed(2)
    shapes = torch.tensor([[64, 80], [32, 40]])
    S = int((shapes[:, 0] * shapes[:, 1]).sum())
    value, loc, w = torch.randn(1, S, 2, 8), torch.rand(1, 50, 2, 2, 4, 2), torch.rand(1, 50, 2, 2, 4)
    half = ms_deform_attn(value.to(dtype), shapes, loc.to(dtype), w.to(dtype))
    assert half.dtype == dtype
    # within the inputs' own rounding: coordinates sampled in float32, not off by pixels
    want = ms_deform_attn(value.to(dtype).float(), shapes, loc.to(dtype).float(), w.to(dtype).float())
    torch.testing.assert_close(half.float(), want, rtol=1e-2, atol=1e-2)


def test_deformable_attention_module_equals_the_official_formula():
    """MSDeformAttn (locations level by level, the CPU softmax over the transposed view)
    against the official forward written out: softmax(-1) of the attention logits,
    locations = reference + offsets / (W, H) in one broadcast, then the sampling; outputs and
    gradients, with reference points that differ between levels."""
    torch.manual_seed(3)
    shapes = torch.tensor([[6, 5], [3, 4], [2, 2]])
    N, C, M, L, P = 2, 16, 4, 3, 2
    S = int((shapes[:, 0] * shapes[:, 1]).sum())
    attn = MSDeformAttn(C, L, M, P).double()
    with torch.no_grad():
        attn.sampling_offsets.weight.normal_(0, 0.5)
        attn.attention_weights.weight.normal_(0, 1.0)
    query = torch.randn(N, S, C, dtype=torch.float64, requires_grad=True)
    value_in = torch.randn(N, S, C, dtype=torch.float64, requires_grad=True)
    ref = torch.rand(N, S, L, 2, dtype=torch.float64)

    def official(query, value_in, ref):
        value = attn.value_proj(value_in).view(N, S, M, C // M)
        offsets = attn.sampling_offsets(query).view(N, S, M, L, P, 2)
        weights = attn.attention_weights(query).view(N, S, M, L * P).softmax(-1).view(N, S, M, L, P)
        loc = ref[:, :, None, :, None, :] + offsets / shapes.flip(-1).to(query)[None, None, None, :, None, :]
        return attn.output_proj(ms_deform_attn(value, shapes, loc, weights))

    got, want = attn(query, ref, value_in, shapes), official(query, value_in, ref)
    torch.testing.assert_close(got, want)
    g = torch.randn_like(got)
    for a, b in zip(torch.autograd.grad(got, (query, value_in), g), torch.autograd.grad(want, (query, value_in), g)):
        torch.testing.assert_close(a, b)
    with torch.no_grad():  # float32 too (the CPU softmax: the same up to rounding)
        attn.float()
        q32, v32, r32 = query.float(), value_in.float(), ref.float()
        assert_close_f32(attn(q32, r32, v32, shapes), official(q32, v32, r32))


@pytest.mark.parametrize("shape", [(7, 12), (2, 5, 3, 12), (1, 1)])
def test_softmax_last_equals_softmax(shape):
    x = torch.randn(*shape, dtype=torch.float64) * 4
    got = softmax_last(x)
    assert got.shape == x.shape
    torch.testing.assert_close(got, x.softmax(-1), rtol=1e-14, atol=1e-15)


def _tiny_head():
    """A small MaskFormerHead in eval (seed 0; 5 classes, 7 queries, 2 encoder and 3 decoder
    layers) and random Swin-like features of two 96 x 128 images."""
    torch.manual_seed(0)
    shapes = {k: ShapeSpec(channels=c, stride=s) for k, c, s in
              [("res2", 16, 4), ("res3", 24, 8), ("res4", 32, 16), ("res5", 40, 32)]}
    head = MaskFormerHead(shapes, num_classes=5, conv_dim=32, mask_dim=32, enc_layers=2,
                          enc_dim_feedforward=64, hidden_dim=32, num_queries=7, nheads=4,
                          dim_feedforward=64, dec_layers=3).eval()
    feats = {k: torch.randn(2, s.channels, 96 // s.stride, 128 // s.stride) for k, s in shapes.items()}
    return head, feats


def test_tiny_head_forward_shapes_and_masks():
    head, feats = _tiny_head()
    with torch.no_grad():
        out = head(feats)
    assert out["pred_logits"].shape == (2, 7, 6)
    assert out["pred_masks"].shape == (2, 7, 24, 32)
    assert len(out["aux_outputs"]) == 3
    assert all(torch.isfinite(v).all() for v in (out["pred_logits"], out["pred_masks"]))


def test_head_compiles_to_one_graph_in_inference():
    """Pixel decoder (deformable attention with the level sizes as Python ints, no tensor to
    read them from) and masked-attention decoder as one graph under inference mode (what
    ``tools/benchmark_model.py --compile model`` runs between pre- and post-processing),
    the eager outputs bitwise."""
    head, feats = _tiny_head()
    eager, ours, again, frames = compiled_in_inference(head, feats)
    assert frames == 1
    for key in ("pred_logits", "pred_masks"):
        assert torch.equal(ours[key], eager[key]) and torch.equal(again[key], eager[key]), key


def test_pixel_decoder_feed_forward_in_token_blocks_equals_one_call(monkeypatch):
    """Without autograd on a CPU the encoder's FFN runs in blocks of tokens (here 11, so the
    last block is ragged and every level is split); with autograd it is one call. Same maps."""
    from mask2former.modeling import pixel_decoder

    head, feats = _tiny_head()
    pd = head.pixel_decoder
    calls = []
    layer = pd.transformer.encoder.layers[0]
    monkeypatch.setattr(layer, "_ffn_block", lambda x, f=layer._ffn_block: calls.append(x.shape) or f(x))
    with torch.enable_grad():
        whole = pd.forward_features(feats)
    assert len(calls) == 1 and calls[0][:2] == (2, 3 * 4 + 6 * 8 + 12 * 16)
    calls.clear()
    monkeypatch.setattr(pixel_decoder, "FFN_BLOCK_TOKENS", 11)
    with torch.no_grad():
        blocks = pd.forward_features(feats)
    tokens = 2 * (3 * 4 + 6 * 8 + 12 * 16)
    assert tokens % 11 and [c[0] for c in calls] == [min(11, tokens - i) for i in range(0, tokens, 11)]
    for a, b in zip([blocks[0], blocks[1], *blocks[2]], [whole[0], whole[1], *whole[2]]):
        assert_close_f32(a, b.detach())


@pytest.mark.parametrize("features", ["random", "one sign per query"])
def test_masked_attention_decoder_equals_the_official_order(features):
    """Masks broadcast over the heads and kept boolean, attention through the layer's own
    MultiheadAttention weights = the official repeat-per-head MultiheadAttention call; with
    one sign per query, about half the queries mask every pixel (then they attend everywhere)."""
    from mask2former import official_order
    from mask2former.modeling.transformer_decoder import MultiScaleMaskedTransformerDecoder

    torch.manual_seed(0)
    dec = MultiScaleMaskedTransformerDecoder(32, num_classes=5, hidden_dim=32, num_queries=7, nheads=4,
                                             dim_feedforward=64, dec_layers=4, mask_dim=32).eval()
    x = [torch.randn(2, 32, h, w) for h, w in [(3, 4), (6, 8), (12, 16)]]
    mask_features = torch.randn(2, 32, 24, 32) * 3
    if features == "one sign per query":  # mask logits = 10 x one embedding value of the query
        with torch.no_grad():
            embed = dec.mask_embed(dec.decoder_norm(dec.query_feat.weight))  # (Q, C) before the first layer
        mixed = torch.minimum((embed > 0).sum(0), (embed < 0).sum(0)).argmax()  # a channel of both signs
        mask_features = torch.zeros(2, 32, 24, 32)
        mask_features[:, mixed] = 10.0
        with torch.no_grad():
            _, _, first = dec.prediction_heads(dec.query_feat.weight[:, None].expand(-1, 2, -1), mask_features, (3, 4))
        assert 0 < int(first.all(-1).sum()) < first.shape[0] * first.shape[1]
    with torch.no_grad():
        got = dec(x, mask_features)
        cls, masks = official_order.decoder(dec, x, mask_features)
    torch.testing.assert_close(got["pred_logits"], cls, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["pred_masks"], masks, rtol=1e-5, atol=1e-4)


def test_decoder_in_eval_predicts_earlier_masks_only_at_the_attention_size():
    """Eval skips the full-size intermediate mask logits (aux outputs carry class logits
    only) and gives the training pass's final outputs; training keeps every layer's masks."""
    from mask2former.modeling.transformer_decoder import MultiScaleMaskedTransformerDecoder

    torch.manual_seed(0)
    dec = MultiScaleMaskedTransformerDecoder(32, num_classes=5, hidden_dim=32, num_queries=7, nheads=4,
                                             dim_feedforward=64, dec_layers=4, mask_dim=32)
    x = [torch.randn(1, 32, h, w) for h, w in [(3, 4), (6, 8), (24, 32)]]  # the finest level at mask size
    mask_features = torch.randn(1, 32, 24, 32) * 3
    with torch.no_grad():
        train = dec.train()(x, mask_features)
        test = dec.eval()(x, mask_features)
    assert [sorted(a) for a in train["aux_outputs"]] == [["pred_logits", "pred_masks"]] * 4
    assert all(a["pred_masks"].shape == (1, 7, 24, 32) for a in train["aux_outputs"])
    assert [sorted(a) for a in test["aux_outputs"]] == [["pred_logits"]] * 4
    torch.testing.assert_close(test["pred_masks"], train["pred_masks"], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(test["pred_logits"], train["pred_logits"], rtol=1e-5, atol=1e-5)
    for a, b in zip(test["aux_outputs"], train["aux_outputs"]):
        torch.testing.assert_close(a["pred_logits"], b["pred_logits"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape, size", [((2, 3, 32, 48), (4, 6)), ((1, 2, 32, 32), (8, 8)), ((1, 2, 32, 48), (16, 12)),
                                         ((1, 2, 24, 36), (4, 6)), ((1, 2, 30, 40), (5, 5)), ((1, 2, 16, 16), (16, 16))])
def test_decoder_shrink_equals_bilinear_interpolation(shape, size):
    """Even whole factors >= 4 (strided means) and everything else (the kernel) alike."""
    from mask2former.modeling.transformer_decoder import shrink

    x = torch.randn(shape) * 3
    want = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    got = shrink(x, size)
    assert got.shape == want.shape
    assert_close_f32(got, want)
