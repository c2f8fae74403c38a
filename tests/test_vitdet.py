"""ViTDet in Detectron2 0.6 (``ExpeditD2ViTDet``, expedit_d2/backbones/vitdet.py): the model
zoo's parameter names, strict loading of its checkpoint formats, Mask R-CNN from YAML with every
method of the windowed family, expedit and pool against loops written from the definitions, and
a stand-in for a newer Detectron2's own ``ViT`` patched the same way."""
import copy
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone, build_backbone, build_model

from expedit_d2 import ExpeditSettings, add_expedit_config, apply_patch, remove_patch
from expedit_d2.backbones.vitdet import VITDET_NAME, SimpleFeaturePyramid, ViT
from expedit_d2.checkpoint import load_weights
from expedit_d2.expedit_backbone import reduction_target
from expedit_d2.methods.pool import PoolSettings
from expedit_d2.reduction import family_of, point_overrides
from expedit_d2.reduction.config import as_opts
from expedit_d2.reduction.windowed import layout_of
from tests.dense_reference import dense_clustering, dense_reconstruction
from tests.numerics import assert_close_f32
from tests.reference_keys import read_keys

YAML = Path(__file__).resolve().parents[1] / "configs" / "examples" / "mask_rcnn_vitdet_b_expedit.yaml"
#: float32 rounding of two computations of the same arithmetic, relative to the output's scale
TOLERANCE = 1e-5


def assert_close_scaled(got, want, tolerance=TOLERANCE):
    assert_close_f32(got, want, rel=tolerance)


# --------------------------------------------------------------------------------------
# small models
# --------------------------------------------------------------------------------------
SMALL = dict(img_size=160, patch_size=16, embed_dim=32, depth=6, num_heads=2, mlp_ratio=4.0, use_rel_pos=True,
             window_size=5, window_block_indexes=(0, 1, 3, 4), pretrain_img_size=96)


def randomise(vit, seed=1):
    """Position embeddings far enough apart that tokens sit as a trained model's do at the
    temperature used (the model zoo's are not zero; the constructors zero-initialise rel pos)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        vit.pos_embed.copy_(torch.randn(vit.pos_embed.shape, generator=g) * 3.0)
        for blk in vit.blocks:
            blk.attn.rel_pos_h.copy_(torch.randn(blk.attn.rel_pos_h.shape, generator=g) * 0.5)
            blk.attn.rel_pos_w.copy_(torch.randn(blk.attn.rel_pos_w.shape, generator=g) * 0.5)
            if blk.use_residual_block:  # its last norm is zero-initialised
                nn.init.normal_(blk.residual.norm3.weight, generator=g)
    return vit.eval()


def small_vit(seed=0, **overrides):
    torch.manual_seed(seed)
    return randomise(ViT(**{**SMALL, **overrides}), seed + 1)


def small_cfg(method="none"):
    cfg = get_cfg()
    add_expedit_config(cfg)
    cfg.merge_from_file(str(YAML))
    cfg.MODEL.DEVICE = "cpu"
    v = cfg.MODEL.VITDET
    v.IMG_SIZE, v.EMBED_DIM, v.DEPTH, v.NUM_HEADS, v.WINDOW_SIZE = 160, 32, 6, 2, 5
    v.WINDOW_BLOCK_INDEXES, v.PRETRAIN_IMG_SIZE, v.OUT_CHANNELS, v.SQUARE_PAD = [0, 1, 3, 4], 96, 16, 192
    e = cfg.MODEL.EXPEDIT
    e.CLUSTERING_LOCATION, e.NUM_CLUSTERS, e.RECON_K = 2, [3, 3], 5
    cfg.MODEL.TOKEN_REDUCTION.METHOD = method
    cfg.MODEL.TOKEN_REDUCTION.POOL.LOCATION, cfg.MODEL.TOKEN_REDUCTION.POOL.SIZE = 2, [3, 3]
    cfg.MODEL.TOKEN_REDUCTION.TOME.START_BLOCK, cfg.MODEL.TOKEN_REDUCTION.TOME.R = 2, 25 - 9  # 5x5 -> 3x3
    cfg.MODEL.TOKEN_REDUCTION.EVIT.LOCATIONS = [2]
    # small heads: the CPU runs a whole Mask R-CNN
    cfg.MODEL.RPN.PRE_NMS_TOPK_TEST, cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 200, 50
    cfg.MODEL.ROI_BOX_HEAD.CONV_DIM, cfg.MODEL.ROI_BOX_HEAD.FC_DIM, cfg.MODEL.ROI_MASK_HEAD.CONV_DIM = 16, 32, 16
    return cfg


def small_model(method="none", seed=0):
    torch.manual_seed(seed)
    model = build_model(small_cfg(method)).eval()
    randomise(model.backbone.net, seed + 1)
    return model


# --------------------------------------------------------------------------------------
# the model zoo's names, and its checkpoint formats
# --------------------------------------------------------------------------------------
def vitdet_keys_from_the_source(dim=768, depth=12, heads=12, window=14, window_blocks=(0, 1, 3, 4, 6, 7, 9, 10),
                                img=1024, patch=16, pretrain=224, out=256):
    """``backbone.*`` names and shapes of the model zoo's ViTDet Mask R-CNN, enumerated from
    Detectron2's ``ViT`` / ``SimpleFeaturePyramid`` source (its ``mask_rcnn_vitdet`` config):
    ``simfp_<log2 stride>`` per scale (4: deconv 0, LN 1, GELU, deconv 3; 2: deconv 0;
    0.5: max-pool 0), each ending in a 1x1 and a 3x3 ``Conv2d`` with LN ``.norm``, no bias."""
    keys = {}

    def add(name, *shape):
        keys["backbone." + name] = tuple(shape)

    def convs(stage, first, cin):
        add(f"simfp_{stage}.{first}.weight", out, cin, 1, 1)
        add(f"simfp_{stage}.{first + 1}.weight", out, out, 3, 3)
        for i in (first, first + 1):
            add(f"simfp_{stage}.{i}.norm.weight", out)
            add(f"simfp_{stage}.{i}.norm.bias", out)

    add("simfp_2.0.weight", dim, dim // 2, 2, 2), add("simfp_2.0.bias", dim // 2)
    add("simfp_2.1.weight", dim // 2), add("simfp_2.1.bias", dim // 2)
    add("simfp_2.3.weight", dim // 2, dim // 4, 2, 2), add("simfp_2.3.bias", dim // 4)
    convs(2, 4, dim // 4)
    add("simfp_3.0.weight", dim, dim // 2, 2, 2), add("simfp_3.0.bias", dim // 2)
    convs(3, 1, dim // 2)
    convs(4, 0, dim)
    convs(5, 1, dim)
    add("net.pos_embed", 1, (pretrain // patch) ** 2 + 1, dim)
    add("net.patch_embed.proj.weight", dim, 3, patch, patch), add("net.patch_embed.proj.bias", dim)
    for i in range(depth):
        b = f"net.blocks.{i}."
        size = window if i in window_blocks else img // patch
        for norm in ("norm1", "norm2"):
            add(b + norm + ".weight", dim), add(b + norm + ".bias", dim)
        add(b + "attn.rel_pos_h", 2 * size - 1, dim // heads), add(b + "attn.rel_pos_w", 2 * size - 1, dim // heads)
        add(b + "attn.qkv.weight", 3 * dim, dim), add(b + "attn.qkv.bias", 3 * dim)
        add(b + "attn.proj.weight", dim, dim), add(b + "attn.proj.bias", dim)
        add(b + "mlp.fc1.weight", 4 * dim, dim), add(b + "mlp.fc1.bias", 4 * dim)
        add(b + "mlp.fc2.weight", dim, 4 * dim), add(b + "mlp.fc2.bias", dim)
    return keys


def test_the_reference_key_list_is_the_one_the_detectron2_source_gives():
    """tests/data/reference/vitdet_b_mask_rcnn.keys.tsv (no checkpoint was at hand to copy it
    from) is the enumeration above, and a dozen names read off the source are in it."""
    keys = read_keys("vitdet_b_mask_rcnn")
    assert keys == vitdet_keys_from_the_source()
    assert len(keys) == 203
    read_off_the_source = {
        "backbone.net.patch_embed.proj.weight": (768, 3, 16, 16), "backbone.net.pos_embed": (1, 197, 768),
        "backbone.net.blocks.0.attn.rel_pos_h": (27, 64), "backbone.net.blocks.2.attn.rel_pos_w": (127, 64),
        "backbone.net.blocks.11.attn.rel_pos_h": (127, 64), "backbone.net.blocks.10.mlp.fc2.weight": (768, 3072),
        "backbone.simfp_2.0.weight": (768, 384, 2, 2), "backbone.simfp_2.1.weight": (384,),
        "backbone.simfp_2.3.bias": (192,), "backbone.simfp_2.5.norm.bias": (256,),
        "backbone.simfp_4.0.weight": (256, 768, 1, 1), "backbone.simfp_5.1.weight": (256, 768, 1, 1),
        "backbone.simfp_5.2.norm.weight": (256,)}
    assert {k: keys.get(k) for k in read_off_the_source} == read_off_the_source
    # no parameter in the max-pool (simfp_5.0) nor a bias in the normalised convs
    assert "backbone.simfp_5.0.weight" not in keys and "backbone.simfp_4.0.bias" not in keys


@pytest.mark.parametrize("name, method", [(VITDET_NAME, "none"), ("ExpeditBackbone", "expedit"),
                                          ("ExpeditBackbone", "pool")])
def test_vitdet_b_state_dict_equals_the_model_zoo_keys(name, method):
    cfg = get_cfg()
    add_expedit_config(cfg)
    cfg.MODEL.BACKBONE.NAME, cfg.MODEL.EXPEDIT.BASE, cfg.MODEL.TOKEN_REDUCTION.METHOD = name, VITDET_NAME, method
    cfg.MODEL.EXPEDIT.CLUSTERING_LOCATION, cfg.MODEL.EXPEDIT.NUM_CLUSTERS = 6, [10, 10]
    cfg.MODEL.TOKEN_REDUCTION.POOL.LOCATION = 6
    with torch.device("meta"):
        backbone = build_backbone(cfg)
    assert isinstance(backbone, SimpleFeaturePyramid) and isinstance(backbone.net, ViT)
    assert (type(backbone.net) is ViT) == (method == "none")
    state = {f"backbone.{k}": tuple(v.shape) for k, v in backbone.state_dict().items()}
    assert state == read_keys("vitdet_b_mask_rcnn")
    assert list(backbone.output_shape()) == ["p2", "p3", "p4", "p5", "p6"]
    assert [s.stride for s in backbone.output_shape().values()] == [4, 8, 16, 32, 64]
    assert backbone.size_divisibility == 1024  # 0.6's GeneralizedRCNN pads to the square


def test_model_zoo_format_pkl_loads_strictly_into_the_plain_and_the_expedited_backbone(tmp_path):
    """A Detectron2 model-zoo .pkl ({"model": {name: numpy array}, "__author__": ...}) of the
    backbone: no missing, unexpected or mis-shaped key, every tensor as in the file."""
    src = small_model("none", seed=3)
    weights = {f"backbone.{k}": v.numpy() for k, v in src.backbone.state_dict().items()}
    path = tmp_path / "model_final.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": weights, "__author__": "Detectron2 Model Zoo"}, f)
    for method in ("none", "expedit", "pool"):
        holder = nn.Module()
        holder.backbone = small_model(method, seed=5).backbone
        checkpointer = DetectionCheckpointer(holder)
        incompatible = checkpointer._load_model(checkpointer._load_file(str(path)))
        assert not incompatible.missing_keys and not incompatible.unexpected_keys
        assert not getattr(incompatible, "incorrect_shapes", [])
        load_weights(checkpointer, str(path))  # the strict loader of --eval-only
        for k, v in holder.backbone.state_dict().items():
            assert np.array_equal(v.numpy(), weights[f"backbone.{k}"]), k


def test_whole_mask_rcnn_pth_saved_by_detectron2_loads_strictly_across_methods(tmp_path):
    src = small_model("none", seed=3)
    DetectionCheckpointer(src, save_dir=str(tmp_path)).save("model_final")
    for method in ("expedit", "pool"):
        model = small_model(method, seed=7)
        load_weights(DetectionCheckpointer(model), str(tmp_path / "model_final.pth"))
        want = src.state_dict()
        assert all(torch.equal(v, want[k]) for k, v in model.state_dict().items())


# --------------------------------------------------------------------------------------
# Mask R-CNN from YAML, every method of the family
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("method, patched", [("none", "ViT"), ("expedit", "ExpeditViT"), ("pool", "PoolViT"),
                                             ("tome", "ToMeViT")])
def test_mask_rcnn_from_yaml_runs_with_every_method_of_the_family(method, patched):
    model = small_model(method)
    assert type(model.backbone).__name__ == "SimpleFeaturePyramid" and type(model.backbone.net).__name__ == patched
    assert type(model.roi_heads).__name__ == "StandardROIHeads" and model.roi_heads.mask_on
    image = torch.rand(3, 150, 181) * 255
    with torch.no_grad():
        assert model.preprocess_image([{"image": image}]).tensor.shape[-2:] == (192, 192)  # the square
        out = model([{"image": image, "height": 150, "width": 181}])[0]["instances"]
    assert out.image_size == (150, 181) and out.has("pred_masks")
    if method != "none":  # reduced before block 2 and restored after the last one
        assert model.backbone.net.token_reduction.location == 2 and model.backbone.net.token_reduction.side == 3


def test_evit_is_refused_with_its_reason():
    with pytest.raises(ValueError, match=r"'evit' does not apply to ViT, a windowed ViT: EViT ranks tokens by a "
                                         r"class token's attention"):
        cfg = small_cfg("evit")
        cfg.MODEL.TOKEN_REDUCTION.EVIT.KEEP_RATE = 0.5  # a setting that is on (1.0 keeps every token: off)
        build_model(cfg)


def test_reduction_keys_give_the_pyramid_over_a_patched_vit_and_square_pad_zero_pads_to_32():
    cfg = small_cfg("none")
    cfg.MODEL.VITDET.SQUARE_PAD = 0
    backbone = BACKBONE_REGISTRY.get(VITDET_NAME)(cfg, ShapeSpec(channels=3))
    assert backbone.size_divisibility == 32
    assert backbone.padding_constraints == {"size_divisibility": 32, "square_size": 0}
    assert reduction_target(backbone) is backbone.net and family_of(backbone.net) == "windowed"
    assert layout_of(backbone.net) == "vitdet"


def test_a_sweep_point_on_the_plain_entry_wraps_it_and_patches_its_vit():
    """point_overrides (sweeps, benchmarks) turns MODEL.BACKBONE.NAME: ExpeditD2ViTDet into
    TokenReductionBackbone over it; the pyramid stays, its ViT is patched."""
    cfg = small_cfg("none")
    cfg.MODEL.BACKBONE.NAME = VITDET_NAME
    out = point_overrides(cfg, {"MODEL.TOKEN_REDUCTION.METHOD": "pool", "MODEL.TOKEN_REDUCTION.POOL.SIZE": [2, 2]})
    assert out["MODEL.BACKBONE.NAME"] == "TokenReductionBackbone" and out["MODEL.TOKEN_REDUCTION.BASE"] == VITDET_NAME
    cfg.merge_from_list(as_opts(out))
    backbone = build_backbone(cfg)
    assert type(backbone) is SimpleFeaturePyramid and type(backbone.net).__name__ == "PoolViT"
    assert backbone.net.token_reduction.side == 2


# --------------------------------------------------------------------------------------
# the arithmetic, written out from the definitions
# --------------------------------------------------------------------------------------
def partition(x, ws):
    """(B, H, W, C) zero-padded to multiples of ws -> (B*nW, ws, ws, C), (Hp, Wp)."""
    B, H, W, C = x.shape
    Hp, Wp = math.ceil(H / ws) * ws, math.ceil(W / ws) * ws
    x = F.pad(x, (0, 0, 0, Wp - W, 0, Hp - H))
    x = x.view(B, Hp // ws, ws, Wp // ws, ws, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, ws, ws, C), (Hp, Wp)


def unpartition(windows, ws, padded, size):
    Hp, Wp = padded
    B = windows.shape[0] // (Hp // ws * Wp // ws)
    x = windows.reshape(B, Hp // ws, Wp // ws, ws, ws, -1).permute(0, 1, 3, 2, 4, 5).reshape(B, Hp, Wp, -1)
    return x[:, :size[0], :size[1]]


def abs_pos(pos_embed, cls, h, w):
    """The pretraining grid (cls row dropped) resized bicubically to h x w, (1, h, w, C)."""
    grid = pos_embed[:, 1:] if cls else pos_embed
    g = int(round(grid.shape[1] ** 0.5))
    grid = grid.reshape(1, g, g, -1).permute(0, 3, 1, 2)
    if (g, g) != (h, w):
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1)


def at_window(blk, s):
    """The block after reduction: its own forward with window s (global blocks as they are)."""
    if blk.window_size == 0:
        return blk
    other = copy.copy(blk)
    other.window_size = s
    return other


def reduced_vit_written_out(vit, images, alpha, s, reduce, restore):
    """Embed, blocks before alpha; every padded ws x ws window reduced to s x s and stitched;
    later window blocks at window s, global blocks on the stitched grid; every window restored
    and the padding cropped unless the reduced grid has the input's shape."""
    ws = max(b.window_size for b in vit.blocks)
    x = vit.patch_embed.proj(images).permute(0, 2, 3, 1)
    B, H, W, C = x.shape
    x = x + abs_pos(vit.pos_embed, vit.pretrain_use_cls_token, H, W)
    for i, blk in enumerate(vit.blocks):
        if i == alpha:
            windows, padded = partition(x, ws)
            small, state = reduce(windows.reshape(-1, ws * ws, C), ws)
            h, w = padded[0] // ws * s, padded[1] // ws * s
            x = unpartition(small.reshape(-1, s, s, C), s, (h, w), (h, w))
        x = (at_window(blk, s) if i >= alpha else blk)(x)
    if x.shape[1:3] != (H, W):
        full = restore(partition(x, s)[0].reshape(-1, s * s, C), state)
        x = unpartition(full.reshape(-1, ws, ws, C), ws, padded, (H, W))
    return {"last_feat": x.permute(0, 3, 1, 2)}


def official_hourglass(vit, images, alpha, s, iters, tau, window, k):
    """Expedit-SAM's hourglass encoder on ViTDet's ViT: dense clustering of every window to
    s x s (one temperature), top-k reconstruction of every window."""
    def reduce(flat, ws):
        _, before, centres = dense_clustering(flat, (ws, ws), (s, s), iters, tau, window, dtype=flat.dtype)
        return centres, (before, centres)

    def restore(flat, state):
        return dense_reconstruction(flat, *state, k, tau, dtype=flat.dtype)

    return reduced_vit_written_out(vit, images, alpha, s, reduce, restore)


def pooled_written_out(vit, images, alpha, s):
    def reduce(flat, ws):
        grid = flat.transpose(1, 2).reshape(flat.shape[0], -1, ws, ws)
        return F.adaptive_avg_pool2d(grid, (s, s)).flatten(2).transpose(1, 2), ws

    def restore(flat, ws):
        grid = flat.transpose(1, 2).reshape(flat.shape[0], -1, s, s)
        return F.interpolate(grid, size=(ws, ws), mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)

    return reduced_vit_written_out(vit, images, alpha, s, reduce, restore)


# img 192 -> a 12 x 12 grid padded to 15 x 15 by windows of 5; img 240 -> 15 x 15, unpadded
CASES = [  # (img_size, alpha, s): alpha at a window block, at a global block, at the first block
    (192, 3, 3), (240, 3, 3), (192, 2, 4), (240, 0, 2), (192, 5, 3)]


@pytest.mark.parametrize("img_size, alpha, s", CASES)
def test_expedit_on_vitdet_equals_the_official_hourglass_written_out(img_size, alpha, s):
    """k = every cluster of a window. In zero-padded windows, centres that are equal in exact
    arithmetic (cells that only padding reaches alike) come out equal or a last bit apart
    depending on the order of the sums, and the top-k rule keeps every weight tied with the
    k-th: with k below s*s, which CPU rounded how decided whether a cluster was kept, and both
    implementations moved by up to 0.17 of the output's scale between float32 and float64.
    The top-k choice itself is checked in tests/test_ops.py and, on SAM, tests/test_windowed.py."""
    vit = small_vit(residual_block_indexes=(1, 4))  # ViTDet's conv propagation runs on the reduced grid too
    images = torch.randn(2, 3, img_size, img_size)
    k = s * s
    with torch.no_grad():
        base = vit(images)["last_feat"]
        want = official_hourglass(vit, images, alpha, s, iters=5, tau=0.01, window=5, k=k)
        apply_patch(vit, ExpeditSettings(clustering_location=alpha, num_clusters=(s, s), iters=5, temperature=0.01,
                                         window=5, recon_k=k, recon_temperature=0.01))
        got = vit(images)
    assert type(vit).__name__ == "ExpeditViT"
    assert got["last_feat"].shape == want["last_feat"].shape == (2, 32, img_size // 16, img_size // 16)
    # either implementation is up to 1.2e-5 of the scale from its float64 self (alpha 2, 4x4)
    assert_close_scaled(got["last_feat"], want["last_feat"], tolerance=1e-4)
    assert not torch.allclose(got["last_feat"], base, rtol=1e-3, atol=1e-3 * base.abs().max().item())


@pytest.mark.parametrize("img_size, alpha, s", CASES)
def test_pool_on_vitdet_equals_pooling_per_window_written_out(img_size, alpha, s):
    vit = small_vit()
    images = torch.randn(2, 3, img_size, img_size)
    with torch.no_grad():
        want = pooled_written_out(vit, images, alpha, s)
        apply_patch(vit, PoolSettings(location=alpha, size=(s, s)))
        got = vit(images)
    assert_close_scaled(got["last_feat"], want["last_feat"])


def test_patch_keeps_names_and_comes_off_bitwise():
    vit = small_vit()
    images = torch.randn(1, 3, 192, 224)
    names = list(vit.state_dict())
    with torch.no_grad():
        base = vit(images)["last_feat"]
        apply_patch(vit, ExpeditSettings(clustering_location=3, num_clusters=(3, 3), recon_k=5))
        assert list(vit.state_dict()) == names
        assert not torch.equal(vit(images)["last_feat"], base)
        remove_patch(vit)
        assert type(vit) is ViT and not hasattr(vit, "token_reduction")
        assert torch.equal(vit(images)["last_feat"], base)


# --------------------------------------------------------------------------------------
# a newer Detectron2's own ViT: a stand-in written here from its definition
# --------------------------------------------------------------------------------------
class StandInAttention(nn.Module):
    """detectron2.modeling.backbone.vit.Attention: decomposed relative positions (MViTv2)."""

    def __init__(self, dim, num_heads, rel_size):
        super().__init__()
        self.num_heads, self.scale = num_heads, (dim // num_heads) ** -0.5
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * rel_size - 1, dim // num_heads))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * rel_size - 1, dim // num_heads))

    @staticmethod
    def rel(size, table):
        if table.shape[0] != 2 * size - 1:
            table = F.interpolate(table.T[None], size=2 * size - 1, mode="linear")[0].T
        idx = torch.arange(size)[:, None] - torch.arange(size)[None, :] + size - 1
        return table[idx]  # (size, size, D)

    def forward(self, x):
        B, H, W, C = x.shape
        qkv = self.qkv(x).reshape(B, H * W, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, B * self.num_heads, H * W, -1).unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        r_q = q.reshape(-1, H, W, q.shape[-1])
        rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, self.rel(H, self.rel_pos_h))
        rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, self.rel(W, self.rel_pos_w))
        attn = (attn.view(-1, H, W, H, W) + rel_h[..., None] + rel_w[:, :, :, None, :]).view(-1, H * W, H * W)
        x = (attn.softmax(-1) @ v).view(B, self.num_heads, H, W, -1).permute(0, 2, 3, 1, 4).reshape(B, H, W, C)
        return self.proj(x)


class StandInMlp(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class StandInBlock(nn.Module):
    def __init__(self, dim, num_heads, window_size, grid):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn = StandInAttention(dim, num_heads, window_size or grid)
        self.drop_path, self.mlp = nn.Identity(), StandInMlp(dim)
        self.window_size, self.use_residual_block = window_size, False

    def forward(self, x):
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            H, W = x.shape[1:3]
            x, padded = partition(x, self.window_size)
        x = self.attn(x)
        if self.window_size > 0:
            x = unpartition(x, self.window_size, padded, (H, W))
        x = shortcut + self.drop_path(x)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class StandInPatchEmbed(nn.Module):
    def __init__(self, dim, patch):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, stride=patch)

    def forward(self, x):
        return self.proj(x).permute(0, 2, 3, 1)


class StandInViT(Backbone):
    """detectron2.modeling.ViT as its definition reads (no residual blocks, no drop path)."""

    def __init__(self, img_size, patch_size, embed_dim, depth, num_heads, window_size, window_block_indexes,
                 pretrain_img_size, **_):
        super().__init__()
        self.pretrain_use_cls_token = True
        self.patch_embed = StandInPatchEmbed(embed_dim, patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, (pretrain_img_size // patch_size) ** 2 + 1, embed_dim))
        self.blocks = nn.ModuleList(
            StandInBlock(embed_dim, num_heads, window_size if i in window_block_indexes else 0, img_size // patch_size)
            for i in range(depth))
        self._out_feature_channels, self._out_feature_strides = {"last_feat": embed_dim}, {"last_feat": patch_size}
        self._out_features = ["last_feat"]

    def forward(self, x):
        x = self.patch_embed(x)
        x = x + abs_pos(self.pos_embed, self.pretrain_use_cls_token, *x.shape[1:3])
        for blk in self.blocks:
            x = blk(x)
        return {self._out_features[0]: x.permute(0, 3, 1, 2)}


@pytest.mark.parametrize("settings", [
    ExpeditSettings(clustering_location=3, num_clusters=(3, 3), iters=5, temperature=0.01, window=5, recon_k=5,
                    recon_temperature=0.01),
    ExpeditSettings(clustering_location=2, num_clusters=(4, 4), recon_k=10),
    PoolSettings(location=2, size=(3, 3))], ids=["expedit-tau0.01", "expedit-defaults", "pool"])
def test_a_newer_detectron2_vit_is_patched_as_ours(settings):
    ours = small_vit()
    theirs = StandInViT(**SMALL).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    images = torch.randn(2, 3, 192, 224)
    with torch.no_grad():
        base = theirs(images)["last_feat"]
        assert_close_scaled(base, ours(images)["last_feat"])
        apply_patch(ours, settings)
        apply_patch(theirs, settings)
        assert family_of(theirs) == "windowed" and layout_of(theirs) == "vitdet"
        assert type(theirs).__name__ == type(settings).__name__.replace("Settings", "") + "StandInViT"
        want, got = ours(images)["last_feat"], theirs(images)["last_feat"]
        assert_close_scaled(got, want)
        assert not torch.allclose(got, base, rtol=1e-3, atol=1e-3 * base.abs().max().item())
        # inside their SimpleFeaturePyramid, ExpeditBackbone patches the same ViT
        holder = nn.Module()
        holder.net = theirs
        assert reduction_target(holder) is theirs
        remove_patch(theirs)
        assert type(theirs) is StandInViT and not hasattr(theirs, "token_reduction")
        assert torch.equal(theirs(images)["last_feat"], base)
