"""Whole models on an accelerator against the same models on the CPU (run where one is present).

The operators' own CUDA variants are in test_ops.py and test_methods_ops.py; these run the
expedited Mask2Former (the hourglass Swin, the deformable pixel decoder, the masked-attention
decoder and the three post-processing tasks) and the expedited DPT-Hybrid end to end, in
float32 (the CPU's outputs up to float rounding) and under autocast (finite, close).
``tools/device/check.sh`` runs them on a GPU machine. Without an accelerator the parameter
lists are empty and pytest reports these tests as skipped.
"""
import pytest
import torch

from mask2former import MaskFormer

ACCELERATORS = ["cuda"] if torch.cuda.is_available() else []


@pytest.fixture
def m2f_expedited_cfg(tiny_m2f_cfg):
    cfg = tiny_m2f_cfg("expedit_test_m2f_accelerator")
    cfg.MODEL.BACKBONE.NAME = "D2HourglassSwinTransformer"
    s = cfg.MODEL.SWIN
    s.CLUSTERING_LOCATION = 4  # first block of stage 3 (depths 2, 2, 2, 2)
    s.TOKEN_CLUSTERING_BLOCK.NUM_SPIXELS = 16  # each 7x7 window -> 4x4
    # thresholds that keep some queries out, so the panoptic rule has work to do
    cfg.MODEL.MASK_FORMER.TEST.OBJECT_MASK_THRESHOLD = 0.2
    cfg.MODEL.MASK_FORMER.TEST.OVERLAP_THRESHOLD = 0.5
    cfg.TEST.DETECTIONS_PER_IMAGE = 12  # of 6 queries x 4 classes: thing pairs among them
    return cfg


def _pair(build, cfg, device):
    """(model on the CPU, the same weights on ``device``), both in eval mode."""
    torch.manual_seed(0)
    cpu = build(cfg).eval()
    cfg = cfg.clone()
    cfg.MODEL.DEVICE = device
    acc = build(cfg).eval()
    acc.load_state_dict(cpu.state_dict())
    return cpu, acc.to(device)


def _m2f(cfg):
    return MaskFormer(**MaskFormer.from_config(cfg))


def _image(seed, size=(3, 90, 120)):
    return torch.rand(size, generator=torch.Generator().manual_seed(seed)) * 255


@pytest.mark.parametrize("device", ACCELERATORS)
def test_expedited_mask2former_on_the_accelerator_equals_the_cpu(device, m2f_expedited_cfg):
    cpu, acc = _pair(_m2f, m2f_expedited_cfg, device)
    image = _image(0)
    with torch.inference_mode():
        (want,) = cpu([{"image": image, "height": 45, "width": 60}])
        (got,) = acc([{"image": image.to(device), "height": 45, "width": 60}])
    torch.testing.assert_close(got["sem_seg"].cpu(), want["sem_seg"], rtol=1e-4, atol=1e-4)
    # panoptic owners and binary masks are argmaxes and thresholds: a pixel whose two
    # candidates are within float rounding may go either way, so count rather than equate
    pan_got, seg_got = got["panoptic_seg"]
    pan_want, seg_want = want["panoptic_seg"]
    assert seg_want and len(want["instances"])  # something to compare
    assert [s["category_id"] for s in seg_got] == [s["category_id"] for s in seg_want]
    assert (pan_got.cpu() != pan_want).float().mean() < 1e-3
    inst_got, inst_want = got["instances"].to("cpu"), want["instances"]
    assert inst_got.pred_classes.tolist() == inst_want.pred_classes.tolist()
    torch.testing.assert_close(inst_got.scores, inst_want.scores, rtol=1e-3, atol=1e-4)
    assert (inst_got.pred_masks != inst_want.pred_masks).float().mean() < 1e-3


@pytest.mark.parametrize("device", ACCELERATORS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_expedited_mask2former_under_autocast_on_the_accelerator(device, dtype, m2f_expedited_cfg):
    _, acc = _pair(_m2f, m2f_expedited_cfg, device)
    image = _image(1).to(device)
    with torch.inference_mode():
        (full,) = acc([{"image": image, "height": 45, "width": 60}])
        with torch.autocast(device_type=torch.device(device).type, dtype=dtype):
            (half,) = acc([{"image": image, "height": 45, "width": 60}])
    # post-processing runs in float32 from the half-precision logits
    assert half["sem_seg"].dtype == torch.float32 and torch.isfinite(half["sem_seg"]).all()
    diff = (half["sem_seg"] - full["sem_seg"]).abs()
    assert diff.mean() < 0.05 and diff.max() < 0.3
    assert len(half["instances"]) == len(full["instances"])


@pytest.mark.parametrize("device", ACCELERATORS)
def test_expedited_dpt_hybrid_on_the_accelerator_equals_the_cpu(device, dpt_cfg, seeded_dpt):
    cfg = dpt_cfg()
    cfg.MODEL.BACKBONE.NAME, cfg.MODEL.EXPEDIT.ENABLED = "ExpeditBackbone", True
    cpu, acc = _pair(seeded_dpt, cfg, device)
    image = _image(2, (3, 96, 128))
    with torch.inference_mode():
        want = cpu([{"image": image}])[0]["depth"]
        got = acc([{"image": image.to(device)}])[0]["depth"]
        with torch.autocast(device_type=torch.device(device).type, dtype=torch.float16):
            half = acc([{"image": image.to(device)}])[0]["depth"]
    torch.testing.assert_close(got.cpu(), want, rtol=1e-3, atol=1e-4)
    assert torch.isfinite(half).all()
    torch.testing.assert_close(half.float().cpu(), want, rtol=0.05, atol=0.05)
