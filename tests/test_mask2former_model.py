"""Mask2Former meta-architecture: official key list, inference modes, a training step."""
import pytest
import torch

from detectron2.config import get_cfg
from detectron2.data import MetadataCatalog
from detectron2.structures import Instances

from mask2former import MaskFormer, add_maskformer2_config
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


def tiny_cfg(name="expedit_test_m2f_meta"):
    cfg = get_cfg()
    add_maskformer2_config(cfg)
    cfg.MODEL.META_ARCHITECTURE = "MaskFormer"
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.BACKBONE.NAME = "D2SwinTransformer"
    s = cfg.MODEL.SWIN
    s.EMBED_DIM, s.DEPTHS, s.NUM_HEADS, s.WINDOW_SIZE = 32, [2, 2, 2, 2], [1, 2, 4, 8], 7
    h = cfg.MODEL.SEM_SEG_HEAD
    h.NAME, h.IN_FEATURES, h.NUM_CLASSES, h.TRANSFORMER_ENC_LAYERS = "MaskFormerHead", ["res2", "res3", "res4", "res5"], 4, 1
    h.CONVS_DIM = h.MASK_DIM = 32
    m = cfg.MODEL.MASK_FORMER
    m.HIDDEN_DIM, m.NUM_OBJECT_QUERIES, m.DEC_LAYERS, m.DIM_FEEDFORWARD, m.NHEADS, m.DROPOUT = 32, 6, 3, 64, 4, 0.0
    m.TRAIN_NUM_POINTS = 256
    m.TEST.SEMANTIC_ON = m.TEST.PANOPTIC_ON = m.TEST.INSTANCE_ON = True
    m.TEST.OBJECT_MASK_THRESHOLD, m.TEST.OVERLAP_THRESHOLD = 0.0, 0.0
    cfg.TEST.DETECTIONS_PER_IMAGE = 5  # the instance top-k (the official key)
    MetadataCatalog.get(name).set(thing_dataset_id_to_contiguous_id={1: 0, 2: 1}, stuff_classes=["a", "b", "c", "d"])
    cfg.DATASETS.TRAIN = (name,)
    return cfg


def test_inference_outputs_all_three_tasks():
    torch.manual_seed(0)
    model = MaskFormer(**MaskFormer.from_config(tiny_cfg())).eval()
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


def test_non_finite_input_is_rejected_naming_the_image():
    model = MaskFormer(**MaskFormer.from_config(tiny_cfg())).eval()
    image = torch.rand(3, 90, 120) * 255
    image[0, 3, 4] = float("nan")
    image[2, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"input image '000000000139.jpg' \(batch index 0\) has 2 non-finite"):
        model([{"image": image, "file_name": "000000000139.jpg"}])
    with pytest.raises(ValueError, match=r"input image 'image_id 7' \(batch index 0\) has 2 non-finite"):
        model([{"image": image, "image_id": 7}])


def test_training_step_gives_finite_losses():
    torch.manual_seed(0)
    model = MaskFormer(**MaskFormer.from_config(tiny_cfg())).train()
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
