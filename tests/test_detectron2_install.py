"""The installed detectron2 works for what expedit-d2 needs (see tools/install.sh)."""
import numpy as np
import PIL
import pytest
import torch


def test_modern_numpy_and_pillow():
    assert int(np.__version__.split(".")[0]) >= 2
    assert int(PIL.__version__.split(".")[0]) >= 10


def test_generalized_rcnn_builds_runs_and_counts_flops():
    from detectron2.config import get_cfg
    from detectron2.modeling import GeneralizedRCNN, build_model
    from detectron2.utils.analysis import FlopCountAnalysis

    cfg = get_cfg()
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg).eval()
    assert isinstance(model, GeneralizedRCNN)
    inputs = [{"image": torch.rand(3, 96, 128) * 255, "height": 96, "width": 128}]
    with torch.no_grad():
        out = model(inputs)
    assert out[0]["instances"].image_size == (96, 128)
    flops = FlopCountAnalysis(model, inputs)
    flops.unsupported_ops_warnings(False)
    # ResNet-50 + FPN + RPN + box head at 96x128 is a few GFLOPs
    assert 1e9 < flops.total() < 2e10


def test_evaluators_and_projects_import():
    from detectron2.evaluation import (  # noqa: F401
        COCOEvaluator,
        COCOPanopticEvaluator,
        DatasetEvaluators,
        SemSegEvaluator,
        inference_on_dataset,
    )
    import detectron2.projects.deeplab  # noqa: F401
    import detectron2.projects.point_rend  # noqa: F401
    from detectron2 import model_zoo

    assert model_zoo.get_config_file("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml")


def test_sem_seg_evaluator_runs_with_numpy2(tmp_path):
    """SemSegEvaluator used the removed np.int/np.float aliases before our patch."""
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.evaluation import SemSegEvaluator

    gt = np.array([[0, 1], [1, 255]], dtype=np.uint8)
    path = tmp_path / "gt.png"
    PIL.Image.fromarray(gt).save(path)
    name = "expedit_test_semseg_numpy2"
    DatasetCatalog.register(name, lambda: [{"file_name": "x.jpg", "sem_seg_file_name": str(path)}])
    MetadataCatalog.get(name).set(stuff_classes=["a", "b"], ignore_label=255)
    try:
        ev = SemSegEvaluator(name, distributed=False)
        ev.reset()
        logits = torch.zeros(2, 2, 2)
        logits[0, 0, 0] = logits[1, 0, 1] = logits[0, 1, 0] = 1  # predicts 0,1 / 0,0
        ev.process([{"file_name": "x.jpg", "sem_seg_file_name": str(path)}], [{"sem_seg": logits}])
        res = ev.evaluate()["sem_seg"]
        # class 0: tp 1, fp 1 -> IoU 1/2 ; class 1: tp 1, fn 1 -> IoU 1/2
        assert res["mIoU"] == pytest.approx(50.0)
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def test_cxx_only_ops_raise_a_clear_error():
    import detectron2.layers  # noqa: F401  (imports despite the missing extension)
    from detectron2 import _C

    if getattr(_C, "__file__", "").endswith(".so"):
        pytest.skip("this detectron2 was built with its C++ extension")
    with pytest.raises(RuntimeError, match=r"deform_conv_forward \(deformable convolution \(DeformConv\)\) is unavailable"):
        _C.deform_conv_forward()
    with pytest.raises(RuntimeError, match=r"fast COCO evaluation.*use_fast_impl=False"):
        _C.COCOevalEvaluateImages()
    from detectron2.layers.rotated_boxes import pairwise_iou_rotated

    with pytest.raises(RuntimeError, match="rotated-box IoU"):
        pairwise_iou_rotated(torch.zeros(1, 5), torch.zeros(1, 5))
