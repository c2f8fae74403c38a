"""The official Mask2Former / Expedit-Mask2Former YAMLs run unchanged with our train_net.py.

``tests/data/official_configs`` holds the official Swin-L configs and their whole ``_BASE_``
chains (keys and values of the official files, official relative paths and links; see the
README there). Each chain merges with ``train_net.build_config`` (DeepLab keys included),
builds the official model, and the Expedit settings reach the backbone. The keys the official
code reads are honoured (``TEST.DETECTIONS_PER_IMAGE``, ``MODEL.MASK_FORMER.TEST.RESIZE_RATIO``,
``MODEL.SEM_SEG_HEAD.NUM_FEATURE_LEVELS``) or accepted as the no-ops they are officially
(``MODEL.MASK_FORMER.TEST.RESIZE_SHORT_EDGE_LENGTH``, ``LOG_TEMP_OUTPUT``).
"""
from pathlib import Path

import pytest
import torch

from detectron2.modeling.backbone import ResNet
from detectron2.structures import BitMasks

from mask2former import MaskFormer
from tests.d2_helpers import load_train_net
from tests.mask2former_settings import CONFIGS, PUBLISHED, REFERENCE, flat, installed_settings, settings_in_config
from tests.reference_keys import read_keys

OFFICIAL = Path(__file__).resolve().parent / "data/official_configs"
CHAINS = sorted(str(p.relative_to(OFFICIAL)) for p in OFFICIAL.rglob("maskformer2_*.yaml"))
SWIN = [r for r in CHAINS if "/swin/" in r]
HOURGLASS = [r for r in CHAINS if "hourglass" in r]


@pytest.fixture
def official(m2f_project_cfg):
    """``official(rel, *opts)``: the frozen config of the official chain ``OFFICIAL / rel``."""
    return lambda rel, *opts: m2f_project_cfg(OFFICIAL / rel, *opts)


def build_on_meta(cfg):
    assert cfg.MODEL.META_ARCHITECTURE == "MaskFormer"
    with torch.device("meta"):
        return MaskFormer(cfg)


def test_the_fixtures_cover_the_four_published_chains():
    assert len(CHAINS) == 12 and len(SWIN) == 8 and len(HOURGLASS) == 4
    for rel in HOURGLASS:  # the Expedit files sit on the R50 file, as officially
        assert (OFFICIAL / rel).read_text().count("_BASE_: ../maskformer2_R50_bs16_") == 1


@pytest.mark.parametrize("rel", CHAINS)
def test_official_chain_merges_and_builds(rel, official):
    cfg = official(rel)
    assert cfg.MODEL.RESNETS.STEM_TYPE == "basic"  # a DeepLab key, set by every official Base file
    model = build_on_meta(cfg)
    keys = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if "/swin/" not in rel:  # the R50 files the Swin ones inherit from build too
        assert isinstance(model.backbone, ResNet)
        assert sorted(model.backbone.output_shape()) == ["res2", "res3", "res4", "res5"]
        return
    ref = next((v for k, v in REFERENCE.items() if rel.startswith(k)), None)
    if ref is not None:  # the model-zoo .pkl key list
        assert keys == read_keys(f"mask2former_swinL_{ref}")
    else:  # ADE20K semantic: 150 classes + no-object, 100 queries
        assert keys["sem_seg_head.predictor.class_embed.weight"] == (151, 256)
        assert keys["sem_seg_head.predictor.query_feat.weight"] == (100, 256)
    if "hourglass" not in rel:
        assert installed_settings(model.backbone) is None


@pytest.mark.parametrize("rel", HOURGLASS)
def test_official_expedit_settings_reach_the_backbone(rel, official):
    published = PUBLISHED[str(Path(rel).parents[1])]
    cfg = official(rel)
    assert settings_in_config(cfg) == published
    assert installed_settings(build_on_meta(cfg).backbone) == published


# Keys where our configs differ from the official chains, none of them read by this model:
# ResNet keys (the official Base files describe R50; our Swin configs leave the defaults),
# SOLVER.STEPS (ADE20K trains with WarmupPolyLR, which ignores it), TEST.AUG.* (test-time
# augmentation is off in both), and COCO panoptic's DATASETS.TRAIN (ours trains on the
# registration that also carries the semantic PNGs of the same images).
ALLOWED_DIFFERENCES = ("MODEL.RESNETS.", "MODEL.BACKBONE.FREEZE_AT", "SOLVER.STEPS", "TEST.AUG.", "DATASETS.TRAIN")


@pytest.mark.parametrize("rel", SWIN)
def test_our_configs_under_the_official_names_match_the_official_chains(rel, official, m2f_project_cfg):
    theirs, ours = flat(official(rel)), flat(m2f_project_cfg(CONFIGS / rel))
    assert set(theirs) == set(ours)
    differ = {k for k in theirs if theirs[k] != ours[k]}
    assert all(k.startswith(ALLOWED_DIFFERENCES) for k in differ), {k: (theirs[k], ours[k]) for k in differ}


def test_res640_eval_line_is_loaded(official):
    """``MIN_SIZE_TRAIN: !!python/object/apply:eval [...]`` loads (detectron2 falls back to
    yaml.unsafe_load for local files), in the chain's Base file and in the res640 file."""
    expected = tuple(int(x * 0.1 * 640) for x in range(5, 21))
    for rel in ("ade20k/semantic-segmentation/swin/maskformer2_hourglass_swin_large_IN21k_384_bs16_160k_res640.yaml",
                "ade20k/panoptic-segmentation/swin/maskformer2_hourglass_swin_large_IN21k_384_bs16_160k.yaml"):
        cfg = official(rel)
        assert tuple(cfg.INPUT.MIN_SIZE_TRAIN) == expected and cfg.INPUT.MIN_SIZE_TEST == 640
    base = official("ade20k/semantic-segmentation/maskformer2_R50_bs16_160k.yaml")
    assert tuple(base.INPUT.MIN_SIZE_TRAIN) == tuple(int(x * 0.1 * 512) for x in range(5, 21))


def test_official_ade20k_schedule_is_deeplab_poly(official, m2f_project_cfg):
    from detectron2.projects.deeplab.lr_scheduler import WarmupPolyLR

    tn = load_train_net("Mask2Former")
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    theirs = official("ade20k/panoptic-segmentation/swin/maskformer2_hourglass_swin_large_IN21k_384_bs16_160k.yaml")
    ours = m2f_project_cfg(
        CONFIGS / "ade20k/semantic-segmentation/swin/maskformer2_swin_large_IN21k_384_bs16_160k_res640.yaml")
    for cfg in (theirs, ours):
        assert cfg.SOLVER.LR_SCHEDULER_NAME == "WarmupPolyLR" and cfg.SOLVER.POLY_LR_POWER == 0.9
        assert isinstance(tn.Trainer.build_lr_scheduler(cfg, opt), WarmupPolyLR)
    coco = official("coco/instance-segmentation/swin/maskformer2_hourglass_swin_large_IN21k_384_bs16_100ep.yaml")
    assert not isinstance(tn.Trainer.build_lr_scheduler(coco, opt), WarmupPolyLR)  # Detectron2's multi-step


# ----------------------------------------------------------------------------------------
# keys the official code reads
# ----------------------------------------------------------------------------------------
@pytest.fixture
def tiny_model(tiny_m2f_cfg):
    """``tiny_model(**test_keys)``: (the tiny MaskFormer with those MODEL.MASK_FORMER.TEST keys,
    seeded, in eval mode; its config)."""
    def make(**test_keys):
        cfg = tiny_m2f_cfg()
        for k, v in test_keys.items():
            setattr(cfg.MODEL.MASK_FORMER.TEST, k, v)
        torch.manual_seed(0)
        return MaskFormer(cfg).eval(), cfg

    return make


IMAGE = {"height": 45, "width": 60}


def _image():
    g = torch.Generator().manual_seed(1)
    return dict(IMAGE, image=torch.rand(3, 90, 120, generator=g) * 255)


def test_detections_per_image_is_the_instance_top_k(official, tiny_m2f_cfg):
    rel = "coco/instance-segmentation/swin/maskformer2_hourglass_swin_large_IN21k_384_bs16_100ep.yaml"
    assert build_on_meta(official(rel)).test_topk_per_image == 100  # Detectron2's default
    assert build_on_meta(official(rel, "TEST.DETECTIONS_PER_IMAGE", "50")).test_topk_per_image == 50
    for k in (3, 7):
        cfg = tiny_m2f_cfg()
        t = cfg.MODEL.MASK_FORMER.TEST
        t.SEMANTIC_ON, t.PANOPTIC_ON, t.INSTANCE_ON = False, False, True
        cfg.TEST.DETECTIONS_PER_IMAGE = k
        torch.manual_seed(0)
        with torch.no_grad():
            (out,) = MaskFormer(cfg).eval()([_image()])
        inst = out["instances"]
        assert len(inst) == k and inst.image_size == (45, 60)
        # unlike the official code (all-zero boxes), ours are the binary masks' bounding boxes
        expected = BitMasks(inst.pred_masks > 0).get_bounding_boxes().tensor
        assert torch.equal(inst.pred_boxes.tensor, expected) and expected.abs().sum() > 0


def test_resize_ratio_resizes_the_backbone_input_at_test_time_only(official, tiny_model):
    rel = "coco/panoptic-segmentation/swin/maskformer2_hourglass_swin_large_IN21k_384_bs16_100ep.yaml"
    assert build_on_meta(official(rel)).resize_ratio == -1.0
    assert build_on_meta(official(rel, "MODEL.MASK_FORMER.TEST.RESIZE_RATIO", "0.5")).resize_ratio == 0.5

    seen = []
    outputs = {}
    for ratio in (-1.0, 0.5, 1.25):
        model, _ = tiny_model(RESIZE_RATIO=ratio)
        hook = model.backbone.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape[-2:])))
        with torch.no_grad():
            (out,) = model([_image()])
        hook.remove()
        outputs[ratio] = out
        assert out["sem_seg"].shape == (4, 45, 60)  # the image size, whatever the backbone saw
        assert out["panoptic_seg"][0].shape == (45, 60) and out["instances"].image_size == (45, 60)
    # the 90x120 image pads to 96x128; (int(96/32*r)*32, int(128/32*r)*32)
    assert seen == [(96, 128), (32, 64), (96, 160)]
    assert not torch.equal(outputs[-1.0]["sem_seg"], outputs[0.5]["sem_seg"])

    model, _ = tiny_model(RESIZE_RATIO=0.5)
    x = torch.arange(2 * 3 * 64 * 96, dtype=torch.float32).view(2, 3, 64, 96)
    expected = torch.nn.functional.interpolate(x, size=(32, 32 * int(96 / 32 * 0.5)), mode="bilinear",
                                               align_corners=False)
    assert torch.equal(model.resize_for_backbone(x), expected)
    with pytest.raises(ValueError, match="RESIZE_RATIO=0.2 shrinks"):
        tiny_model(RESIZE_RATIO=0.2)[0].resize_for_backbone(x)

    model.train()  # training ignores it (a test-time key)
    seen.clear()
    model.backbone.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape[-2:])))
    from detectron2.structures import Instances

    inst = Instances((64, 96))
    inst.gt_classes = torch.tensor([1])
    inst.gt_masks = torch.ones(1, 64, 96, dtype=torch.bool)
    model([{"image": torch.rand(3, 64, 96) * 255, "instances": inst}])
    assert seen == [(64, 96)]


def test_resize_short_edge_length_and_log_temp_output_are_accepted_no_ops(official, tiny_model):
    rel = "ade20k/panoptic-segmentation/swin/maskformer2_hourglass_swin_large_IN21k_384_bs16_160k.yaml"
    cfg = official(rel, "MODEL.MASK_FORMER.TEST.RESIZE_SHORT_EDGE_LENGTH", "512", "LOG_TEMP_OUTPUT", "elsewhere")
    assert cfg.MODEL.MASK_FORMER.TEST.RESIZE_SHORT_EDGE_LENGTH == 512 and cfg.LOG_TEMP_OUTPUT == "elsewhere"
    build_on_meta(cfg)
    default, _ = tiny_model()
    other, _ = tiny_model(RESIZE_SHORT_EDGE_LENGTH=32)
    with torch.no_grad():
        (a,), (b,) = default([_image()]), other([_image()])
    assert torch.equal(a["sem_seg"], b["sem_seg"]) and torch.equal(a["panoptic_seg"][0], b["panoptic_seg"][0])


def test_num_feature_levels_sets_the_maps_the_decoder_attends_to(official, tiny_m2f_cfg):
    rel = "coco/panoptic-segmentation/swin/maskformer2_hourglass_swin_large_IN21k_384_bs16_100ep.yaml"
    assert official(rel).MODEL.SEM_SEG_HEAD.NUM_FEATURE_LEVELS == 3  # the default: the model-zoo keys above
    for levels in (2, 4):  # 3 transformer levels (res5, res4, res3) + the res2 FPN level
        cfg = tiny_m2f_cfg()
        cfg.MODEL.SEM_SEG_HEAD.NUM_FEATURE_LEVELS = levels
        torch.manual_seed(0)
        model = MaskFormer(cfg).eval()
        assert model.sem_seg_head.predictor.level_embed.weight.shape[0] == levels
        assert len(model.sem_seg_head.predictor.input_proj) == levels
        with torch.no_grad():
            (out,) = model([_image()])
        assert torch.isfinite(out["sem_seg"]).all()
    cfg = tiny_m2f_cfg()
    cfg.MODEL.SEM_SEG_HEAD.NUM_FEATURE_LEVELS = 5
    with pytest.raises(ValueError, match="NUM_FEATURE_LEVELS=5: the pixel decoder gives 1..4 maps"):
        MaskFormer(cfg)
