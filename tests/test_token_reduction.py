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

from timm.layers import apply_rot_embed_cat

from expedit_d2.backbones.base import block_inputs_of
from expedit_d2.config import add_expedit_config
from expedit_d2.methods import bipartite_soft_matching
from expedit_d2.methods.tome import merged_positions
from expedit_d2.reduction import (METHOD_KEY, ExampleTarget, apply_patch, example_settings, family_of, remove_patch,
                                  settings_from_config)
from expedit_d2.reduction.config import point_overrides
from tests.compile_check import compiled_in_inference
from tests.d2_helpers import run_faster_rcnn_fpn, set_keys
from tests.numerics import assert_close_f32
from tests.timm_models import EVA02_BASE, ROPE_REG1_NO_CLS, TIMM_MODELS

def _registered_examples(target: ExampleTarget) -> dict:
    """{method: its keys} of every registered method with an example for ``target`` (the
    method key itself aside: tiny_cfg sets it)."""
    return {m: {k: v for k, v in keys.items() if k != METHOD_KEY} for m, keys in example_settings(target).items()}


#: the tiny ViTs below: 6 blocks, 96 x 96 -> 6 x 6 tokens, expedit to 4 x 4 after block 2;
#: every registered method's example for it (a method added to the registry is tested here)
METHOD_KEYS = _registered_examples(ExampleTarget("vit", 6, (6, 6), 2, (4, 4)))
#: the tiny Swin: 10 blocks, windows of 12, expedit to 8 x 8 per window before block 5
SWIN_METHOD_KEYS = _registered_examples(ExampleTarget("swin", 10, (12, 12), 5, (8, 8)))
BASES = ["D2ViT", "D2ViTHybrid", "D2TimmViT", "EVA", "ExpeditD2SwinTransformer"]


@pytest.fixture
def pair(tiny_reduction_cfg, seeded_backbone):
    """``pair(base, method, values, x, sharpen=1.0)``: (base outputs, patched outputs, base,
    patched) on the same weights; ``sharpen`` scales the q/k/v weights so that random
    attention is peaked (positions then matter well above rounding)."""
    def make(base, method, values, x, sharpen=1.0):
        plain = seeded_backbone(tiny_reduction_cfg(base))
        with torch.no_grad():
            for name, p in plain.named_parameters():
                if name.endswith("qkv.weight"):
                    p.mul_(sharpen)
        patched = seeded_backbone(tiny_reduction_cfg(base, method, **values), seed=1)
        patched.load_state_dict(plain.state_dict())
        with torch.no_grad():
            return plain(x), patched(x), plain, patched

    return make


# --------------------------------------------------------------------------------------
# from-definition oracles on our tiny ViT (cls + 7x8 grid) and on timm's EVA (cls + 8x10
# grid, rotary embeddings: one table, or one per block for "mixed")
# --------------------------------------------------------------------------------------
ORACLE_BASES = ["D2ViT", "EVA", "EVA-mixed"]
#: q/k/v weights x 8: peaked attention, so that a wrong rotation shows well above rounding
SHARPEN = 8.0


def rope_tables(vit, grid):
    """Per block: the rotary table (..., h*w, D) the block takes, or None (no rotary)."""
    return [inputs.get("rope") for inputs in block_inputs_of(vit, grid)]


def rows(table, positions):
    """The rotary rows of grid positions (a list), for a batch of one."""
    return None if table is None else table[..., positions, :]


def manual_attention(blk, x, size=None, rope=None):
    """Pre-norm attention written out (layer scale included): (output, keys averaged over
    heads before any rotation, cls attention). ``rope``: rows for the grid tokens."""
    a = blk.attn
    B, N, C = x.shape
    h = blk.norm1(x)
    if getattr(a, "q_bias", None) is not None:  # EVA: q and v biases, no k bias
        bias = torch.cat([a.q_bias, torch.zeros_like(a.q_bias), a.v_bias])
    else:
        bias = a.qkv.bias
    qkv = h @ a.qkv.weight.t() + bias
    d = qkv.shape[-1] // 3 // a.num_heads
    q, k, v = qkv.view(B, N, 3, a.num_heads, d).permute(2, 0, 3, 1, 4)
    metric = k.mean(1)
    if rope is not None:  # rotate the grid tokens (the prefix token is not rotated)
        q = torch.cat([q[:, :, :1], apply_rot_embed_cat(q[:, :, 1:], rope)], dim=2)
        k = torch.cat([k[:, :, :1], apply_rot_embed_cat(k[:, :, 1:], rope)], dim=2)
    logits = torch.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(d)
    if size is not None:
        logits = logits + torch.log(size)[:, None, None, :, 0]
    w = logits.softmax(-1)
    out = torch.einsum("bhqk,bhkd->bhqd", w, v).transpose(1, 2).reshape(B, N, -1)
    out = a.proj(getattr(a, "norm", torch.nn.Identity())(out))
    gamma = getattr(blk, "gamma_1", None)
    return (out if gamma is None else gamma * out), metric, w[:, :, 0, 1:].mean(1)


def mlp(blk, x):
    out = blk.mlp(blk.norm2(x))
    gamma = getattr(blk, "gamma_2", None)
    return x + (out if gamma is None else gamma * out)


def tokens_in(vit, x):
    tokens, grid, _ = vit.embed_tokens(x)
    return tokens, grid


def cell_centres(n, m):
    """Centre rows of the m cells of adaptive average pooling over n rows."""
    return [(math.floor(i * n / m) + math.ceil((i + 1) * n / m) - 1) // 2 for i in range(m)]


@pytest.mark.parametrize("base", ORACLE_BASES)
def test_tome_patch_matches_a_loop_written_from_the_definition(base, pair):
    x = torch.randn(1, 3, 112, 128)
    r, start = 6, 1
    _, got, plain, _ = pair(base, "tome", {"MODEL.TOKEN_REDUCTION.TOME.R": r,
                                           "MODEL.TOKEN_REDUCTION.TOME.START_BLOCK": start}, x, SHARPEN)
    with torch.no_grad():
        t, grid = tokens_in(plain, x)
        ropes = rope_tables(plain, grid)
        size, members = None, [[i] for i in range(t.shape[1])]  # members of each current token
        pos = list(range(t.shape[1] - 1))  # grid position of each grid token
        taps = {}
        for i, blk in enumerate(plain.blocks):
            out, metric, _ = manual_attention(blk, t, size, rows(ropes[i], pos))
            t = t + out
            if i >= start:
                info = bipartite_soft_matching(metric, r, 1)
                dest = info.dest[0].tolist()
                s = torch.ones(t.shape[1], 1) if size is None else size[0]
                new_t = torch.zeros(info.num_out, t.shape[2])
                new_s = torch.zeros(info.num_out, 1)
                new_m = [[] for _ in range(info.num_out)]
                new_pos = [None] * (info.num_out - 1)
                for j, d in enumerate(dest):  # size-weighted average, written out
                    new_t[d] += t[0, j] * s[j]
                    new_s[d] += s[j]
                    new_m[d] += members[j]
                    # a merged token stands where its B token (odd offset) stands
                    if j > 0 and ((j - 1) % 2 == 1 or new_pos[d - 1] is None):
                        new_pos[d - 1] = pos[j - 1]
                t, size, members, pos = (new_t / new_s)[None], new_s[None], new_m, new_pos
            t = mlp(blk, t)
            if i in plain.taps:
                full = torch.zeros(1, sum(len(m) for m in members), t.shape[2])
                for j, m in enumerate(members):
                    full[0, m] = t[0, j]
                taps[i] = full
        want = plain._maps_to_outputs([plain._tokens_to_map(taps[i], grid) for i in plain.taps], x.shape[-2:])
    assert size is not None and t.shape[1] == 1 + grid[0] * grid[1] - r * (6 - start)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("base", ORACLE_BASES)
def test_evit_patch_matches_a_loop_written_from_the_definition(base, pair):
    x = torch.randn(1, 3, 112, 128)
    locations, rate = [1, 3], 0.6
    _, got, plain, _ = pair(base, "evit", {"MODEL.TOKEN_REDUCTION.EVIT.LOCATIONS": locations,
                                           "MODEL.TOKEN_REDUCTION.EVIT.KEEP_RATE": rate}, x, SHARPEN)
    with torch.no_grad():
        t, grid = tokens_in(plain, x)
        ropes = rope_tables(plain, grid)
        N0 = t.shape[1] - 1
        origin = list(range(N0))  # grid position of each current patch token (-1: fused)
        pos = list(range(N0))  # where each current patch token stands (fused: its heaviest member)
        last = torch.zeros(N0, t.shape[2])  # value of every dropped token when it was dropped
        taps = {}
        for i, blk in enumerate(plain.blocks):
            out, _, cls_attn = manual_attention(blk, t, rope=rows(ropes[i], pos))
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
                heaviest = max(dropped, key=lambda j: float(cls_attn[0, j]))
                pos = [pos[j] for j in kept] + [pos[heaviest]]
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


@pytest.mark.parametrize("base", ORACLE_BASES)
def test_pool_patch_matches_a_loop_written_from_the_definition(base, pair):
    x = torch.randn(1, 3, 112, 128)
    h, w = 3, 4  # cells of 2-3 rows and columns: their centres are not their first tokens
    _, got, plain, _ = pair(base, "pool", {"MODEL.TOKEN_REDUCTION.POOL.LOCATION": 2,
                                           "MODEL.TOKEN_REDUCTION.POOL.SIZE": [h, w]}, x, SHARPEN)
    with torch.no_grad():
        t, (H, W) = tokens_in(plain, x)
        ropes = rope_tables(plain, (H, W))
        pos = list(range(H * W))
        taps = {}
        for i, blk in enumerate(plain.blocks):
            rope = rows(ropes[i], pos)
            t = blk(t) if rope is None else blk(t, rope=rope)  # the block itself, its own rotation
            if i in plain.taps:
                if t.shape[1] == 1 + H * W:
                    taps[i] = t
                else:
                    m = t[:, 1:].transpose(1, 2).reshape(1, -1, h, w)
                    up = F.interpolate(m, size=(H, W), mode="bilinear", align_corners=False)
                    taps[i] = torch.cat([t[:, :1], up.flatten(2).transpose(1, 2)], dim=1)
            if i == 2:
                m = t[:, 1:].transpose(1, 2).reshape(1, -1, H, W)
                t = torch.cat([t[:, :1], F.adaptive_avg_pool2d(m, (h, w)).flatten(2).transpose(1, 2)], dim=1)
                pos = [r * W + c for r in cell_centres(H, h) for c in cell_centres(W, w)]
        want = plain._maps_to_outputs([plain._tokens_to_map(taps[i], (H, W)) for i in plain.taps], x.shape[-2:])
    for k in want:
        assert_close_f32(got[k], want[k], msg=k)


@pytest.mark.parametrize("base", ["EVA", "EVA-mixed"])
def test_expedit_on_eva_gives_clusters_the_rotation_of_their_cells(base, pair, tiny_reduction_cfg):
    """After clustering (after block 2) the blocks take the rotary rows of the grid tokens at
    the centres of the 4x4 cells the clusters start from."""
    x = torch.randn(2, 3, 112, 128)
    _, got, plain, _ = pair(base, "expedit", METHOD_KEYS["expedit"], x, SHARPEN)
    settings = settings_from_config(tiny_reduction_cfg(base, "expedit", **METHOD_KEYS["expedit"]))
    clustering, reconstruction = settings.clustering(), settings.reconstruction()
    with torch.no_grad():
        t, (H, W) = tokens_in(plain, x)
        ropes = rope_tables(plain, (H, W))
        pos, state, taps = list(range(H * W)), None, {}
        for i, blk in enumerate(plain.blocks):
            t = blk(t, rope=rows(ropes[i], pos))
            if i in plain.taps:
                taps[i] = t if state is None else reconstruction(t, state)
            if i == 2:
                t, state = clustering(t, (H, W), num_prefix_tokens=1)
                pos = [r * W + c for r in cell_centres(H, 4) for c in cell_centres(W, 4)]
        want = plain._maps_to_outputs([plain._tokens_to_map(taps[i], (H, W)) for i in plain.taps], x.shape[-2:])
    for k in want:
        assert_close_f32(got[k], want[k], msg=k)


def test_merged_positions_follow_the_b_token():
    metric = torch.tensor([[[1.0, 0], [1, 0], [0, 1], [1, 0.1], [0, 1], [-1, 0]]])  # cls + 5 tokens
    info = bipartite_soft_matching(metric, 1, 1)  # A: tokens 1, 3, 5; B: tokens 2, 4
    positions = torch.tensor([[10, 11, 12, 13, 14]])  # grid positions of tokens 1..5
    got = merged_positions(info, positions)
    assert got.shape == (1, 4)
    members = {}
    for j, d in enumerate(info.dest[0, 1:].tolist()):
        members.setdefault(d, []).append(j)
    want = [None] * 4
    for d, js in members.items():
        b = [j for j in js if j % 2 == 1]
        want[d - 1] = 10 + (b[0] if b else js[0])
    assert got[0].tolist() == want


# --------------------------------------------------------------------------------------
# off = the base, bitwise; remove_patch restores the base
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", TIMM_MODELS)
def test_unpatched_timm_vit_taps_are_timms_own_intermediates(name, tiny_reduction_cfg, seeded_backbone):
    """The base every "vit" method patches: D2TimmViT's taps are timm's own public
    ``forward_intermediates`` (timm's position embedding, then its blocks, with Eva's own
    rotary embedding: one table, or one per block), prefix tokens (cls, registers) first, at
    every block, bitwise (the same timm modules run on both sides)."""
    x = torch.randn(2, 3, 112, 128)  # not whole patches of 14 or 16: timm pads the image
    vit = seeded_backbone(tiny_reduction_cfg("D2TimmViT", **{"MODEL.TIMM_VIT.NAME": name}))
    assert type(vit).__name__ == "D2TimmViT" and vit.num_prefix_tokens >= 1
    blocks = list(range(len(vit.blocks)))
    with torch.no_grad():
        taps, grid, _ = vit.forward_taps(x, blocks)
        want = vit.vit.forward_intermediates(x, indices=blocks, norm=False, output_fmt="NLC",
                                             return_prefix_tokens=True, intermediates_only=True)
    patch = vit.vit.patch_embed.patch_size
    assert grid == (-(-112 // patch[0]), -(-128 // patch[1]))
    assert len(taps) == len(want) == 6
    for i, (tap, (grid_tokens, prefix)) in enumerate(zip(taps, want)):
        assert prefix.shape[1] == vit.num_prefix_tokens and grid_tokens.shape[1] == grid[0] * grid[1], (name, i)
        assert torch.equal(tap, torch.cat([prefix, grid_tokens], dim=1)), (name, i)


@pytest.mark.parametrize("base", ["EVA", "EVA-mixed"])
@pytest.mark.parametrize("method", ["tome", "evit"])
def test_per_image_positions_on_eva_match_each_image_alone(base, method, pair):
    """ToMe and EViT keep different tokens in each image: a batch of two gives what each
    image gives alone (per-image rotary rows)."""
    x = torch.randn(2, 3, 112, 128)
    _, batched, _, patched = pair(base, method, METHOD_KEYS[method], x, SHARPEN)
    with torch.no_grad():
        alone = [patched(x[i: i + 1]) for i in range(2)]
    for k in batched:
        torch.testing.assert_close(batched[k], torch.cat([a[k] for a in alone]), rtol=1e-4, atol=1e-5)


def test_evit_needs_a_class_token(tiny_reduction_cfg):
    cfg = tiny_reduction_cfg("D2TimmViT", "evit", **METHOD_KEYS["evit"])
    cfg.MODEL.TIMM_VIT.NAME = ROPE_REG1_NO_CLS  # one register, no cls token
    with pytest.raises(ValueError, match="MODEL.TOKEN_REDUCTION.METHOD='evit' ranks tokens by the class token"):
        build_backbone(cfg)


@pytest.mark.parametrize("base", ["D2ViT", "D2TimmViT", "EVA", "EVA-mixed"])
@pytest.mark.parametrize("method, values", [
    ("tome", {"MODEL.TOKEN_REDUCTION.TOME.R": 0}),
    ("evit", {"MODEL.TOKEN_REDUCTION.EVIT.KEEP_RATE": 1.0, "MODEL.TOKEN_REDUCTION.EVIT.LOCATIONS": [1, 3]}),
    ("pool", {"MODEL.TOKEN_REDUCTION.POOL.LOCATION": 2, "MODEL.TOKEN_REDUCTION.POOL.SIZE": [7, 8]}),
])
def test_settings_that_reduce_nothing_give_the_base_bitwise(base, method, values, pair, tiny_reduction_cfg):
    """ToMe with r 0 and EViT keeping every token are off: no patch, as for every method; pool
    to the grid's own size is patched, yet computes the base."""
    x = torch.randn(1, 3, 112, 128)  # a 7x8 (patch 16) / 8x10 (patch 14: DINOv2, EVA-02) grid
    if base in ("D2TimmViT", "EVA") and method == "pool":
        values = {**values, "MODEL.TOKEN_REDUCTION.POOL.SIZE": [8, 10]}
    a, b, _, patched = pair(base, method, values, x)
    off = method in ("tome", "evit")
    assert settings_from_config(tiny_reduction_cfg(base, method, **values)) is None if off else True
    assert not any(hasattr(m, "token_reduction") for m in patched.modules()) if off else \
        type(patched).__name__ != base
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("base", BASES)
def test_remove_patch_restores_the_base_and_names_stay(base, pair, tiny_reduction_cfg):
    keys = (SWIN_METHOD_KEYS if base == "ExpeditD2SwinTransformer" else METHOD_KEYS)["expedit"]
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
        apply_patch(apply_patch(patched, settings_from_config(tiny_reduction_cfg(base, "expedit", **keys))),
                    settings_from_config(tiny_reduction_cfg(base, "expedit", **keys)))


# --------------------------------------------------------------------------------------
# every (method, family) from config alone, inside Detectron2's GeneralizedRCNN + FPN
# --------------------------------------------------------------------------------------
PAIRS = [(b, m) for b in BASES for m in (SWIN_METHOD_KEYS if b == "ExpeditD2SwinTransformer" else METHOD_KEYS)]


@pytest.mark.parametrize("base, method", PAIRS)
def test_every_method_family_pair_runs_in_generalized_rcnn_with_fpn(base, method, tiny_reduction_cfg):
    keys = (SWIN_METHOD_KEYS if base == "ExpeditD2SwinTransformer" else METHOD_KEYS)[method]
    cfg = tiny_reduction_cfg(base, method, **keys)
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0  # random weights: keep every detection
    instances = run_faster_rcnn_fpn(cfg, "ExpeditBackbone", size=(96, 128))
    assert len(instances) > 0 and torch.isfinite(instances.pred_boxes.tensor).all()
    backbone = build_backbone(tiny_reduction_cfg(base, method, **keys))
    assert family_of(backbone) == ("swin" if base == "ExpeditD2SwinTransformer" else "vit")
    reducers = [m for m in backbone.modules() if hasattr(m, "token_reduction")]
    assert len(reducers) == 1 and type(reducers[0]).__name__.lower().startswith(method)


@pytest.mark.parametrize("base, method", [(b, "none") for b in BASES] + PAIRS)
def test_every_backbone_and_method_compiles_to_one_graph_in_inference(base, method, tiny_reduction_cfg,
                                                                       seeded_backbone):
    """What ``tools/benchmark_model.py --compile backbone`` runs: under inference mode (where
    the hybrid's convs reuse a cached standardised weight in eager) one graph, no break, no
    recompilation on the next call, and the eager outputs bitwise."""
    keys = {} if method == "none" else (SWIN_METHOD_KEYS if base == "ExpeditD2SwinTransformer" else METHOD_KEYS)[method]
    model = seeded_backbone(tiny_reduction_cfg(base, method, **keys))
    x = torch.randn(1, 3, *((200, 296) if base == "ExpeditD2SwinTransformer" else (96, 128)))
    eager, ours, again, frames = compiled_in_inference(model, x)
    assert frames == 1
    for name in eager:
        assert torch.equal(ours[name], eager[name]) and torch.equal(again[name], eager[name]), name


def test_point_overrides_put_a_method_on_a_plain_backbone():
    cfg = get_cfg()
    add_expedit_config(cfg)
    cfg.MODEL.BACKBONE.NAME = "D2ViTHybrid"
    opts = point_overrides(cfg, {"MODEL.TOKEN_REDUCTION.METHOD": "tome", "MODEL.TOKEN_REDUCTION.TOME.R": 8})
    assert opts == {"MODEL.BACKBONE.NAME": "TokenReductionBackbone", "MODEL.TOKEN_REDUCTION.BASE": "D2ViTHybrid",
                    "MODEL.TOKEN_REDUCTION.METHOD": "tome", "MODEL.TOKEN_REDUCTION.TOME.R": 8}
    assert point_overrides(set_keys(cfg, opts), {}, baseline=True) == {
        "MODEL.EXPEDIT.ENABLED": False, "MODEL.TOKEN_REDUCTION.METHOD": "none"}


# --------------------------------------------------------------------------------------
# bad settings name their key
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("base, method, values, message", [
    ("D2ViT", "bogus", {}, r"MODEL.TOKEN_REDUCTION.METHOD='bogus' is not a token-reduction method"),
    ("D2ViT", "tome", {"MODEL.TOKEN_REDUCTION.TOME.R": -1}, r"MODEL.TOKEN_REDUCTION.TOME.R must be an int >= 0, got -1"),
    ("D2ViT", "tome", {"MODEL.TOKEN_REDUCTION.TOME.R": 2, "MODEL.TOKEN_REDUCTION.TOME.START_BLOCK": 6},
     r"MODEL.TOKEN_REDUCTION.TOME.START_BLOCK=6 is outside this ViT's blocks 0..5"),
    ("D2ViT", "evit", {"MODEL.TOKEN_REDUCTION.EVIT.KEEP_RATE": 0.0},
     r"MODEL.TOKEN_REDUCTION.EVIT.KEEP_RATE must be a number in \(0, 1\], got 0.0"),
    ("D2ViT", "evit", {"MODEL.TOKEN_REDUCTION.EVIT.LOCATIONS": [3, 1]},
     r"MODEL.TOKEN_REDUCTION.EVIT.LOCATIONS must be increasing block indices >= 0, got \[3, 1\]"),
    ("D2ViT", "evit", {"MODEL.TOKEN_REDUCTION.EVIT.KEEP_RATE": 0.5, "MODEL.TOKEN_REDUCTION.EVIT.LOCATIONS": [1, 9]},
     r"MODEL.TOKEN_REDUCTION.EVIT.LOCATIONS=9 is outside this ViT's blocks 0..5"),
    ("D2ViT", "pool", {"MODEL.TOKEN_REDUCTION.POOL.LOCATION": 2, "MODEL.TOKEN_REDUCTION.POOL.SIZE": [0, 4]},
     r"MODEL.TOKEN_REDUCTION.POOL.SIZE must be a positive int or a pair"),
    ("ExpeditD2SwinTransformer", "pool", {"MODEL.TOKEN_REDUCTION.POOL.LOCATION": 5, "MODEL.TOKEN_REDUCTION.POOL.SIZE": [13, 13]},
     r"MODEL.TOKEN_REDUCTION.POOL.SIZE=\[13, 13\]: Swin pools each 12x12 attention window"),
    ("ExpeditD2SwinTransformer", "pool", {"MODEL.TOKEN_REDUCTION.POOL.LOCATION": 10},
     r"MODEL.TOKEN_REDUCTION.POOL.LOCATION=10 is outside this Swin's blocks 0..9"),
    ("ExpeditD2SwinTransformer", "tome", {"MODEL.TOKEN_REDUCTION.TOME.R": 4},
     r"MODEL.TOKEN_REDUCTION.METHOD='tome' has no patch for the 'swin' family of ExpeditD2SwinTransformer"),
])
def test_bad_settings_name_the_key(base, method, values, message, tiny_reduction_cfg):
    with pytest.raises(ValueError, match=message):
        build_backbone(tiny_reduction_cfg(base, method, **values))


def test_timm_family_names_a_bad_model(tiny_reduction_cfg):
    cfg = tiny_reduction_cfg("D2TimmViT")
    cfg.MODEL.TIMM_VIT.NAME = "resnet18"
    with pytest.raises(ValueError, match="MODEL.TIMM_VIT.NAME='resnet18'"):
        build_backbone(cfg)


@pytest.mark.parametrize("base, prefix", [("D2TimmViT", 5), ("EVA", 1)])
def test_dpt_runs_on_timm_vits_and_every_method(base, prefix, tiny_reduction_cfg):
    """DINOv2 with 4 registers (cls + 4 prefix tokens) and EVA-02 (rotary embeddings)."""
    from detectron2.modeling import build_model

    from dpt.config import add_dpt_config

    for method, keys in [("none", {})] + list(METHOD_KEYS.items()):
        cfg = tiny_reduction_cfg(base, method, add_dpt_config, **keys)
        cfg.MODEL.META_ARCHITECTURE = "DPTDepth"
        cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD = [127.5] * 3, [127.5] * 3
        cfg.MODEL.DPT.REASSEMBLE_FEATURES, cfg.MODEL.DPT.FUSION_FEATURES = [16, 24, 32, 32], 16
        torch.manual_seed(0)
        model = build_model(cfg).eval()
        assert model.backbone.num_prefix_tokens == prefix
        with torch.no_grad():
            out = model([{"image": torch.rand(3, 112, 140) * 255}])
        assert out[0]["depth"].shape == (112, 140) and torch.isfinite(out[0]["depth"]).all()


@pytest.mark.parametrize("base", ["D2ViT", "EVA"])
@pytest.mark.parametrize("method", list(METHOD_KEYS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_vit_method_runs_under_autocast(base, method, dtype, pair):
    """Half-precision autocast (CPU here): finite outputs of the input's full shapes, close to
    float32 (the operators compute in float32 inside; EVA's rotary tables stay float32).
    ToMe's and EViT's choices are discrete (which tokens merge, which are kept): half
    precision may flip a near tie and move a few tokens, so their floor is lower."""
    x = torch.randn(1, 3, 112, 128, generator=torch.Generator().manual_seed(0))
    floor = 0.9 if method in ("tome", "evit") else 0.98
    a, _, _, patched = pair(base, method, METHOD_KEYS[method], x)
    with torch.no_grad():
        full = patched(x)
        with torch.autocast("cpu", dtype=dtype):
            half = patched(x)
    for k in full:
        assert half[k].shape == full[k].shape and torch.isfinite(half[k]).all()
        cos = F.cosine_similarity(half[k].float().flatten(), full[k].flatten(), dim=0)
        assert cos > floor, (k, float(cos))


def test_faster_rcnn_on_eva02_with_tome_from_the_example_config():
    """configs/examples/faster_rcnn_eva02_fpn_tome.yaml, shrunk: Detectron2's Faster R-CNN on
    EVA-02 with ToMe builds from the file alone, runs, and merging costs fewer GMACs."""
    from detectron2.modeling import build_model

    from expedit_d2.flops import gmacs

    def model(method):
        cfg = get_cfg()
        add_expedit_config(cfg)
        cfg.merge_from_file("configs/examples/faster_rcnn_eva02_fpn_tome.yaml")
        assert cfg.MODEL.TIMM_VIT.NAME == EVA02_BASE and cfg.MODEL.TOKEN_REDUCTION.METHOD == "tome"
        k = cfg.MODEL.TIMM_VIT.KWARGS
        k.depth, k.embed_dim, k.num_heads = 4, 32, 2
        cfg.MODEL.TIMM_VIT.TAPS, cfg.MODEL.TOKEN_REDUCTION.TOME.R = [0, 1, 2, 3], 20
        cfg.MODEL.TOKEN_REDUCTION.TOME.START_BLOCK = 1
        cfg.MODEL.TOKEN_REDUCTION.METHOD = method
        cfg.MODEL.FPN.OUT_CHANNELS, cfg.MODEL.DEVICE = 32, "cpu"
        cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
        torch.manual_seed(0)
        return build_model(cfg).eval()

    tome, plain = model("tome"), model("none")
    assert type(tome.backbone.bottom_up).__name__ == "ToMeD2TimmViT"
    image = torch.rand(3, 140, 168) * 255
    with torch.no_grad():
        out = tome([{"image": image, "height": 140, "width": 168}])[0]["instances"]
    assert len(out) > 0 and torch.isfinite(out.pred_boxes.tensor).all()
    cost = {name: gmacs(m, image) for name, m in [("tome", tome), ("none", plain)]}
    assert cost["tome"]["backbone"] < cost["none"]["backbone"]  # (FPN included, the same in both)
    assert cost["tome"]["model"] < cost["none"]["model"]


@pytest.mark.parametrize("method", ["tome", "evit"])
def test_methods_inside_blocks_refuse_blocks_they_cannot_run_in_parts(method, tiny_reduction_cfg, seeded_backbone):
    """ToMe and EViT run a block part by part; a post-norm block would be computed wrongly,
    so it is refused by name."""
    from timm.models.vision_transformer import ResPostBlock

    vit = seeded_backbone(tiny_reduction_cfg("D2TimmViT"))
    vit.vit.blocks[3] = ResPostBlock(32, 2)
    settings = settings_from_config(tiny_reduction_cfg("D2TimmViT", method, **METHOD_KEYS[method]))
    with pytest.raises(ValueError, match=rf"METHOD='{method}': block 3 is a ResPostBlock"):
        apply_patch(vit, settings)


# --------------------------------------------------------------------------------------
# registries: names, examples, statistics
# --------------------------------------------------------------------------------------
def test_the_wrapper_and_its_base_key_have_method_neutral_names_and_the_earlier_ones_stay_aliases(
        tiny_reduction_cfg, seeded_backbone):
    x = torch.randn(1, 3, 96, 128)
    lead = tiny_reduction_cfg("D2ViT", "tome", **METHOD_KEYS["tome"])
    alias = tiny_reduction_cfg("D2ViT", "tome", **METHOD_KEYS["tome"])
    alias.MODEL.BACKBONE.NAME, alias.MODEL.TOKEN_REDUCTION.BASE, alias.MODEL.EXPEDIT.BASE = "ExpeditBackbone", "", "D2ViT"
    a, b = seeded_backbone(lead), seeded_backbone(alias)
    assert type(a).__name__ == type(b).__name__ == "ToMeD2ViT" and a.state_dict().keys() == b.state_dict().keys()
    with torch.no_grad():
        assert all(torch.equal(a(x)[k], b(x)[k]) for k in a(x))
    both = tiny_reduction_cfg("D2ViT", "tome", **METHOD_KEYS["tome"])
    both.MODEL.EXPEDIT.BASE = "D2ViTHybrid"
    with pytest.raises(ValueError, match=r"MODEL.TOKEN_REDUCTION.BASE='D2ViT' and its alias "
                                         r"MODEL.EXPEDIT.BASE='D2ViTHybrid' name different backbones"):
        seeded_backbone(both)


def test_every_method_registers_an_example_for_the_families_it_patches(tiny_reduction_cfg):
    """The examples the tests and the benchmarks use come from the registry; the "vit"
    examples of the 12-block DPT-Hybrid target (40 x 30 tokens, expedit alpha 4 to 16 x 16)
    have about expedit's mean tokens per block."""
    from expedit_d2.reduction import registered_methods
    from expedit_d2.reduction.core import FAMILIES

    depth = {"vit": 12, "swin": 24, "windowed": 12}
    for family in FAMILIES:
        target = ExampleTarget(family, depth[family], (14, 14) if family != "vit" else (30, 40), 4, (9, 9))
        examples = example_settings(target)
        for name, method in registered_methods().items():
            if family in method.patches and name != "evit" and not (name == "tome" and family == "swin"):
                assert name in examples, (name, family)
        for name, keys in examples.items():
            cfg = tiny_reduction_cfg("D2ViT", name, **{k: v for k, v in keys.items() if k != METHOD_KEY})
            assert settings_from_config(cfg).method == name  # valid keys, a setting that is on
    target = ExampleTarget("vit", 12, (30, 40), 4, (16, 16))
    assert target.mean_tokens() == pytest.approx((5 * 1200 + 7 * 256) / 12)
    examples = example_settings(target)
    assert examples["tome"]["MODEL.TOKEN_REDUCTION.TOME.R"] == 92  # 1200 - 6 r = 649
    assert examples["evit"]["MODEL.TOKEN_REDUCTION.EVIT.LOCATIONS"] == [3, 6, 9]
    assert examples["evit"]["MODEL.TOKEN_REDUCTION.EVIT.KEEP_RATE"] == 0.5  # (4 + 3/2 + 3/4 + 2/8) 100 = 650
    assert "evit" not in example_settings(ExampleTarget("windowed", 12, (14, 14), 3, (9, 9)))


def test_reduction_statistics_sum_the_reducers_counts_per_method(tiny_reduction_cfg, seeded_backbone):
    """expedit counts the images it ran unexpedited (token grid smaller than the clusters):
    the generic hook the evaluation writes to its results."""
    from expedit_d2.reduction import reduction_statistics

    keys = {**METHOD_KEYS["expedit"], "MODEL.EXPEDIT.NUM_CLUSTERS": [5, 5]}
    bb = seeded_backbone(tiny_reduction_cfg("D2ViT", "expedit", **keys))
    with torch.no_grad():
        bb(torch.randn(2, 3, 64, 64))  # 4 x 4 tokens < 5 x 5 clusters: skipped
        bb(torch.randn(1, 3, 96, 96))  # 6 x 6: expedited
        bb(torch.randn(3, 3, 64, 80))
    assert reduction_statistics(bb) == {"expedit": {"unexpedited_images": 5}}
    assert reduction_statistics(seeded_backbone(tiny_reduction_cfg("D2ViT", "tome", **METHOD_KEYS["tome"]))) == {}
