"""ViT / ViT-Hybrid backbones: official DPT names, taps, expedit hooks, drop-in."""
import pytest
import torch

from detectron2.config import get_cfg
from detectron2.modeling import build_backbone

from expedit_d2 import add_expedit_config, token_clustering, token_reconstruction
from tests.d2_helpers import run_faster_rcnn_fpn
from tests.numerics import assert_close_f32
from tests.reference_keys import read_keys


@pytest.mark.parametrize("name, ref", [("D2ViTHybrid", "dpt_hybrid_vitb_rn50_384"),
                                       ("D2ViT", "dpt_large_vitl16_384")])
def test_state_dict_equals_official_dpt_backbone_keys(name, ref):
    cfg = get_cfg()
    add_expedit_config(cfg)
    cfg.MODEL.BACKBONE.NAME = name
    if name == "D2ViT":  # ViT-L/16
        cfg.MODEL.VIT.EMBED_DIM, cfg.MODEL.VIT.DEPTH, cfg.MODEL.VIT.NUM_HEADS = 1024, 24, 16
        cfg.MODEL.VIT.TAPS = [5, 11, 17, 23]
    else:
        cfg.MODEL.VIT.TAPS = [0, 1, 8, 11]
    with torch.device("meta"):
        model = build_backbone(cfg)
    official = {k[len("pretrained.model."):]: v for k, v in read_keys(ref).items()
                if k.startswith("pretrained.model.")}
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == official


@pytest.mark.parametrize("hybrid", [False, True])
@pytest.mark.parametrize("size", [(480, 640), (375, 500)])
def test_outputs_at_strides_4_to_32(hybrid, size, tiny_vit_cfg, seeded_backbone):
    cfg = tiny_vit_cfg("D2ViTHybrid" if hybrid else "D2ViT", hybrid)
    for name in [cfg.MODEL.BACKBONE.NAME, "ExpeditBackbone"]:
        cfg.MODEL.BACKBONE.NAME = name
        model = seeded_backbone(cfg)
        spec = model.output_shape()
        with torch.no_grad():
            out = model(torch.randn(1, 3, *size))
        for k, v in out.items():
            s = spec[k].stride
            assert v.shape == (1, spec[k].channels, -(-size[0] // s), -(-size[1] // s)), (name, k)
            assert torch.isfinite(v).all()


@pytest.mark.parametrize("hybrid", [False, True])
def test_disabled_is_bitwise_identical(hybrid, tiny_vit_cfg, seeded_backbone):
    cfg = tiny_vit_cfg("D2ViTHybrid" if hybrid else "D2ViT", hybrid)
    base = seeded_backbone(cfg)
    cfg.MODEL.BACKBONE.NAME, cfg.MODEL.EXPEDIT.ENABLED = "ExpeditBackbone", False
    plain = seeded_backbone(cfg, seed=3)
    plain.load_state_dict(base.state_dict())
    x = torch.randn(2, 3, 160, 224)
    with torch.no_grad():
        a, b = base(x), plain(x)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("hybrid", [False, True])
def test_taps_are_timms_own_intermediates_on_the_same_weights(hybrid, tiny_vit_cfg, seeded_backbone):
    """Our DPT ViT-L/16 and ViT-Hybrid (the official DPT release builds them with timm) against
    timm's own VisionTransformer holding our state dict (strict: the same names): the taps at
    every block are timm's public ``forward_intermediates``, class token first, at the
    pretraining grid (where no position-embedding resize takes place)."""
    from functools import partial

    from timm.layers import HybridEmbed, StdConv2dSame
    from timm.models.resnetv2 import ResNetV2
    from timm.models.vision_transformer import VisionTransformer

    ours = seeded_backbone(tiny_vit_cfg("D2ViTHybrid" if hybrid else "D2ViT", hybrid))
    size = dict(img_size=96, depth=6, embed_dim=32, num_heads=2, num_classes=10)  # as tiny_vit_cfg
    if hybrid:  # timm's R50+ViT-B/16 (vit_base_r50_s16_384) with our 1, 1, 1 stage depths
        stem = ResNetV2(layers=(1, 1, 1), num_classes=0, global_pool="", preact=False, stem_type="same",
                        conv_layer=partial(StdConv2dSame, eps=1e-8))
        timm_vit = VisionTransformer(patch_size=1, embed_layer=partial(HybridEmbed, backbone=stem), **size)
    else:
        timm_vit = VisionTransformer(patch_size=16, **size)
    timm_vit.load_state_dict(ours.state_dict(), strict=True)
    timm_vit.eval()
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        taps, grid, _ = ours.forward_taps(x, list(range(6)))
        want = timm_vit.forward_intermediates(x, indices=list(range(6)), norm=False, output_fmt="NLC",
                                              return_prefix_tokens=True, intermediates_only=True)
    assert grid == (6, 6) and len(taps) == len(want) == 6
    for i, (tap, (grid_tokens, cls)) in enumerate(zip(taps, want)):
        assert cls.shape[1] == 1 and grid_tokens.shape[1] == 36
        assert_close_f32(tap, torch.cat([cls, grid_tokens], dim=1), msg=f"block {i}")


@pytest.mark.parametrize("mode", ["topk", "nearest"])
def test_taps_follow_the_spec(mode, tiny_vit_cfg, seeded_backbone):
    """Cluster right after block alpha (cls kept), later blocks on clusters, every tap
    after alpha reconstructed, the tap at alpha exact (the official hook records the
    block's output before clustering) -- written out with the operators."""
    cfg = tiny_vit_cfg()
    cfg.MODEL.EXPEDIT.RECONSTRUCTION = mode
    base = seeded_backbone(cfg)
    cfg.MODEL.BACKBONE.NAME = "ExpeditBackbone"
    ex = seeded_backbone(cfg)
    ex.load_state_dict(base.state_dict())
    x = torch.randn(2, 3, 160, 224)
    with torch.no_grad():
        got, grid, _ = ex.forward_taps(x, [1, 2, 3, 5])
        plain, grid0, _ = base.forward_taps(x, [1, 2])
        assert grid == grid0 == (10, 14)
        # by hand
        tok, _, _ = base.patch_embed(x)
        t = torch.cat([base.cls_token.expand(2, -1, -1), tok], 1) + base.resized_pos_embed(grid)
        for blk in base.blocks[:3]:
            t = blk(t)
        clusters, state = token_clustering(t, grid, (5, 6), 5, 1.0, 5, num_prefix_tokens=1)
        expect = {}
        for i in (3, 4, 5):
            clusters = base.blocks[i](clusters)
            expect[i] = token_reconstruction(clusters, state, 4, 1.0, mode=mode)
    torch.testing.assert_close(got[0], plain[0])  # tap 1 is before the clustering point
    assert torch.equal(got[1], t) and torch.equal(got[1], plain[1])  # tap 2 = alpha: exact
    for tap, i in zip(got[2:], (3, 5)):
        assert tap.shape == (2, 1 + 140, 32)
        torch.testing.assert_close(tap, expect[i], atol=1e-5, rtol=1e-5)
        assert torch.equal(tap[:, :1], expect[i][:, :1])  # cls token passed through


def test_as_many_clusters_as_tokens_leaves_taps_unreconstructed(tiny_vit_cfg, seeded_backbone):
    """The official hook reconstructs only taps whose token count differs from the input's:
    with h x w = H x W the later taps are the cluster tokens themselves."""
    cfg = tiny_vit_cfg("ExpeditBackbone")
    cfg.MODEL.EXPEDIT.NUM_CLUSTERS, cfg.MODEL.EXPEDIT.RECON_K = [10, 14], 4
    ex = seeded_backbone(cfg)
    x = torch.randn(1, 3, 160, 224)
    with torch.no_grad():
        got, grid, _ = ex.forward_taps(x, [2, 3])
        tok, _, _ = ex.patch_embed(x)
        t = torch.cat([ex.cls_token.expand(1, -1, -1), tok], 1) + ex.resized_pos_embed(grid)
        for blk in ex.blocks[:3]:
            t = blk(t)
        clusters, _ = token_clustering(t, grid, (10, 14), 5, 1.0, 5, num_prefix_tokens=1)
    torch.testing.assert_close(got[1], ex.blocks[3](clusters), atol=1e-6, rtol=1e-6)


def test_dpt_checkpoint_names_load_cleanly(tmp_path, tiny_vit_cfg, seeded_backbone):
    src = seeded_backbone(tiny_vit_cfg("D2ViTHybrid", hybrid=True))
    path = tmp_path / "dpt_tiny.pt"
    torch.save({f"pretrained.model.{k}": v for k, v in src.state_dict().items()}, path)
    from dpt import convert_dpt_state_dict  # the one map of the official DPT names

    converted = convert_dpt_state_dict(torch.load(path, weights_only=True))
    mapped = {k[len("backbone."):]: v for k, v in converted.items()}
    for name in ["D2ViTHybrid", "ExpeditBackbone"]:
        cfg = tiny_vit_cfg(name, hybrid=True)
        model = seeded_backbone(cfg, seed=9)
        result = model.load_state_dict(mapped, strict=True)
        assert not result.missing_keys and not result.unexpected_keys
        assert all(torch.equal(v, src.state_dict()[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("hybrid", [False, True])
@pytest.mark.parametrize("bottom_up", ["plain", "ExpeditBackbone"])
def test_drops_into_generalized_rcnn_with_fpn(hybrid, bottom_up, tiny_vit_cfg):
    name = "D2ViTHybrid" if hybrid else "D2ViT"
    cfg = tiny_vit_cfg(name, hybrid)
    assert run_faster_rcnn_fpn(cfg, name if bottom_up == "plain" else bottom_up).image_size == (240, 320)


def test_dpt_key_map_rejects_keys_of_another_model():
    from dpt import convert_dpt_state_dict

    with pytest.raises(KeyError, match=r"keys that are not part of a DPT checkpoint: \['a.b'\]"):
        convert_dpt_state_dict({"pretrained.model.cls_token": torch.zeros(1), "a.b": torch.zeros(1)})


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_forward_is_finite(dtype, tiny_vit_cfg, seeded_backbone):
    cfg = tiny_vit_cfg("ExpeditBackbone", hybrid=True)
    model = seeded_backbone(cfg)
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        out = model(torch.randn(1, 3, 160, 224))
    assert all(torch.isfinite(v.float()).all() for v in out.values())


@pytest.mark.parametrize("key, value, message", [
    ("CLUSTERING_LOCATION", 6, r"MODEL.EXPEDIT.CLUSTERING_LOCATION=6 is outside this ViT's blocks 0..5"),
    ("NUM_CLUSTERS", [11, 13], r"MODEL.EXPEDIT.NUM_CLUSTERS=\[11, 13\] makes more clusters \(143\) than this input's "
     r"token grid \[10, 14\] \(rows, columns\) has tokens \(140\)"),
    ("RECON_K", 31, r"MODEL.EXPEDIT.RECON_K=31 exceeds the 5x6 clusters"),
    ("ITERS", 0, r"MODEL.EXPEDIT.ITERS must be an int >= 1, got 0"),
    ("SMALL_INPUT", "clamp", r"MODEL.EXPEDIT.SMALL_INPUT must be 'skip' or 'error', got 'clamp'"),
    ("RECON_TEMPERATURE", -1.0, r"MODEL.EXPEDIT.RECON_TEMPERATURE must be a positive finite number, got -1.0"),
])
def test_bad_expedit_config_names_the_key(key, value, message, tiny_vit_cfg, seeded_backbone):
    cfg = tiny_vit_cfg("ExpeditBackbone")
    cfg.MODEL.EXPEDIT.SMALL_INPUT = "error"
    setattr(cfg.MODEL.EXPEDIT, key, value)
    with pytest.raises(ValueError, match=message):
        seeded_backbone(cfg)(torch.randn(1, 3, 160, 224))


def test_bad_taps_are_rejected(tiny_vit_cfg, seeded_backbone):
    cfg = tiny_vit_cfg()
    cfg.MODEL.VIT.TAPS = [1, 2, 3, 6]
    with pytest.raises(ValueError, match=r"MODEL.VIT.TAPS \[1, 2, 3, 6\]: block indices \[6\] outside 0..5"):
        seeded_backbone(cfg)


def test_input_smaller_than_the_cluster_grid_runs_unexpedited_and_is_counted(caplog, tiny_vit_cfg, seeded_backbone):
    """One small image must not abort a long evaluation: it runs as the base backbone,
    is counted, and the fact is logged once."""
    from expedit_d2.expedit_backbone import unexpedited_images

    cfg = tiny_vit_cfg()
    base = seeded_backbone(cfg)
    cfg.MODEL.BACKBONE.NAME = "ExpeditBackbone"
    cfg.MODEL.EXPEDIT.NUM_CLUSTERS = [8, 8]
    ex = seeded_backbone(cfg)
    ex.load_state_dict(base.state_dict())
    small, large = torch.randn(2, 3, 96, 160), torch.randn(1, 3, 160, 224)  # 6x10, 10x14 tokens
    with torch.no_grad(), caplog.at_level("WARNING"):
        a, b = base(small), ex(small)
        ex(small[:1])
        ex(large)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert unexpedited_images(ex) == 3 and unexpedited_images(base) == 0
    warned = [r for r in caplog.records if "run unexpedited" in r.getMessage()]
    assert len(warned) == 1 and "NUM_CLUSTERS=[8, 8] makes more clusters (64) than this input's token grid [6, 10]" in warned[0].getMessage()


def test_weight_standardisation_is_cached_in_inference_and_follows_the_weights():
    from expedit_d2.backbones.vit import StdConv2dSame

    torch.manual_seed(0)
    conv = StdConv2dSame(4, 8, 3, 2)
    x = torch.randn(1, 4, 9, 9)
    with torch.no_grad():
        first = conv(x)
        cached = conv._standardized[1]
        again = conv(x)
        assert conv._standardized[1] is cached and torch.equal(first, again)
        conv.weight.mul_(2.0).add_(1.0)  # an in-place update (e.g. a checkpoint load)
        updated = conv(x)
    assert conv._standardized[1] is not cached
    recomputed = conv(x)  # autograd on: the uncached path
    assert recomputed.requires_grad and torch.equal(updated, recomputed.detach())
    # with autograd: recomputed every call, gradients reach the weight
    conv(x).sum().backward()
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0


def test_hybrid_bottleneck_in_place_activations_keep_outputs_and_gradients():
    """The stem's ReLUs and residual sum run in place on the norms' fresh outputs: the same
    outputs and gradients as the out-of-place formula, in training too."""
    import torch.nn.functional as F

    from expedit_d2.backbones.vit import Bottleneck

    torch.manual_seed(0)
    block = Bottleneck(64, 128, 2)  # GroupNorm's 32 groups: 32 middle channels at least
    x = torch.randn(2, 64, 9, 11, requires_grad=True)

    def gn(norm, t):
        t = F.group_norm(t, norm.num_groups, norm.weight, norm.bias, norm.eps)
        return F.relu(t) if norm.act else t

    def reference(t):
        ds = block.downsample
        shortcut = gn(ds.norm, ds.conv(t))
        t = gn(block.norm1, block.conv1(t))
        t = gn(block.norm2, block.conv2(t))
        return F.relu(gn(block.norm3, block.conv3(t)) + shortcut)

    got, want = block(x), reference(x)
    assert torch.equal(got, want)
    g = torch.randn_like(got)
    grads = torch.autograd.grad(got, [x, *block.parameters()], g)
    ref_grads = torch.autograd.grad(want, [x, *block.parameters()], g)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_nearest_reconstruction_ignores_recon_k(tiny_vit_cfg, seeded_backbone):
    """k only matters to the top-k layer: a k above the cluster count is no error with
    nearest-centre reconstruction (the official DPT release passes k 20 with any grid)."""
    cfg = tiny_vit_cfg("ExpeditBackbone")
    cfg.MODEL.EXPEDIT.RECONSTRUCTION, cfg.MODEL.EXPEDIT.RECON_K = "nearest", 31  # 5 x 6 clusters
    with torch.no_grad():
        out = seeded_backbone(cfg)(torch.randn(1, 3, 160, 224))
    assert all(torch.isfinite(v).all() for v in out.values())


@pytest.mark.parametrize("shape", [(1, 64, 241, 321), (2, 3, 4, 7), (1, 5, 3, 3), (1, 2, 10, 9)])
def test_stem_max_pool_by_strided_maxima_is_bitwise_max_pool2d(shape):
    """The CPU-inference pooling of the hybrid stem equals F.max_pool2d(x, 3, 2) bit for bit,
    -inf padding, ties and NaN included; maps under 3 x 3 are refused with their shape."""
    import torch.nn.functional as F

    from expedit_d2.backbones.vit import max_pool_3x3_s2

    torch.manual_seed(0)
    x = torch.randn(shape).round()  # rounding makes ties common
    x[..., -1, :] = float("-inf")  # the SAME padding's row and column
    x[..., :, -1] = float("-inf")
    x.view(-1)[1] = float("nan")
    got, want = max_pool_3x3_s2(x), F.max_pool2d(x, 3, 2)
    assert got.shape == want.shape
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(), want.nan_to_num())
    with pytest.raises(ValueError, match=r"at least 3 x 3, got \(1, 1, 2, 5\)"):
        max_pool_3x3_s2(torch.zeros(1, 1, 2, 5))


def test_stem_pools_by_maxima_only_in_cpu_inference():
    """Eval without autograd takes the strided maxima, training keeps max_pool2d (its
    gradient goes to one input at ties); both give the same stem output."""
    from unittest import mock

    from expedit_d2.backbones import vit

    torch.manual_seed(0)
    stem = vit.Stem(3, 64).eval()
    x = torch.randn(1, 3, 37, 50)
    with mock.patch.object(vit, "max_pool_3x3_s2", wraps=vit.max_pool_3x3_s2) as fast:
        with torch.no_grad():
            inference = stem(x)
        assert fast.call_count == 1
        trained = stem.train()(x)
        assert fast.call_count == 1 and trained.requires_grad
    assert torch.equal(inference, trained.detach())
