"""Token-reduction methods as patches on unmodified backbones (expedit_d2.reduction).

Each method's patch against a from-definition loop written here with plain torch (the
operators it composes have their own oracles in test_methods_ops.py / test_ops.py); the
settings that switch a method off give the base output bitwise; every (method, family) pair
builds from config alone and runs inside Detectron2's GeneralizedRCNN + FPN; bad settings
name their key.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from detectron2.config import get_cfg
from detectron2.modeling import build_backbone

from expedit_d2.config import add_expedit_config
from expedit_d2.methods import bipartite_soft_matching, evit_keep, evit_restore
from expedit_d2.reduction import apply_patch, family_of, remove_patch, settings_from_config
from expedit_d2.reduction.config import point_overrides
from tests.d2_helpers import run_faster_rcnn_fpn

METHOD_KEYS = {
    "expedit": {"MODEL.EXPEDIT.CLUSTERING_LOCATION": 2, "MODEL.EXPEDIT.NUM_CLUSTERS": [4, 4]},
    "tome": {"MODEL.TOKEN_REDUCTION.TOME.R": 6, "MODEL.TOKEN_REDUCTION.TOME.START_BLOCK": 1},
    "evit": {"MODEL.TOKEN_REDUCTION.EVIT.LOCATIONS": [1, 3], "MODEL.TOKEN_REDUCTION.EVIT.KEEP_RATE": 0.6},
    "pool": {"MODEL.TOKEN_REDUCTION.POOL.LOCATION": 2, "MODEL.TOKEN_REDUCTION.POOL.SIZE": [4, 5]},
}
SWIN_METHOD_KEYS = {
    "expedit": {"MODEL.EXPEDIT.CLUSTERING_LOCATION": 5, "MODEL.EXPEDIT.NUM_CLUSTERS": [8, 8]},
    "pool": {"MODEL.TOKEN_REDUCTION.POOL.LOCATION": 5, "MODEL.TOKEN_REDUCTION.POOL.SIZE": [6, 6]},
}
BASES = ["D2ViT", "D2ViTHybrid", "D2TimmViT", "D2SwinTransformer"]


def set_keys(cfg, values: dict):
    for key, value in values.items():
        node = cfg
        *path, last = key.split(".")
        for part in path:
            node = node[part]
        node[last] = value
    return cfg


def tiny_cfg(base: str, method: str = "none", add_config=add_expedit_config, **values):
    cfg = get_cfg()
    add_config(cfg)
    cfg.MODEL.DEVICE = "cpu"
    v = cfg.MODEL.VIT
    v.EMBED_DIM, v.DEPTH, v.NUM_HEADS, v.IMG_SIZE, v.NUM_CLASSES = 32, 6, 2, 96, 10
    v.TAPS = [0, 1, 3, 5] if base == "D2ViTHybrid" else [1, 2, 3, 5]
    v.HYBRID_LAYERS = [1, 1, 1]
    t = cfg.MODEL.TIMM_VIT
    t.NAME, t.TAPS = "vit_small_patch14_reg4_dinov2", [1, 2, 3, 5]
    t.KWARGS.depth, t.KWARGS.embed_dim, t.KWARGS.num_heads, t.KWARGS.init_values = 6, 32, 2, 1.0
    s = cfg.MODEL.SWIN
    s.EMBED_DIM, s.DEPTHS, s.NUM_HEADS, s.WINDOW_SIZE = 16, [2, 2, 4, 2], [1, 2, 2, 4], 12
    cfg.MODEL.BACKBONE.NAME = "ExpeditBackbone"
    cfg.MODEL.EXPEDIT.BASE = base
    cfg.MODEL.TOKEN_REDUCTION.METHOD = method
    return set_keys(cfg, values)


def build(cfg, seed=0):
    torch.manual_seed(seed)
    return build_backbone(cfg).eval()


def pair(base, method, values, x):
    """(base outputs, patched outputs) on the same weights."""
    plain = build(tiny_cfg(base))
    patched = build(tiny_cfg(base, method, **values), seed=1)
    patched.load_state_dict(plain.state_dict())
    with torch.no_grad():
        return plain(x), patched(x), plain, patched


# --------------------------------------------------------------------------------------
# from-definition oracles on our tiny ViT (cls + 7x8 grid)
# --------------------------------------------------------------------------------------
def manual_attention(blk, x, size=None):
    """Pre-norm attention written out: (output, keys averaged over heads, cls attention)."""
    a = blk.attn
    B, N, C = x.shape
    h = blk.norm1(x)
    qkv = h @ a.qkv.weight.t() + a.qkv.bias
    q, k, v = qkv.view(B, N, 3, a.num_heads, C // a.num_heads).permute(2, 0, 3, 1, 4)
    logits = torch.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(C // a.num_heads)
    if size is not None:
        logits = logits + torch.log(size)[:, None, None, :, 0]
    w = logits.softmax(-1)
    out = torch.einsum("bhqk,bhkd->bhqd", w, v).transpose(1, 2).reshape(B, N, C)
    return a.proj(out), k.mean(1), w[:, :, 0, 1:].mean(1)


def mlp(blk, x):
    return x + blk.mlp(blk.norm2(x))


def tokens_in(vit, x):
    tokens, grid, _ = vit.embed_tokens(x)
    return tokens, grid


def test_tome_patch_matches_a_loop_written_from_the_definition():
    x = torch.randn(1, 3, 112, 128)
    r, start = 6, 1
    _, got, plain, _ = pair("D2ViT", "tome", {"MODEL.TOKEN_REDUCTION.TOME.R": r,
                                              "MODEL.TOKEN_REDUCTION.TOME.START_BLOCK": start}, x)
    with torch.no_grad():
        t, grid = tokens_in(plain, x)
        size, members = None, [[i] for i in range(t.shape[1])]  # members of each current token
        taps = {}
        for i, blk in enumerate(plain.blocks):
            out, metric, _ = manual_attention(blk, t, size)
            t = t + out
            if i >= start:
                info = bipartite_soft_matching(metric, r, 1)
                dest = info.dest[0].tolist()
                s = torch.ones(t.shape[1], 1) if size is None else size[0]
                new_t = torch.zeros(info.num_out, t.shape[2])
                new_s = torch.zeros(info.num_out, 1)
                new_m = [[] for _ in range(info.num_out)]
                for j, d in enumerate(dest):  # size-weighted average, written out
                    new_t[d] += t[0, j] * s[j]
                    new_s[d] += s[j]
                    new_m[d] += members[j]
                t, size, members = (new_t / new_s)[None], new_s[None], new_m
            t = mlp(blk, t)
            if i in plain.taps:
                full = torch.zeros(1, sum(len(m) for m in members), t.shape[2])
                for j, m in enumerate(members):
                    full[0, m] = t[0, j]
                taps[i] = full
        want = plain._maps_to_outputs([plain._tokens_to_map(taps[i], grid) for i in plain.taps], x.shape[-2:])
    assert size is not None and t.shape[1] == 1 + 7 * 8 - r * (6 - start)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5)


def test_evit_patch_matches_a_loop_written_from_the_definition():
    x = torch.randn(1, 3, 112, 128)
    locations, rate = [1, 3], 0.6
    _, got, plain, _ = pair("D2ViT", "evit", {"MODEL.TOKEN_REDUCTION.EVIT.LOCATIONS": locations,
                                              "MODEL.TOKEN_REDUCTION.EVIT.KEEP_RATE": rate}, x)
    with torch.no_grad():
        t, grid = tokens_in(plain, x)
        N0 = t.shape[1] - 1
        origin = list(range(N0))  # grid position of each current patch token (-1: fused)
        last = torch.zeros(N0, t.shape[2])  # value of every dropped token when it was dropped
        taps = {}
        for i, blk in enumerate(plain.blocks):
            out, _, cls_attn = manual_attention(blk, t)
            t = t + out
            if i in locations:
                n = t.shape[1] - 1
                K = math.ceil(rate * n)
                order = sorted(range(n), key=lambda j: (-float(cls_attn[0, j]), j))
                kept, dropped = sorted(order[:K]), sorted(order[K:])
                for j in dropped:
                    if origin[j] >= 0:
                        last[origin[j]] = t[0, 1 + j]
                w = cls_attn[0, dropped] / cls_attn[0, dropped].sum()
                fused = (w[:, None] * t[0, [1 + j for j in dropped]]).sum(0)
                t = torch.cat([t[:, :1], t[:, [1 + j for j in kept]], fused[None, None]], dim=1)
                origin = [origin[j] for j in kept] + [-1]
            t = mlp(blk, t)
            if i in plain.taps:
                full = last.clone()
                for j, o in enumerate(origin):
                    if o >= 0:
                        full[o] = t[0, 1 + j]
                taps[i] = torch.cat([t[:, :1], full[None]], dim=1)
        want = plain._maps_to_outputs([plain._tokens_to_map(taps[i], grid) for i in plain.taps], x.shape[-2:])
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5)


def test_pool_patch_matches_a_loop_written_from_the_definition():
    x = torch.randn(1, 3, 112, 128)
    _, got, plain, _ = pair("D2ViT", "pool", METHOD_KEYS["pool"], x)
    with torch.no_grad():
        t, (H, W) = tokens_in(plain, x)
        taps = {}
        for i, blk in enumerate(plain.blocks):
            t = blk(t)
            if i in plain.taps:
                if t.shape[1] == 1 + H * W:
                    taps[i] = t
                else:
                    m = t[:, 1:].transpose(1, 2).reshape(1, -1, 4, 5)
                    up = F.interpolate(m, size=(H, W), mode="bilinear", align_corners=False)
                    taps[i] = torch.cat([t[:, :1], up.flatten(2).transpose(1, 2)], dim=1)
            if i == 2:
                m = t[:, 1:].transpose(1, 2).reshape(1, -1, H, W)
                t = torch.cat([t[:, :1], F.adaptive_avg_pool2d(m, (4, 5)).flatten(2).transpose(1, 2)], dim=1)
        want = plain._maps_to_outputs([plain._tokens_to_map(taps[i], (H, W)) for i in plain.taps], x.shape[-2:])
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------
# off = the base, bitwise; remove_patch restores the base
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("base", ["D2ViT", "D2TimmViT"])
@pytest.mark.parametrize("method, values", [
    ("tome", {"MODEL.TOKEN_REDUCTION.TOME.R": 0}),
    ("evit", {"MODEL.TOKEN_REDUCTION.EVIT.KEEP_RATE": 1.0, "MODEL.TOKEN_REDUCTION.EVIT.LOCATIONS": [1, 3]}),
    ("pool", {"MODEL.TOKEN_REDUCTION.POOL.LOCATION": 2, "MODEL.TOKEN_REDUCTION.POOL.SIZE": [7, 8]}),
])
def test_settings_that_reduce_nothing_give_the_base_bitwise(base, method, values):
    x = torch.randn(1, 3, 112, 128)  # a 7x8 (ours) / 8x10 (timm, patch 14) grid
    if base == "D2TimmViT" and method == "pool":
        values = {**values, "MODEL.TOKEN_REDUCTION.POOL.SIZE": [8, 10]}
    a, b, _, patched = pair(base, method, values, x)
    assert type(patched).__name__ != base  # patched, yet computing the base
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("base", BASES)
def test_remove_patch_restores_the_base_and_names_stay(base):
    keys = (SWIN_METHOD_KEYS if base == "D2SwinTransformer" else METHOD_KEYS)["expedit"]
    x = torch.randn(1, 3, 96, 128)
    a, b, plain, patched = pair(base, "expedit", keys, x)
    assert list(patched.state_dict()) == list(plain.state_dict())
    assert not all(torch.equal(a[k], b[k]) for k in a)
    remove_patch(patched)
    assert type(patched) is type(plain) and all(type(m) is type(n) for m, n in zip(patched.modules(), plain.modules()))
    with torch.no_grad():
        c = patched(x)
    assert all(torch.equal(a[k], c[k]) for k in a)
    with pytest.raises(ValueError, match="patched already"):
        apply_patch(apply_patch(patched, settings_from_config(tiny_cfg(base, "expedit", **keys))),
                    settings_from_config(tiny_cfg(base, "expedit", **keys)))


# --------------------------------------------------------------------------------------
# every (method, family) from config alone, inside Detectron2's GeneralizedRCNN + FPN
# --------------------------------------------------------------------------------------
PAIRS = [(b, m) for b in BASES for m in (SWIN_METHOD_KEYS if b == "D2SwinTransformer" else METHOD_KEYS)]


@pytest.mark.parametrize("base, method", PAIRS)
def test_every_method_family_pair_runs_in_generalized_rcnn_with_fpn(base, method):
    keys = (SWIN_METHOD_KEYS if base == "D2SwinTransformer" else METHOD_KEYS)[method]
    cfg = tiny_cfg(base, method, **keys)
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0  # random weights: keep every detection
    instances = run_faster_rcnn_fpn(cfg, "ExpeditBackbone", size=(96, 128))
    assert len(instances) > 0 and torch.isfinite(instances.pred_boxes.tensor).all()
    backbone = build_backbone(tiny_cfg(base, method, **keys))
    assert family_of(backbone) == ("swin" if base == "D2SwinTransformer" else "vit")
    reducers = [m for m in backbone.modules() if hasattr(m, "token_reduction")]
    assert len(reducers) == 1 and type(reducers[0]).__name__.lower().startswith(method)


def test_point_overrides_put_a_method_on_a_plain_backbone():
    cfg = get_cfg()
    add_expedit_config(cfg)
    cfg.MODEL.BACKBONE.NAME = "D2ViTHybrid"
    opts = point_overrides(cfg, {"MODEL.TOKEN_REDUCTION.METHOD": "tome", "MODEL.TOKEN_REDUCTION.TOME.R": 8})
    assert opts == {"MODEL.BACKBONE.NAME": "ExpeditBackbone", "MODEL.EXPEDIT.BASE": "D2ViTHybrid",
                    "MODEL.TOKEN_REDUCTION.METHOD": "tome", "MODEL.TOKEN_REDUCTION.TOME.R": 8}
    assert point_overrides(set_keys(cfg, opts), {}, baseline=True) == {
        "MODEL.EXPEDIT.ENABLED": False, "MODEL.TOKEN_REDUCTION.METHOD": "none"}


# --------------------------------------------------------------------------------------
# bad settings name their key
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("base, method, values, message", [
    ("D2ViT", "bogus", {}, r"MODEL.TOKEN_REDUCTION.METHOD='bogus' is not a token-reduction method"),
    ("D2ViT", "tome", {"MODEL.TOKEN_REDUCTION.TOME.R": -1}, r"MODEL.TOKEN_REDUCTION.TOME.R must be an int >= 0, got -1"),
    ("D2ViT", "tome", {"MODEL.TOKEN_REDUCTION.TOME.START_BLOCK": 6},
     r"MODEL.TOKEN_REDUCTION.TOME.START_BLOCK=6 is outside this ViT's blocks 0..5"),
    ("D2ViT", "evit", {"MODEL.TOKEN_REDUCTION.EVIT.KEEP_RATE": 0.0},
     r"MODEL.TOKEN_REDUCTION.EVIT.KEEP_RATE must be a number in \(0, 1\], got 0.0"),
    ("D2ViT", "evit", {"MODEL.TOKEN_REDUCTION.EVIT.LOCATIONS": [3, 1]},
     r"MODEL.TOKEN_REDUCTION.EVIT.LOCATIONS must be increasing block indices >= 0, got \[3, 1\]"),
    ("D2ViT", "evit", {"MODEL.TOKEN_REDUCTION.EVIT.LOCATIONS": [1, 9]},
     r"MODEL.TOKEN_REDUCTION.EVIT.LOCATIONS=9 is outside this ViT's blocks 0..5"),
    ("D2ViT", "pool", {"MODEL.TOKEN_REDUCTION.POOL.LOCATION": 2, "MODEL.TOKEN_REDUCTION.POOL.SIZE": [0, 4]},
     r"MODEL.TOKEN_REDUCTION.POOL.SIZE must be a positive int or a pair"),
    ("D2SwinTransformer", "pool", {"MODEL.TOKEN_REDUCTION.POOL.LOCATION": 5, "MODEL.TOKEN_REDUCTION.POOL.SIZE": [13, 13]},
     r"MODEL.TOKEN_REDUCTION.POOL.SIZE=\[13, 13\]: Swin pools each 12x12 attention window"),
    ("D2SwinTransformer", "pool", {"MODEL.TOKEN_REDUCTION.POOL.LOCATION": 10},
     r"MODEL.TOKEN_REDUCTION.POOL.LOCATION=10 is outside this Swin's blocks 0..9"),
    ("D2SwinTransformer", "tome", {"MODEL.TOKEN_REDUCTION.TOME.R": 4},
     r"MODEL.TOKEN_REDUCTION.METHOD='tome' has no patch for the 'swin' family of D2SwinTransformer"),
])
def test_bad_settings_name_the_key(base, method, values, message):
    with pytest.raises(ValueError, match=message):
        build_backbone(tiny_cfg(base, method, **values))


def test_timm_family_names_a_bad_model():
    cfg = tiny_cfg("D2TimmViT")
    cfg.MODEL.TIMM_VIT.NAME = "resnet18"
    with pytest.raises(ValueError, match="MODEL.TIMM_VIT.NAME='resnet18'"):
        build_backbone(cfg)


def test_dpt_runs_on_a_timm_vit_with_register_tokens_and_every_method():
    from detectron2.modeling import build_model

    from dpt.config import add_dpt_config

    for method, keys in [("none", {})] + list(METHOD_KEYS.items()):
        cfg = tiny_cfg("D2TimmViT", method, add_dpt_config, **keys)
        cfg.MODEL.META_ARCHITECTURE = "DPTDepth"
        cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD = [127.5] * 3, [127.5] * 3
        cfg.MODEL.DPT.REASSEMBLE_FEATURES, cfg.MODEL.DPT.FUSION_FEATURES = [16, 24, 32, 32], 16
        torch.manual_seed(0)
        model = build_model(cfg).eval()
        assert model.backbone.num_prefix_tokens == 5  # cls + 4 registers
        with torch.no_grad():
            out = model([{"image": torch.rand(3, 112, 140) * 255}])
        assert out[0]["depth"].shape == (112, 140) and torch.isfinite(out[0]["depth"]).all()


@pytest.mark.parametrize("method", list(METHOD_KEYS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_vit_method_runs_under_autocast(method, dtype):
    """Half-precision autocast (CPU here): finite outputs of the input's full shapes, close to
    float32 (the operators compute in float32 inside)."""
    x = torch.randn(1, 3, 112, 128)
    a, _, _, patched = pair("D2ViT", method, METHOD_KEYS[method], x)
    with torch.no_grad():
        full = patched(x)
        with torch.autocast("cpu", dtype=dtype):
            half = patched(x)
    for k in full:
        assert half[k].shape == full[k].shape and torch.isfinite(half[k]).all()
        cos = F.cosine_similarity(half[k].float().flatten(), full[k].flatten(), dim=0)
        assert cos > 0.98, (k, float(cos))
