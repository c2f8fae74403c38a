"""Mask2Former head: official parameter names, deformable attention, forward shapes."""
import pytest
import torch

from detectron2.layers import ShapeSpec

from mask2former.modeling.head import MaskFormerHead
from mask2former.modeling.pixel_decoder import ms_deform_attn
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


def test_tiny_head_forward_shapes_and_masks():
    torch.manual_seed(0)
    shapes = {k: ShapeSpec(channels=c, stride=s) for k, c, s in
              [("res2", 16, 4), ("res3", 24, 8), ("res4", 32, 16), ("res5", 40, 32)]}
    head = MaskFormerHead(shapes, num_classes=5, conv_dim=32, mask_dim=32, enc_layers=2,
                          enc_dim_feedforward=64, hidden_dim=32, num_queries=7, nheads=4,
                          dim_feedforward=64, dec_layers=3).eval()
    feats = {k: torch.randn(2, s.channels, 96 // s.stride, 128 // s.stride) for k, s in shapes.items()}
    with torch.no_grad():
        out = head(feats)
    assert out["pred_logits"].shape == (2, 7, 6)
    assert out["pred_masks"].shape == (2, 7, 24, 32)
    assert len(out["aux_outputs"]) == 3
    assert all(torch.isfinite(v).all() for v in (out["pred_logits"], out["pred_masks"]))
