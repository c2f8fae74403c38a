"""Fixtures the test files share, and the projects' packages made importable the way their
train_net.py scripts do.

The tiny configurations and seeded builders are factories: session fixtures that return a
function (they hold no state, so module-scoped fixtures may use them too). Plain constants and
oracles live in helper modules beside this file (project_opts.py, timm_models.py,
mask2former_settings.py, method_oracles.py, ...); no test file imports another.
"""
import os
import sys

import pytest
import torch

from tests.project_opts import ROOT

for project in ("projects/DPT", "projects/Mask2Former"):
    path = str(ROOT / project)
    if path not in sys.path:
        sys.path.insert(0, path)


# --------------------------------------------------------------------------------------
# seeded builders
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def seeded_backbone():
    """``seeded_backbone(cfg, seed=0)``: Detectron2's ``build_backbone(cfg)`` after
    ``torch.manual_seed(seed)``, in eval mode."""
    from detectron2.modeling import build_backbone

    def build(cfg, seed=0):
        torch.manual_seed(seed)
        return build_backbone(cfg).eval()

    return build


@pytest.fixture(scope="session")
def seeded_dpt():
    """``seeded_dpt(cfg, seed=0)``: the DPTDepth model of ``cfg`` after
    ``torch.manual_seed(seed)``, in eval mode."""
    from dpt import DPTDepth

    def build(cfg, seed=0):
        torch.manual_seed(seed)
        return DPTDepth(**DPTDepth.from_config(cfg)).eval()

    return build


# --------------------------------------------------------------------------------------
# tiny configurations
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_vit_cfg():
    """``tiny_vit_cfg(name="D2ViT", hybrid=False)``: our ViT (or ViT-Hybrid) backbone ``name``
    with 6 blocks of width 32 and expedit 5x6 clusters after block 2, on the CPU."""
    from detectron2.config import get_cfg

    from expedit_d2 import add_expedit_config

    def make(name="D2ViT", hybrid=False):
        cfg = get_cfg()
        add_expedit_config(cfg)
        cfg.MODEL.DEVICE = "cpu"
        cfg.MODEL.BACKBONE.NAME = name
        v = cfg.MODEL.VIT
        v.EMBED_DIM, v.DEPTH, v.NUM_HEADS, v.IMG_SIZE, v.NUM_CLASSES = 32, 6, 2, 96, 10
        v.TAPS = [0, 1, 3, 5] if hybrid else [1, 2, 3, 5]
        v.HYBRID_LAYERS = [1, 1, 1]
        e = cfg.MODEL.EXPEDIT
        e.BASE = "D2ViTHybrid" if hybrid else "D2ViT"
        e.CLUSTERING_LOCATION, e.NUM_CLUSTERS = 2, [5, 6]
        e.ITERS, e.WINDOW, e.TEMPERATURE, e.RECON_K, e.RECON_TEMPERATURE = 5, 5, 1.0, 4, 1.0
        return cfg

    return make


@pytest.fixture(scope="session")
def tiny_reduction_cfg():
    """``tiny_reduction_cfg(base, method="none", add_config=add_expedit_config, **values)``: a
    TokenReductionBackbone with ``method`` on a tiny ``base`` (D2ViT, D2ViTHybrid, D2TimmViT:
    DINOv2 with 4 registers, "EVA" / "EVA-mixed": D2TimmViT over tests.timm_models.TIMM_EVA,
    ExpeditD2SwinTransformer), then ``values`` ({dotted key: value}) set, on the CPU."""
    from detectron2.config import get_cfg

    from expedit_d2.config import add_expedit_config
    from tests.d2_helpers import set_keys
    from tests.timm_models import DINOV2_REG4, TIMM_EVA

    def make(base: str, method: str = "none", add_config=add_expedit_config, **values):
        cfg = get_cfg()
        add_config(cfg)
        cfg.MODEL.DEVICE = "cpu"
        v = cfg.MODEL.VIT
        v.EMBED_DIM, v.DEPTH, v.NUM_HEADS, v.IMG_SIZE, v.NUM_CLASSES = 32, 6, 2, 96, 10
        v.TAPS = [0, 1, 3, 5] if base == "D2ViTHybrid" else [1, 2, 3, 5]
        v.HYBRID_LAYERS = [1, 1, 1]
        t = cfg.MODEL.TIMM_VIT
        t.NAME, t.TAPS = DINOV2_REG4, [1, 2, 3, 5]
        t.KWARGS.depth, t.KWARGS.embed_dim, t.KWARGS.num_heads, t.KWARGS.init_values = 6, 32, 2, 1.0
        if base in TIMM_EVA:
            t.NAME, base = TIMM_EVA[base], "D2TimmViT"
        s = cfg.MODEL.SWIN
        s.EMBED_DIM, s.DEPTHS, s.NUM_HEADS, s.WINDOW_SIZE = 16, [2, 2, 4, 2], [1, 2, 2, 4], 12
        cfg.MODEL.BACKBONE.NAME = "TokenReductionBackbone"
        cfg.MODEL.TOKEN_REDUCTION.BASE = base
        cfg.MODEL.TOKEN_REDUCTION.METHOD = method
        return set_keys(cfg, values)

    return make


@pytest.fixture(scope="session")
def dpt_cfg():
    """``dpt_cfg(hybrid=True, tiny=True)``: DPT on the project's Base-DPT-NYUv2.yaml, the
    hybrid (ViT-B/16 + R50) or ViT-L/16; ``tiny``: 6 blocks of width 32 and a narrow head;
    expedit settings for the tiny model; on the CPU."""
    from detectron2.config import get_cfg

    from dpt import add_dpt_config
    from tests.project_opts import DPT_BASE_YAML

    def make(hybrid=True, tiny=True):
        cfg = get_cfg()
        add_dpt_config(cfg)
        cfg.merge_from_file(str(DPT_BASE_YAML))  # the project's defaults, as every DPT config has them
        cfg.MODEL.DEVICE = "cpu"
        cfg.MODEL.META_ARCHITECTURE = "DPTDepth"
        cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD = [127.5] * 3, [127.5] * 3
        v = cfg.MODEL.VIT
        cfg.MODEL.BACKBONE.NAME = "D2ViTHybrid" if hybrid else "D2ViT"
        cfg.MODEL.EXPEDIT.BASE = cfg.MODEL.BACKBONE.NAME
        if hybrid:
            v.TAPS = [0, 1, 8, 11]
        else:  # ViT-L/16
            v.EMBED_DIM, v.DEPTH, v.NUM_HEADS, v.TAPS = 1024, 24, 16, [5, 11, 17, 23]
            cfg.MODEL.DPT.REASSEMBLE_FEATURES = [256, 512, 1024, 1024]
        if tiny:
            v.EMBED_DIM, v.DEPTH, v.NUM_HEADS, v.IMG_SIZE, v.NUM_CLASSES = 32, 6, 2, 96, 10
            v.HYBRID_LAYERS = [1, 1, 1]
            v.TAPS = [0, 1, 3, 5] if hybrid else [1, 2, 3, 5]
            cfg.MODEL.DPT.REASSEMBLE_FEATURES = [16, 24, 32, 32]
            cfg.MODEL.DPT.FUSION_FEATURES = 16
        e = cfg.MODEL.EXPEDIT
        e.CLUSTERING_LOCATION, e.NUM_CLUSTERS, e.WINDOW = 2, [6, 8], 5
        e.TEMPERATURE, e.RECON_K, e.RECON_TEMPERATURE = 1.0, 8, 1.0
        return cfg

    return make


@pytest.fixture(scope="session")
def tiny_m2f_cfg():
    """``tiny_m2f_cfg(name="expedit_test_m2f_meta")``: a tiny Mask2Former (Swin of width 32,
    4 classes, 6 queries, all three tasks at test time) on the CPU, training on the dataset
    ``name``, whose metadata it sets (things 1, 2; stuff "a".."d")."""
    from detectron2.config import get_cfg
    from detectron2.data import MetadataCatalog

    from mask2former import add_maskformer2_config

    def make(name="expedit_test_m2f_meta"):
        cfg = get_cfg()
        add_maskformer2_config(cfg)
        cfg.MODEL.META_ARCHITECTURE = "MaskFormer"
        cfg.MODEL.DEVICE = "cpu"
        cfg.MODEL.BACKBONE.NAME = "D2SwinTransformer"
        s = cfg.MODEL.SWIN
        s.EMBED_DIM, s.DEPTHS, s.NUM_HEADS, s.WINDOW_SIZE = 32, [2, 2, 2, 2], [1, 2, 4, 8], 7
        h = cfg.MODEL.SEM_SEG_HEAD
        h.NAME, h.IN_FEATURES = "MaskFormerHead", ["res2", "res3", "res4", "res5"]
        h.NUM_CLASSES, h.TRANSFORMER_ENC_LAYERS = 4, 1
        h.CONVS_DIM = h.MASK_DIM = 32
        m = cfg.MODEL.MASK_FORMER
        m.HIDDEN_DIM, m.NUM_OBJECT_QUERIES, m.DEC_LAYERS, m.DIM_FEEDFORWARD, m.NHEADS, m.DROPOUT = 32, 6, 3, 64, 4, 0.0
        m.TRAIN_NUM_POINTS = 256
        m.TEST.SEMANTIC_ON = m.TEST.PANOPTIC_ON = m.TEST.INSTANCE_ON = True
        m.TEST.OBJECT_MASK_THRESHOLD, m.TEST.OVERLAP_THRESHOLD = 0.0, 0.0
        cfg.TEST.DETECTIONS_PER_IMAGE = 5  # the instance top-k (the official key)
        MetadataCatalog.get(name).set(thing_dataset_id_to_contiguous_id={1: 0, 2: 1},
                                      stuff_classes=["a", "b", "c", "d"])
        cfg.DATASETS.TRAIN = (name,)
        return cfg

    return make


@pytest.fixture(scope="session")
def m2f_project_cfg():
    """``m2f_project_cfg(path, *opts)``: the frozen config ``projects/Mask2Former/train_net.py``
    builds for ``--config-file path`` and the options ``opts``."""
    from detectron2.engine import default_argument_parser

    from tests.d2_helpers import load_train_net

    def build_config(path, *opts):
        args = default_argument_parser().parse_args(["--config-file", str(path), *opts])
        return load_train_net("Mask2Former").build_config(args)

    return build_config


# --------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def synthetic_coco(tmp_path_factory):
    """(root, weights): synthetic COCO under a DETECTRON2_DATASETS of its own, and fixed random
    weights of the tiny Mask2Former (tests.project_opts.M2F_TINY_CONFIG + M2F_SMALL)."""
    from detectron2.engine import default_argument_parser

    from expedit_d2.engine import load_project
    from expedit_d2.synthetic import write_coco
    from tests.project_opts import M2F_SMALL, M2F_TINY_CONFIG

    root = tmp_path_factory.mktemp("d2data")
    write_coco(root, {"train": 2, "val": 2}, height=64, width=96)
    old = os.environ.get("DETECTRON2_DATASETS")
    os.environ["DETECTRON2_DATASETS"] = str(root)  # the evaluation subprocesses read it
    project = load_project(ROOT / "projects/Mask2Former")
    cfg = project.build_config(default_argument_parser().parse_args(["--config-file", M2F_TINY_CONFIG, *M2F_SMALL]))
    project.register_datasets()
    torch.manual_seed(0)
    model = project.Trainer.build_model(cfg)
    weights = root / "tiny.pth"
    torch.save({"model": model.state_dict()}, weights)
    yield root, str(weights)
    if old is None:
        del os.environ["DETECTRON2_DATASETS"]
    else:
        os.environ["DETECTRON2_DATASETS"] = old
