"""Mask2Former meta-architecture: official key list, inference modes, a training step."""
import pytest
import torch
import torch.nn.functional as F

from detectron2.config import get_cfg
from detectron2.structures import Instances

from mask2former import MaskFormer, add_maskformer2_config
from tests.numerics import assert_close_f32
from tests.reference_keys import read_keys


def swin_l_cfg(num_classes, backbone="D2SwinTransformer"):
    cfg = get_cfg()
    add_maskformer2_config(cfg)
    cfg.MODEL.META_ARCHITECTURE = "MaskFormer"
    cfg.MODEL.BACKBONE.NAME = backbone
    s = cfg.MODEL.SWIN
    s.EMBED_DIM, s.DEPTHS, s.NUM_HEADS, s.WINDOW_SIZE, s.PRETRAIN_IMG_SIZE = 192, [2, 2, 18, 2], [6, 12, 24, 48], 12, 384
    h = cfg.MODEL.SEM_SEG_HEAD
    h.NAME, h.IN_FEATURES, h.NUM_CLASSES, h.TRANSFORMER_ENC_LAYERS = "MaskFormerHead", ["res2", "res3", "res4", "res5"], num_classes, 6
    h.CONVS_DIM, h.MASK_DIM, h.NORM = 256, 256, "GN"  # as the official Base configs
    m = cfg.MODEL.MASK_FORMER
    m.NUM_OBJECT_QUERIES, m.DEC_LAYERS, m.DROPOUT = 200, 10, 0.0
    m.CLASS_WEIGHT, m.MASK_WEIGHT, m.DICE_WEIGHT = 2.0, 5.0, 5.0
    return cfg


@pytest.mark.parametrize("task, classes", [("coco_panoptic", 133), ("coco_instance", 80), ("ade20k_panoptic", 150)])
@pytest.mark.parametrize("backbone", ["D2SwinTransformer", "D2HourglassSwinTransformer"])
def test_full_model_keys_equal_official(task, classes, backbone):
    cfg = swin_l_cfg(classes, backbone)
    with torch.device("meta"):
        model = MaskFormer(**MaskFormer.from_config(cfg))
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == read_keys(f"mask2former_swinL_{task}")


def test_inference_outputs_all_three_tasks(tiny_m2f_cfg):
    torch.manual_seed(0)
    model = MaskFormer(**MaskFormer.from_config(tiny_m2f_cfg())).eval()
    with torch.no_grad():
        (out,) = model([{"image": torch.rand(3, 90, 120) * 255, "height": 45, "width": 60}])
    assert out["sem_seg"].shape == (4, 45, 60)
    pan, segments = out["panoptic_seg"]
    assert pan.shape == (45, 60)
    assert sorted(int(i) for i in pan.unique() if i != 0) == [s["id"] for s in segments]
    for s in segments:
        assert s["isthing"] == (s["category_id"] in (0, 1))
    inst = out["instances"]
    assert inst.image_size == (45, 60) and len(inst) <= 5
    assert all(c in (0, 1) for c in inst.pred_classes.tolist())  # things only when panoptic is on


def test_non_finite_input_is_rejected_naming_the_image(tiny_m2f_cfg):
    model = MaskFormer(**MaskFormer.from_config(tiny_m2f_cfg())).eval()
    image = torch.rand(3, 90, 120) * 255
    image[0, 3, 4] = float("nan")
    image[2, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"input image '000000000139.jpg' \(batch index 0\) has 2 non-finite"):
        model([{"image": image, "file_name": "000000000139.jpg"}])
    with pytest.raises(ValueError, match=r"input image 'image_id 7' \(batch index 0\) has 2 non-finite"):
        model([{"image": image, "image_id": 7}])


def test_training_step_gives_finite_losses(tiny_m2f_cfg):
    torch.manual_seed(0)
    model = MaskFormer(**MaskFormer.from_config(tiny_m2f_cfg())).train()
    inst = Instances((64, 96))
    inst.gt_classes = torch.tensor([0, 3])
    masks = torch.zeros(2, 64, 96, dtype=torch.bool)
    masks[0, 10:30, 10:40] = True
    masks[1, 35:, :] = True
    inst.gt_masks = masks
    losses = model([{"image": torch.rand(3, 64, 96) * 255, "instances": inst}])
    assert {"loss_ce", "loss_mask", "loss_dice", "loss_ce_1"} <= set(losses)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# ----------------------------------------------------------------------------------
# post-processing against the official per-query rules (mask2former.official_order)
# ----------------------------------------------------------------------------------
def _official_outputs(model, mask_cls, mask_pred):
    """The three tasks of one image, each by its official rule on whole tensors."""
    from mask2former import official_order

    rules = model.rules(True, True, True)
    assert rules.things == {0, 1}
    return (official_order.semantic(mask_cls, mask_pred), official_order.panoptic(mask_cls, mask_pred, rules),
            official_order.instances(mask_cls, mask_pred, rules))


def _assert_same(got, sem, pan, inst):
    from detectron2.structures import BitMasks

    torch.testing.assert_close(got["sem_seg"], sem)
    assert torch.equal(got["panoptic_seg"][0], pan[0]) and got["panoptic_seg"][1] == pan[1]
    i = got["instances"]
    assert torch.equal(i.pred_masks, inst.pred_masks) and torch.equal(i.pred_classes, inst.pred_classes)
    assert_close_f32(i.scores, inst.scores)  # sums over pixels, in row blocks or whole
    # boxes: the binary masks' bounding boxes (the official code outputs zeros)
    assert not inst.pred_boxes.tensor.any()
    assert torch.equal(i.pred_boxes.tensor, BitMasks(inst.pred_masks > 0).get_bounding_boxes().tensor)


def _random_outputs(seed, Q=12, K=4, H=37, W=53):
    torch.manual_seed(seed)
    mask_cls = torch.randn(Q, K + 1) * 2
    mask_cls[:, 2] += 2.0  # several queries of stuff class 2: merged segments
    mask_pred = torch.randn(Q, H, W) * 4
    mask_pred[3] = -200.0  # a mask whose sigmoid underflows to 0 everywhere
    mask_pred[5, :, :20] = -50.0  # a mask whose box does not start at the image's corner
    # two queries of one confident class whose masks saturate (probability exactly 1) over
    # the same pixels: the panoptic owner there is a tie, which goes to the first
    mask_cls[6] = 0.0
    mask_cls[6, 0] = 12.0
    mask_cls[7] = mask_cls[6]
    mask_pred[6:8, :, :10] = 60.0
    return mask_cls, mask_pred


@pytest.mark.parametrize("seed, overlap", [(0, 0.8), (1, 0.0), (2, 0.5)])
@pytest.mark.parametrize("block_rows, semantic_columns", [(None, None), (1, 7), (5, None), (5, 7), (36, 100)])
def test_row_block_post_processing_equals_the_official_per_query_rules(seed, overlap, block_rows, semantic_columns,
                                                                        monkeypatch, tiny_m2f_cfg):
    """All three tasks in one pass over row blocks of any height (and the semantic product
    in slices of any width) = each official rule on the whole tensors (panoptic and binary
    masks exact, sums to rounding)."""
    from mask2former import inference
    from mask2former.inference import full_rows, infer

    if semantic_columns:
        monkeypatch.setattr(inference, "SEMANTIC_COLUMNS", semantic_columns)
    model = MaskFormer(**MaskFormer.from_config(tiny_m2f_cfg())).eval()
    model.object_mask_threshold, model.overlap_threshold, model.test_topk_per_image = 0.3, overlap, 9
    mask_cls, mask_pred = _random_outputs(seed)
    kept = F.softmax(mask_cls, -1).max(-1)
    kept = kept.values[kept.indices.ne(4) & (kept.values > 0.3)]
    assert (kept == kept.max()).sum() >= 2  # the tie between queries 6 and 7 is in play
    for panoptic_on in (True, False):  # instances: things only while panoptic is on
        model.panoptic_on = panoptic_on
        got = infer(mask_cls, full_rows(mask_pred), (37, 53), model.rules(True, True, True), mask_pred, block_rows)
        sem, pan, inst = _official_outputs(model, mask_cls, mask_pred)
        _assert_same(got, sem, pan, inst)
        if overlap == 0.0:  # the data exercise stuff segments
            assert any(not s["isthing"] for s in pan[1])
    # one task at a time, as the public methods give them
    model.panoptic_on = True
    sem, pan, inst = _official_outputs(model, mask_cls, mask_pred)
    assert torch.equal(model.panoptic_inference(mask_cls, mask_pred)[0], pan[0])
    assert torch.equal(model.instance_inference(mask_cls, mask_pred).pred_masks, inst.pred_masks)
    torch.testing.assert_close(model.semantic_inference(mask_cls, mask_pred), sem)


@pytest.mark.parametrize("h, w, factor, width, step", [(10, 12, 4, 45, 3), (9, 7, 4, 28, 1), (5, 6, 2, 11, 4),
                                                       (6, 5, 8, 40, 13), (4, 4, 1, 3, 2), (1, 3, 4, 12, 2),
                                                       (40, 40, 4, 160, 32), (16, 16, 16, 250, 24)])
def test_upsampled_row_blocks_equal_the_full_upsampling_bitwise(h, w, factor, width, step):
    """Blocks of any height, first and last rows included, equal F.interpolate's whole tensor."""
    from mask2former.inference import upsampled_rows

    x = torch.randn(3, h, w) * 5
    full = F.interpolate(x[None], size=(h * factor, w * factor), mode="bilinear", align_corners=False)[0]
    rows = upsampled_rows(x, factor, width)
    H = h * factor - 1  # the crop leaves the last row out
    got = torch.cat([rows(r0, min(r0 + step, H)) for r0 in range(0, H, step)], dim=1)
    assert got.shape == (3, H, width) and torch.equal(got, full[:, :H, :width])
    assert torch.equal(rows(0, h * factor), full[:, :, :width])  # one block: the first and last rows at once


@pytest.mark.parametrize("factor", [1, 2, 4, 8])
def test_upsampled_row_blocks_bitwise_for_every_block_and_crop(factor):
    """Every block (r0, r1) of small maps, and crops up to the whole width: the blocks ask
    the upsampling for output sizes that equal their input's (which the kernel copies)."""
    from mask2former.inference import upsampled_rows

    torch.manual_seed(factor)
    for h, w in ((1, 1), (2, 3), (3, 2), (5, 4)):
        x = torch.randn(2, h, w) * 5
        full = F.interpolate(x[None], scale_factor=factor, mode="bilinear", align_corners=False)[0]
        for width in range(1, w * factor + 1):
            rows = upsampled_rows(x, factor, width)
            for r0 in range(h * factor):
                for r1 in range(r0 + 1, h * factor + 1):
                    assert torch.equal(rows(r0, r1), full[:, r0:r1, :width]), (h, w, width, r0, r1)


@pytest.mark.parametrize("out_size", [None, (30, 41)])
def test_inference_upsamples_row_blocks_or_the_whole_output_as_officially(out_size, tiny_m2f_cfg):
    """MaskFormer.inference (upsample to the padded input, crop, resize to the output size,
    then the three rules) equals the official order on whole tensors, whether it upsamples
    row blocks from the low-resolution logits (output = the image) or the whole output
    (output resized)."""
    from detectron2.structures import ImageList

    from mask2former import official_order

    model = MaskFormer(**MaskFormer.from_config(tiny_m2f_cfg())).eval()
    model.object_mask_threshold, model.overlap_threshold, model.test_topk_per_image = 0.3, 0.5, 9
    images = ImageList(torch.zeros(2, 3, 64, 96), [(60, 90), (64, 81)])
    mask_cls, low = _random_outputs(3, H=16, W=24)
    mask_cls, low = torch.stack([mask_cls, mask_cls.flip(0)]), torch.stack([low, low.flip(1)])
    inputs = [{} if out_size is None else {"height": out_size[0], "width": out_size[1]} for _ in range(2)]
    got = model.inference(mask_cls, low, images, inputs)
    rules = model.rules()
    assert rules.semantic_on and rules.panoptic_on and rules.instance_on
    want = official_order.inference(mask_cls, low, (64, 96), images.image_sizes,
                                    [out_size or size for size in images.image_sizes], rules)
    for g, w in zip(got, want):
        _assert_same(g, w["sem_seg"], w["panoptic_seg"], w["instances"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_inference_post_processes_half_precision_logits_in_float32(dtype, tiny_m2f_cfg):
    """A model under autocast (or in half precision) hands over half-precision logits: they
    are post-processed in float32 with autocast off, so the outputs are those of the same
    logits given in float32 (not a bfloat16 semantic product, nor tied panoptic owners)."""
    from detectron2.structures import ImageList

    model = MaskFormer(**MaskFormer.from_config(tiny_m2f_cfg())).eval()
    model.object_mask_threshold, model.overlap_threshold, model.test_topk_per_image = 0.3, 0.5, 9
    images = ImageList(torch.zeros(1, 3, 64, 96), [(64, 96)])
    mask_cls, low = _random_outputs(3, H=16, W=24)
    mask_cls, low = mask_cls[None].to(dtype), low[None].to(dtype)
    (want,) = model.inference(mask_cls.float(), low.float(), images, [{}])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (got,) = model.inference(mask_cls, low, images, [{}])
    assert got["sem_seg"].dtype == torch.float32 and torch.equal(got["sem_seg"], want["sem_seg"])
    assert torch.equal(got["panoptic_seg"][0], want["panoptic_seg"][0])
    assert got["panoptic_seg"][1] == want["panoptic_seg"][1]
    gi, wi = got["instances"], want["instances"]
    assert torch.equal(gi.pred_masks, wi.pred_masks) and torch.equal(gi.scores, wi.scores)
    assert gi.scores.dtype == torch.float32


def test_postprocess_crops_and_skips_the_identity_resize():
    from detectron2.modeling.postprocessing import sem_seg_postprocess

    from mask2former.maskformer_model import postprocess

    x = torch.randn(3, 64, 96)
    for size, out in [((60, 90), (60, 90)), ((60, 90), (120, 180)), ((64, 96), (64, 96))]:
        assert torch.equal(postprocess(x, size, *out), sem_seg_postprocess(x, size, *out))


def test_whole_model_gmacs_count_the_semantic_product(tiny_m2f_cfg):
    """fvcore counts the semantic inference's product (K classes x Q queries per pixel,
    computed with mm(out=...), whose form fvcore's own handle rejects)."""
    from expedit_d2.flops import model_flops

    torch.manual_seed(0)
    model = MaskFormer(**MaskFormer.from_config(tiny_m2f_cfg())).eval()
    with torch.no_grad():
        counts = model_flops(model, [{"image": torch.rand(3, 96, 128) * 255, "height": 96, "width": 128}]).by_operator()
    assert counts["mm"] == 4 * 6 * 96 * 128
