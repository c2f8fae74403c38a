"""The windowed family on segment-anything's unmodified ImageEncoderViT: expedit (the official
Expedit-SAM arithmetic) and pool per window against loops written here from the definitions,
evit refused, the patch on and off."""
import copy
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from segment_anything.modeling import ImageEncoderViT
from segment_anything.modeling.image_encoder import window_partition, window_unpartition

from expedit_d2 import ExpeditSettings, apply_patch, remove_patch
from expedit_d2.methods.evit import EViTSettings
from expedit_d2.methods.pool import PoolSettings
from expedit_d2.methods.tome import ToMeSettings
from expedit_d2.reduction import family_of
from tests.dense_reference import dense_clustering, dense_reconstruction
from tests.method_oracles import tome_oracle
from tests.numerics import assert_close_f32

#: float32 rounding of two computations of the same arithmetic, relative to the output's scale
TOLERANCE = 1e-4


def encoder(img_size=224, window=5, global_blocks=(2, 5), depth=6, seed=0):
    """A small encoder of SAM's layout (SAM's own class): 16-pixel patches, rel-pos on."""
    torch.manual_seed(seed)
    enc = ImageEncoderViT(img_size=img_size, patch_size=16, embed_dim=32, depth=depth, num_heads=2, mlp_ratio=4,
                          out_chans=16, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), qkv_bias=True,
                          use_rel_pos=True, rel_pos_zero_init=False, global_attn_indexes=global_blocks,
                          window_size=window)
    with torch.no_grad():  # SAM zero-initialises its position embeddings: give them values
        # large enough that tokens sit as far apart as a trained SAM's do at the official
        # temperature 0.01 (nearly equal soft assignments would make every centre the
        # window's mean, and top-k would choose among ties by rounding)
        enc.pos_embed.normal_(0, 5.0)
        for blk in enc.blocks:
            blk.attn.rel_pos_h.normal_(0, 0.5)
            blk.attn.rel_pos_w.normal_(0, 0.5)
    return enc.eval()


def at_window(blk, s):
    """The official hourglass block after clustering: the same block with window s."""
    if blk.window_size == 0:
        return blk
    other = copy.copy(blk)
    other.window_size = s
    return other


def official_hourglass(enc, images, alpha, s, iters, tau, window, k):
    """Expedit-SAM's HourglassImageEncoderViT.forward written out (one temperature)."""
    ws = max(b.window_size for b in enc.blocks)
    x = enc.patch_embed(images) + enc.pos_embed
    B, H, W, C = x.shape
    for i, blk in enumerate(enc.blocks):
        if i == alpha:
            windows, padded = window_partition(x, ws)
            flat = windows.reshape(-1, ws * ws, C)
            _, before, centres = dense_clustering(flat, (ws, ws), (s, s), iters, tau, window, dtype=torch.float32)
            h, w = padded[0] // ws * s, padded[1] // ws * s
            x = window_unpartition(centres.reshape(-1, s, s, C), s, (h, w), (h, w))
        x = (at_window(blk, s) if i >= alpha else blk)(x)
    if x.shape[1:3] != (H, W):
        windows = window_partition(x, s)[0].reshape(-1, s * s, C)
        full = dense_reconstruction(windows, before, centres, k, tau, dtype=torch.float32)
        x = window_unpartition(full.reshape(-1, ws, ws, C), ws, padded, (H, W))
    return enc.neck(x.permute(0, 3, 1, 2))


def pooled_reference(enc, images, alpha, s):
    """Each window average-pooled to s x s before block alpha, bilinearly unpooled after the
    last block, written out."""
    ws = max(b.window_size for b in enc.blocks)
    x = enc.patch_embed(images) + enc.pos_embed
    B, H, W, C = x.shape
    for i, blk in enumerate(enc.blocks):
        if i == alpha:
            windows, padded = window_partition(x, ws)
            small = F.adaptive_avg_pool2d(windows.permute(0, 3, 1, 2), (s, s)).permute(0, 2, 3, 1)
            h, w = padded[0] // ws * s, padded[1] // ws * s
            x = window_unpartition(small, s, (h, w), (h, w))
        x = (at_window(blk, s) if i >= alpha else blk)(x)
    if x.shape[1:3] != (H, W):
        windows = window_partition(x, s)[0].permute(0, 3, 1, 2)
        full = F.interpolate(windows, size=(ws, ws), mode="bilinear", align_corners=False).permute(0, 2, 3, 1)
        x = window_unpartition(full.contiguous(), ws, padded, (H, W))
    return enc.neck(x.permute(0, 3, 1, 2))


def merge_window(tokens, s):
    """One window's tokens (N, C) merged by ToMe rounds (the oracle, token by token) to s*s,
    laid out by the position each merged token stands for (its B token's): returns the
    (s*s, C) grid tokens and, per original token, its place on that grid."""
    x, size = tokens.double(), torch.ones(tokens.shape[0], dtype=torch.float64)
    groups = [[t] for t in range(tokens.shape[0])]  # original tokens in each current token
    anchors = list(range(tokens.shape[0]))  # the position each current token stands for
    while len(groups) > s * s:
        x, size, _, merged = tome_oracle(x, x, size, len(groups) - s * s, 0)
        groups = [sum((groups[t] for t in g), []) for g in merged]
        anchors = [anchors[g[-1] if len(g) == 1 else g[0]] for g in merged]  # B token first in a merged group
    order = sorted(range(len(groups)), key=lambda g: anchors[g])
    place = [None] * tokens.shape[0]
    for rank, g in enumerate(order):
        for t in groups[g]:
            place[t] = rank
    return x[order].to(tokens.dtype), place


def tome_reference(enc, images, alpha, s):
    """Each window merged to s x s before block alpha (merge_window), unmerged after the
    last block, written out window by window."""
    ws = max(b.window_size for b in enc.blocks)
    x = enc.patch_embed(images) + enc.pos_embed
    B, H, W, C = x.shape
    for i, blk in enumerate(enc.blocks):
        if i == alpha:
            windows, padded = window_partition(x, ws)
            merged = [merge_window(w.reshape(ws * ws, C), s) for w in windows]
            small = torch.stack([m[0] for m in merged]).reshape(-1, s, s, C)
            h, w = padded[0] // ws * s, padded[1] // ws * s
            x = window_unpartition(small, s, (h, w), (h, w))
        x = (at_window(blk, s) if i >= alpha else blk)(x)
    if x.shape[1:3] != (H, W):
        windows = window_partition(x, s)[0].reshape(-1, s * s, C)
        full = torch.stack([windows[n, m[1]] for n, m in enumerate(merged)]).reshape(-1, ws, ws, C)
        x = window_unpartition(full, ws, padded, (H, W))
    return enc.neck(x.permute(0, 3, 1, 2))


def assert_close_scaled(got, want):
    assert_close_f32(got, want, rel=TOLERANCE)


# img 224 -> a 14 x 14 grid padded to 15 x 15 by windows of 5; img 240 -> 15 x 15, unpadded
CASES = [  # (img_size, alpha, s): alpha at a window block, at a global block, at the first block
    (224, 3, 3), (240, 3, 3), (224, 2, 4), (240, 0, 2), (224, 5, 3)]


@pytest.mark.parametrize("img_size, alpha, s", CASES)
def test_expedit_on_sam_encoder_equals_the_official_hourglass_written_out(img_size, alpha, s):
    enc = encoder(img_size)
    images = torch.randn(2, 3, img_size, img_size)
    k = min(5, s * s)
    with torch.no_grad():
        want = official_hourglass(enc, images, alpha, s, iters=5, tau=0.01, window=5, k=k)
        apply_patch(enc, ExpeditSettings(clustering_location=alpha, num_clusters=(s, s), iters=5, temperature=0.01,
                                         window=5, recon_k=k, recon_temperature=0.01))
        got = enc(images)
    assert family_of(enc) == "windowed" and type(enc).__name__ == "ExpeditImageEncoderViT"
    assert got.shape == want.shape == (2, 16, img_size // 16, img_size // 16)
    assert_close_scaled(got, want)


def test_full_size_clusters_on_an_unpadded_grid_skip_reconstruction_as_the_official_encoder():
    """s = window and no padding: the reduced grid has the input's shape, so the official
    encoder passes the later blocks' cluster tokens on without reconstruction."""
    enc = encoder(240)
    images = torch.randn(1, 3, 240, 240)
    with torch.no_grad():
        want = official_hourglass(enc, images, 3, 5, iters=5, tau=0.01, window=5, k=5)
        base = enc(images)
        apply_patch(enc, ExpeditSettings(clustering_location=3, num_clusters=(5, 5), iters=5, temperature=0.01,
                                         window=5, recon_k=5, recon_temperature=0.01))
        got = enc(images)
    assert_close_scaled(got, want)
    assert not torch.allclose(got, base, rtol=1e-3, atol=1e-3 * base.abs().max().item())  # clustered all the same


@pytest.mark.parametrize("img_size, alpha, s", CASES)
def test_pool_on_sam_encoder_equals_pooling_per_window_written_out(img_size, alpha, s):
    enc = encoder(img_size)
    images = torch.randn(2, 3, img_size, img_size)
    with torch.no_grad():
        want = pooled_reference(enc, images, alpha, s)
        apply_patch(enc, PoolSettings(location=alpha, size=(s, s)))
        got = enc(images)
    assert_close_scaled(got, want)


@pytest.mark.parametrize("img_size, alpha, s", CASES)
def test_tome_per_window_equals_merging_written_out(img_size, alpha, s):
    """ToMe on a windowed ViT: every window loses the same r = ws*ws - s*s tokens."""
    enc = encoder(img_size)
    images = torch.randn(2, 3, img_size, img_size)
    with torch.no_grad():
        want = tome_reference(enc, images, alpha, s)
        apply_patch(enc, ToMeSettings(r=25 - s * s, start_block=alpha))
        got = enc(images)
    assert type(enc).__name__ == "ToMeImageEncoderViT"
    assert_close_scaled(got, want)


def test_patch_keeps_names_and_comes_off_bitwise():
    enc = encoder()
    images = torch.randn(1, 3, 224, 224)
    names = list(enc.state_dict())
    with torch.no_grad():
        base = enc(images)
        apply_patch(enc, ExpeditSettings(clustering_location=3, num_clusters=(3, 3), recon_k=5))
        assert list(enc.state_dict()) == names and isinstance(enc, ImageEncoderViT)
        assert not torch.equal(enc(images), base)
        remove_patch(enc)
        assert type(enc) is ImageEncoderViT and not hasattr(enc, "token_reduction")
        assert torch.equal(enc(images), base)


def test_evit_is_refused_with_the_reason():
    with pytest.raises(ValueError, match=r"'evit' does not apply to ImageEncoderViT, a windowed ViT: EViT ranks "
                                         r"tokens by a class token's attention"):
        apply_patch(encoder(), EViTSettings(locations=(2,), keep_rate=0.7))


@pytest.mark.parametrize("settings, message", [
    (ExpeditSettings(clustering_location=6, num_clusters=(3, 3), recon_k=5),
     r"MODEL.EXPEDIT.CLUSTERING_LOCATION=6 is outside this ViT's blocks 0..5"),
    (ExpeditSettings(clustering_location=2, num_clusters=(6, 6), recon_k=5),
     r"MODEL.EXPEDIT.NUM_CLUSTERS=\[6, 6\]: a windowed ViT clusters each 5x5 window into a square s x s grid"),
    (ExpeditSettings(clustering_location=2, num_clusters=(3, 3), recon_k=10),
     r"MODEL.EXPEDIT.RECON_K=10 exceeds the 3x3 clusters of a window"),
    (PoolSettings(location=1, size=(2, 3)), r"MODEL.TOKEN_REDUCTION.POOL.SIZE=\[2, 3\]: a windowed ViT pools"),
    (ToMeSettings(r=10, start_block=1), r"MODEL.TOKEN_REDUCTION.TOME.R=10: a windowed ViT merges R of each window's "
                                        r"5x5 tokens so that a square s x s remains \(R = 25 - s\*s, e.g. 9 for s = 4\)"),
])
def test_bad_settings_name_the_key(settings, message):
    enc = encoder()
    with pytest.raises(ValueError, match=message):
        apply_patch(enc, settings)
    assert type(enc) is ImageEncoderViT  # nothing half-patched
