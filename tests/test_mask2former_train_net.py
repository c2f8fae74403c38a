"""End to end on CPU: a synthetic COCO-format panoptic dataset (JSON + PNG) -> semantic
prepare script -> projects/Mask2Former/train_net.py --eval-only (baseline and expedited)
through the real evaluators, and a few training iterations."""
import json
import pickle

import numpy as np
import torch
import pytest
from PIL import Image

from detectron2.data import DatasetCatalog

from datasets.prepare_coco_semantic_annos_from_panoptic_annos import main as prepare_semantic
from expedit_d2.evaluation.panoptic import id2rgb
from detectron2.engine import default_argument_parser
from tests.d2_helpers import load_train_net
from tests.project_opts import ROOT

CATEGORIES = [{"id": 1, "name": "person", "isthing": 1}, {"id": 2, "name": "car", "isthing": 1},
              {"id": 3, "name": "sky", "isthing": 0}, {"id": 4, "name": "grass", "isthing": 0}]
H, W = 64, 96
TINY = ["MODEL.SWIN.EMBED_DIM", "32", "MODEL.SWIN.DEPTHS", "[2, 2, 2, 2]", "MODEL.SWIN.NUM_HEADS", "[1, 2, 4, 8]",
        "MODEL.SWIN.WINDOW_SIZE", "7", "MODEL.SWIN.PRETRAIN_IMG_SIZE", "224", "MODEL.WEIGHTS", "",
        "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "4", "MODEL.SEM_SEG_HEAD.CONVS_DIM", "32", "MODEL.SEM_SEG_HEAD.MASK_DIM", "32",
        "MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS", "1", "MODEL.MASK_FORMER.HIDDEN_DIM", "32",
        "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", "8", "MODEL.MASK_FORMER.DEC_LAYERS", "3",
        "MODEL.MASK_FORMER.DIM_FEEDFORWARD", "64", "MODEL.MASK_FORMER.NHEADS", "4",
        "MODEL.MASK_FORMER.TRAIN_NUM_POINTS", "256", "MODEL.MASK_FORMER.TEST.INSTANCE_ON", "False",
        "MODEL.MASK_FORMER.TEST.OBJECT_MASK_THRESHOLD", "0.0", "MODEL.MASK_FORMER.TEST.OVERLAP_THRESHOLD", "0.0",
        "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "128", "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.IMAGE_SIZE", "96",
        "INPUT.MAX_SIZE_TRAIN", "128", "DATASETS.TRAIN", "('synthetic_coco_panoptic',)",
        "DATASETS.TEST", "('synthetic_coco_panoptic',)", "DATALOADER.NUM_WORKERS", "0", "MODEL.DEVICE", "cpu",
        "SOLVER.AMP.ENABLED", "False",
        # hourglass Swin on 7x7 windows: 4x4 clusters per window before global block 4 (k <= 16)
        "MODEL.SWIN.CLUSTERING_LOCATION", "4", "MODEL.SWIN.TOKEN_CLUSTERING_BLOCK.NUM_SPIXELS", "16",
        "MODEL.SWIN.TOKEN_CLUSTERING_BLOCK.WINDOW_SIZE", "3", "MODEL.SWIN.TOKEN_RECONSTRUCTION_BLOCK.K", "10"]
CONFIGS = "projects/Mask2Former/configs/coco/panoptic-segmentation/swin/"


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    (root / "val2017").mkdir()
    (root / "panoptic_val2017").mkdir()
    images, annotations = [], []
    for i in range(1, 4):
        ids = np.zeros((H, W), dtype=np.int64)
        ids[: H // 2] = 30  # sky
        ids[H // 2:] = 40  # grass
        ids[10:40, 10 + 5 * i: 30 + 5 * i] = 10  # person
        ids[35:60, 50:80] = 20  # car
        ids[:, -4:] = 0  # void strip
        segs = [{"id": 10, "category_id": 1, "iscrowd": 0}, {"id": 20, "category_id": 2, "iscrowd": 0},
                {"id": 30, "category_id": 3, "iscrowd": 0}, {"id": 40, "category_id": 4, "iscrowd": 0}]
        for s in segs:
            ys, xs = np.nonzero(ids == s["id"])
            s.update(area=int(len(ys)), bbox=[int(xs.min()), int(ys.min()), int(np.ptp(xs) + 1), int(np.ptp(ys) + 1)])
        rgb = np.stack([(ids * 5) % 256, (ids * 3 + 40 * i) % 256, np.full_like(ids, 90)], -1).astype(np.uint8)
        Image.fromarray(rgb).save(root / "val2017" / f"{i:06d}.png")
        Image.fromarray(id2rgb(ids)).save(root / "panoptic_val2017" / f"{i:06d}.png")
        images.append({"id": i, "file_name": f"{i:06d}.png", "height": H, "width": W})
        annotations.append({"image_id": i, "file_name": f"{i:06d}.png", "segments_info": segs})
    (root / "panoptic_val2017.json").write_text(json.dumps(
        {"images": images, "annotations": annotations, "categories": CATEGORIES}))
    prepare_semantic(["--panoptic-json", str(root / "panoptic_val2017.json"),
                      "--panoptic-root", str(root / "panoptic_val2017"), "--out", str(root / "panoptic_semseg_val2017")])
    sem = np.asarray(Image.open(root / "panoptic_semseg_val2017" / "000001.png"))
    assert sem[0, 0] == 2 and sem[-1, 0] == 3 and sem[20, 20] == 0 and sem[0, -1] == 255
    from mask2former.data import register_coco_panoptic_with_sem_seg

    if "synthetic_coco_panoptic" in DatasetCatalog.list():
        DatasetCatalog.remove("synthetic_coco_panoptic")
    register_coco_panoptic_with_sem_seg(
        "synthetic_coco_panoptic", CATEGORIES, str(root / "val2017"), str(root / "panoptic_val2017"),
        str(root / "panoptic_val2017.json"), str(root / "panoptic_semseg_val2017"))
    return root


def _train_net():
    return load_train_net("Mask2Former")


@pytest.fixture(scope="module")
def official_pkl(tmp_path_factory, coco):
    """A tiny model's weights as an official-format detectron2 .pkl (numpy, same names)."""
    tn = _train_net()
    args = default_argument_parser().parse_args(
        ["--config-file", str(ROOT / CONFIGS / "maskformer2_swin_large_IN21k_384_bs16_100ep.yaml"), *TINY])
    cfg = tn.setup(args)
    model = tn.Trainer.build_model(cfg)
    path = tmp_path_factory.mktemp("w") / "model_final.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": {k: v.numpy() for k, v in model.state_dict().items()}, "__author__": "test"}, f)
    return path


@pytest.mark.parametrize("config", ["maskformer2_swin_large_IN21k_384_bs16_100ep.yaml",
                                    "maskformer2_swin_large_IN21k_384_bs16_100ep_expedit_a10_8x8.yaml"])
def test_eval_only_end_to_end(coco, official_pkl, tmp_path, config):
    tn = _train_net()
    args = default_argument_parser().parse_args([
        "--config-file", str(ROOT / CONFIGS / config), "--eval-only", *TINY,
        "MODEL.WEIGHTS", str(official_pkl), "OUTPUT_DIR", str(tmp_path)])
    res = tn.main(args)
    pq = res["panoptic_seg"]
    assert set(pq) == {"PQ", "SQ", "RQ", "PQ_th", "SQ_th", "RQ_th", "PQ_st", "SQ_st", "RQ_st"}
    assert all(np.isfinite(v) and 0 <= v <= 100 for v in pq.values())
    assert np.isfinite(res["sem_seg"]["mIoU"])
    log = (tmp_path / "log.txt").read_text()  # the PQ table reaches Detectron2's log
    table = log[log.index("Panoptic quality on"):].splitlines()[1:6]
    assert "PQ" in table[0] and [line.split("|")[1].strip() for line in table[2:5]] == ["All", "Things", "Stuff"]


def test_a_few_training_iterations(coco, tmp_path):
    tn = _train_net()
    args = default_argument_parser().parse_args([
        "--config-file", str(ROOT / CONFIGS / "maskformer2_swin_large_IN21k_384_bs16_100ep_expedit_a10_8x8.yaml"),
        *TINY, "OUTPUT_DIR", str(tmp_path), "SOLVER.MAX_ITER", "2", "SOLVER.IMS_PER_BATCH", "1",
        "TEST.EVAL_PERIOD", "0", "SOLVER.STEPS", "()", "SOLVER.CHECKPOINT_PERIOD", "100"])
    tn.main(args)
    records = [json.loads(line) for line in (tmp_path / "metrics.json").read_text().splitlines()]
    losses = [r["total_loss"] for r in records if "total_loss" in r]
    assert losses and all(np.isfinite(losses))


def test_optimizer_recipe(coco):
    import torch

    from expedit_d2.solver import build_optimizer

    tn = _train_net()
    args = default_argument_parser().parse_args(
        ["--config-file", str(ROOT / CONFIGS / "maskformer2_swin_large_IN21k_384_bs16_100ep.yaml"), *TINY])
    cfg = tn.setup(args)
    model = tn.Trainer.build_model(cfg)
    opt = build_optimizer(cfg, model)
    assert isinstance(opt, torch.optim.AdamW) and "FullModelGradientClip" in type(opt).__name__
    by_param = {id(g["params"][0]): g for g in opt.param_groups}
    bb = model.backbone.layers[0].blocks[0]
    assert by_param[id(bb.attn.qkv.weight)]["lr"] == pytest.approx(cfg.SOLVER.BASE_LR * 0.1)
    assert by_param[id(bb.attn.relative_position_bias_table)]["weight_decay"] == 0.0
    assert by_param[id(bb.norm1.weight)]["weight_decay"] == cfg.SOLVER.WEIGHT_DECAY_NORM
    assert by_param[id(model.sem_seg_head.predictor.query_feat.weight)]["weight_decay"] == 0.0
    head_fc = model.sem_seg_head.predictor.class_embed.weight
    assert by_param[id(head_fc)]["lr"] == cfg.SOLVER.BASE_LR and by_param[id(head_fc)]["weight_decay"] == 0.05
    for p in model.parameters():
        p.grad = torch.ones_like(p) * 10
    before = head_fc.detach().clone()
    opt.step()  # the whole model's gradient norm is clipped to 0.01 first
    total = torch.sqrt(sum((p.grad ** 2).sum() for p in model.parameters()))
    assert total == pytest.approx(0.01, rel=1e-3)
    assert not torch.equal(before, head_fc)


# ----------------------------------------------------------------------------------
# COCO instance: JSON with polygons and RLE -> mask AP through COCOEvaluator
# ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def coco_instances(coco):
    from pycocotools import mask as mask_util

    from detectron2.data.datasets import register_coco_instances

    anns, images, k = [], [], 0
    for i in range(1, 4):
        images.append({"id": i, "file_name": f"{i:06d}.png", "height": H, "width": W})
        x0 = 10 + 5 * i
        k += 1  # a person as a polygon
        anns.append({"id": k, "image_id": i, "category_id": 1, "iscrowd": 0, "area": 600.0,
                     "bbox": [x0, 10, 20, 30], "segmentation": [[x0, 10, x0 + 20, 10, x0 + 20, 40, x0, 40]]})
        k += 1  # a car as RLE
        m = np.zeros((H, W), dtype=np.uint8, order="F")
        m[35:60, 50:80] = 1
        rle = mask_util.encode(m)
        rle["counts"] = rle["counts"].decode("ascii")
        anns.append({"id": k, "image_id": i, "category_id": 2, "iscrowd": 0, "area": float(m.sum()),
                     "bbox": [50, 35, 30, 25], "segmentation": rle})
    path = coco / "instances_val2017.json"
    path.write_text(json.dumps({"images": images, "annotations": anns,
                                "categories": [c for c in CATEGORIES if c["isthing"]]}))
    if "synthetic_coco_instances" in DatasetCatalog.list():
        DatasetCatalog.remove("synthetic_coco_instances")
    register_coco_instances("synthetic_coco_instances", {}, str(path), str(coco / "val2017"))
    return "synthetic_coco_instances"


INSTANCE_CONFIGS = "projects/Mask2Former/configs/coco/instance-segmentation/swin/"


def _instance_opts(dataset):
    return [*TINY, "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "2", "MODEL.MASK_FORMER.TEST.INSTANCE_ON", "True",
            "DATASETS.TRAIN", f"('{dataset}',)", "DATASETS.TEST", f"('{dataset}',)"]


@pytest.fixture(scope="module")
def instance_weights(tmp_path_factory, coco_instances):
    """The tiny 2-class baseline model's (random) weights, saved by Detectron2's checkpointer:
    --eval-only needs a checkpoint that covers the model."""
    from detectron2.checkpoint import DetectionCheckpointer

    tn = _train_net()
    cfg = tn.setup(default_argument_parser().parse_args([
        "--config-file", str(ROOT / INSTANCE_CONFIGS / "maskformer2_swin_large_IN21k_384_bs16_100ep.yaml"),
        *_instance_opts(coco_instances)]))
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("instance_weights")
    DetectionCheckpointer(tn.Trainer.build_model(cfg), save_dir=str(folder)).save("model_random")
    return folder / "model_random.pth"


@pytest.mark.parametrize("config", ["maskformer2_swin_large_IN21k_384_bs16_100ep.yaml",
                                    "maskformer2_swin_large_IN21k_384_bs16_100ep_expedit_a12_8x8.yaml"])
def test_instance_eval_only_end_to_end(coco_instances, instance_weights, tmp_path, config):
    tn = _train_net()
    args = default_argument_parser().parse_args([
        "--config-file", str(ROOT / INSTANCE_CONFIGS / config), "--eval-only", *_instance_opts(coco_instances),
        "MODEL.WEIGHTS", str(instance_weights), "OUTPUT_DIR", str(tmp_path)])
    res = tn.main(args)
    assert {"AP", "AP50", "AP75"} <= set(res["segm"])
    assert 0 <= res["segm"]["AP"] <= 100 and 0 <= res["segm"]["AP50"] <= 100  # NaN fails


def test_training_on_instance_and_semantic_records(coco, coco_instances, tmp_path):
    """The train mapper turns COCO instances (polygons + RLE) and semantic PNGs into targets."""
    from detectron2.data import MetadataCatalog

    if "synthetic_sem_seg" in DatasetCatalog.list():
        DatasetCatalog.remove("synthetic_sem_seg")
    DatasetCatalog.register("synthetic_sem_seg", lambda: [
        {"file_name": str(coco / "val2017" / f"{i:06d}.png"), "height": H, "width": W, "image_id": i,
         "sem_seg_file_name": str(coco / "panoptic_semseg_val2017" / f"{i:06d}.png")} for i in range(1, 4)])
    MetadataCatalog.get("synthetic_sem_seg").set(stuff_classes=[c["name"] for c in CATEGORIES], ignore_label=255,
                                                 thing_dataset_id_to_contiguous_id={})
    tn = _train_net()
    for dataset, classes in ((coco_instances, "2"), ("synthetic_sem_seg", "4")):
        out = tmp_path / dataset
        args = default_argument_parser().parse_args([
            "--config-file", str(ROOT / CONFIGS / "maskformer2_swin_large_IN21k_384_bs16_100ep.yaml"), *TINY,
            "MODEL.SEM_SEG_HEAD.NUM_CLASSES", classes, "DATASETS.TRAIN", f"('{dataset}',)",
            "DATASETS.TEST", "()", "OUTPUT_DIR", str(out), "SOLVER.MAX_ITER", "2", "SOLVER.IMS_PER_BATCH", "1",
            "SOLVER.STEPS", "()", "SOLVER.CHECKPOINT_PERIOD", "100", "MODEL.MASK_FORMER.TEST.PANOPTIC_ON", "False"])
        tn.main(args)
        losses = [json.loads(line).get("total_loss") for line in (out / "metrics.json").read_text().splitlines()]
        assert any(v is not None for v in losses) and all(np.isfinite(v) for v in losses if v is not None)
    # large-scale jitter at scale 1: the 64x96 image is padded to the 96x96 square, masks intact
    mapper = tn.MaskFormerTrainMapper(tn.setup(default_argument_parser().parse_args(
        ["--config-file", str(ROOT / CONFIGS / "maskformer2_swin_large_IN21k_384_bs16_100ep.yaml"), *TINY,
         "INPUT.MIN_SCALE", "1.0", "INPUT.MAX_SCALE", "1.0"])))
    rec = DatasetCatalog.get(coco_instances)[0]
    out = mapper(rec)
    inst = out["instances"]
    assert out["image"].shape == (3, 96, 96) and (out["image"][:, H:] == 128).all()
    assert inst.gt_classes.tolist() == [0, 1] and inst.gt_masks.tensor.shape == (2, 96, 96)
    assert not inst.gt_masks.tensor[:, H:].any()
    area = inst.gt_masks.tensor.sum((1, 2)).float()
    assert torch.allclose(area, torch.tensor([600.0, 750.0]), rtol=0.15)  # polygon, RLE


def test_train_mapper_recipes(coco):
    """Each DATASET_MAPPER_NAME gives the official recipe; label maps keep void where padded."""
    from detectron2.config import get_cfg

    from mask2former import add_maskformer2_config
    from mask2former.data.train_mapper import MaskFormerTrainMapper, build_train_augmentation

    cfg = get_cfg()
    add_maskformer2_config(cfg)
    cfg.merge_from_file(str(ROOT / "projects/Mask2Former/configs/ade20k/semantic-segmentation/"
                            "Base-ADE20K-SemanticSegmentation.yaml"))
    names = [type(a).__name__ for a in build_train_augmentation(cfg)]
    assert names == ["ResizeShortestEdge", "RandomCrop_CategoryAreaConstraint", "ColorAugSSDTransform",
                     "RandomFlip"]
    cfg.merge_from_list(["INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "128",
                         "INPUT.CROP.SIZE", "(40, 40)", "INPUT.SIZE_DIVISIBILITY", "48",
                         "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "4"])
    rec = DatasetCatalog.get("synthetic_coco_panoptic")[0]
    sem_rec = {k: rec[k] for k in ("file_name", "height", "width", "image_id", "sem_seg_file_name")}
    for kind, record in (("panoptic", rec), ("semantic", sem_rec)):
        cfg.INPUT.DATASET_MAPPER_NAME = f"mask_former_{kind}"
        out = MaskFormerTrainMapper(cfg)(record)
        masks = out["instances"].gt_masks.tensor
        assert out["image"].shape == (3, 48, 48), kind
        assert (out["image"][:, 40:] == 128).all() and (out["image"][:, :, 40:] == 128).all()
        assert masks.shape[1:] == (48, 48) and masks.any((1, 2)).all()
        assert not masks[:, 40:].any() and not masks[:, :, 40:].any(), kind  # padding is void
        assert int(masks.sum(0).max()) == 1  # segments do not overlap
        assert set(out["instances"].gt_classes.tolist()) <= {0, 1, 2, 3}
    cfg.INPUT.DATASET_MAPPER_NAME = "detr_panoptic"
    with pytest.raises(ValueError, match="INPUT.DATASET_MAPPER_NAME='detr_panoptic'"):
        build_train_augmentation(cfg)
