"""Small Detectron2 helpers shared by the tests."""
import torch
from detectron2.modeling import build_model


def run_faster_rcnn_fpn(cfg, bottom_up: str, size=(240, 320)):
    """Detectron2's own GeneralizedRCNN + FPN over ``bottom_up``: build, one CPU forward."""
    cfg.MODEL.BACKBONE.NAME = "build_bottom_up_fpn_backbone"
    cfg.MODEL.FPN.BOTTOM_UP = bottom_up
    cfg.MODEL.FPN.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.FPN.OUT_CHANNELS = 32
    cfg.MODEL.RPN.IN_FEATURES = ["p2", "p3", "p4", "p5", "p6"]
    cfg.MODEL.ROI_HEADS.IN_FEATURES = ["p2", "p3", "p4", "p5"]
    cfg.MODEL.ANCHOR_GENERATOR.SIZES = [[32], [64], [128], [256], [512]]
    cfg.MODEL.ROI_HEADS.NAME = "StandardROIHeads"
    cfg.MODEL.ROI_BOX_HEAD.NAME = "FastRCNNConvFCHead"
    cfg.MODEL.ROI_BOX_HEAD.NUM_FC = 2
    cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION = 7
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():
        out = model([{"image": torch.rand(3, *size) * 255, "height": size[0], "width": size[1]}])
    return out[0]["instances"]


def load_train_net(project: str):
    """Import ``projects/<project>/train_net.py`` as a module (as running it would)."""
    from pathlib import Path

    from expedit_d2.engine import load_project

    return load_project(Path(__file__).resolve().parents[1] / "projects" / project)


def run_model_zoo_config(cfg, config: str, backbone_name: str, bottom_up: str, size=(240, 320),
                         in_features=("res3", "res4", "res5")):
    """One of Detectron2's own model-zoo configs with only the backbone swapped for ours:
    build, one CPU forward. Returns (model, output of the one image)."""
    from detectron2 import model_zoo

    cfg.merge_from_file(model_zoo.get_config_file(config))
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.BACKBONE.NAME = backbone_name
    cfg.MODEL.FPN.BOTTOM_UP = bottom_up
    cfg.MODEL.FPN.IN_FEATURES = list(in_features)
    cfg.MODEL.FPN.OUT_CHANNELS = 32
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():
        out = model([{"image": torch.rand(3, *size) * 255, "height": size[0], "width": size[1]}])
    return model, out[0]


def set_keys(cfg, values: dict):
    """``cfg`` with each dotted key of ``values`` (``"MODEL.VIT.TAPS"``) set to its value."""
    for key, value in values.items():
        node = cfg
        *path, last = key.split(".")
        for part in path:
            node = node[part]
        node[last] = value
    return cfg
