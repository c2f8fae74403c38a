"""Evaluation in batches (:mod:`expedit_d2.batching`): an image's expedited output does not
depend on its batch mates. For every family (Swin through the Mask2Former model, ViT-Hybrid
through the DPT model, and the backbones alone: ViT, timm ViT, Swin, windowed ViTDet), a
batch of two equals two batches of one, for images of the same size and of different sizes;
and ``TEST.IMS_PER_BATCH 2`` evaluates to the metrics of ``TEST.IMS_PER_BATCH 1``."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog
from detectron2.engine import default_argument_parser
from detectron2.modeling import build_backbone

from expedit_d2 import add_expedit_config, apply_patch
from expedit_d2.batching import build_batched_test_loader, groups_by_padded_size, padded_size, run_by_image_size
from expedit_d2.engine import load_project
from expedit_d2.evaluation.panoptic import id2rgb
from expedit_d2.reduction.config import settings_from_config
from expedit_d2.synthetic import write_nyuv2_mat
from tests.numerics import assert_close_f32

ROOT = Path(__file__).resolve().parents[1]

M2F_CONFIG = ROOT / "projects/Mask2Former/configs/coco/panoptic-segmentation/swin/maskformer2_swin_large_IN21k_384_bs16_100ep.yaml"
M2F_CATEGORIES = [{"id": 1, "name": "person", "isthing": 1}, {"id": 2, "name": "car", "isthing": 1},
                  {"id": 3, "name": "sky", "isthing": 0}, {"id": 4, "name": "grass", "isthing": 0}]
M2F_DATASET = "batches_coco_panoptic"
M2F_OPTS = ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", "MODEL.SWIN.EMBED_DIM", "32", "MODEL.SWIN.DEPTHS", "[2, 2, 2, 2]",
            "MODEL.SWIN.NUM_HEADS", "[1, 2, 4, 8]", "MODEL.SWIN.WINDOW_SIZE", "7", "MODEL.SWIN.PRETRAIN_IMG_SIZE", "224",
            "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "4", "MODEL.SEM_SEG_HEAD.CONVS_DIM", "32",
            "MODEL.SEM_SEG_HEAD.MASK_DIM", "32", "MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS", "1",
            "MODEL.MASK_FORMER.HIDDEN_DIM", "32", "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", "8",
            "MODEL.MASK_FORMER.DEC_LAYERS", "3", "MODEL.MASK_FORMER.DIM_FEEDFORWARD", "64",
            "MODEL.MASK_FORMER.NHEADS", "4", "MODEL.MASK_FORMER.TEST.INSTANCE_ON", "True",
            "MODEL.MASK_FORMER.TEST.OBJECT_MASK_THRESHOLD", "0.0", "MODEL.MASK_FORMER.TEST.OVERLAP_THRESHOLD", "0.0",
            "TEST.DETECTIONS_PER_IMAGE", "5", "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "128",
            "DATASETS.TRAIN", f"('{M2F_DATASET}',)", "DATASETS.TEST", f"('{M2F_DATASET}',)",
            "DATALOADER.NUM_WORKERS", "0",
            # the hourglass Swin: 4x4 clusters per 7x7 window before global block 3 (stage 2)
            "MODEL.BACKBONE.NAME", "D2HourglassSwinTransformer", "MODEL.SWIN.CLUSTERING_LOCATION", "3",
            "MODEL.SWIN.TOKEN_CLUSTERING_BLOCK.NUM_SPIXELS", "16", "MODEL.SWIN.TOKEN_CLUSTERING_BLOCK.WINDOW_SIZE", "3",
            "MODEL.SWIN.TOKEN_RECONSTRUCTION_BLOCK.K", "10"]
DPT_CONFIG = ROOT / "projects/DPT/configs/dpt_hybrid_nyuv2_expedit_a4_16x16.yaml"
DPT_OPTS = ["MODEL.DEVICE", "cpu", "MODEL.VIT.EMBED_DIM", "32", "MODEL.VIT.DEPTH", "6", "MODEL.VIT.NUM_HEADS", "2",
            "MODEL.VIT.IMG_SIZE", "96", "MODEL.VIT.NUM_CLASSES", "10", "MODEL.VIT.HYBRID_LAYERS", "[1, 1, 1]",
            "MODEL.VIT.TAPS", "[0, 1, 3, 5]", "MODEL.DPT.REASSEMBLE_FEATURES", "[16, 24, 32, 32]",
            "MODEL.DPT.FUSION_FEATURES", "16", "MODEL.EXPEDIT.CLUSTERING_LOCATION", "2",
            "MODEL.EXPEDIT.NUM_CLUSTERS", "[4, 4]", "DATALOADER.NUM_WORKERS", "0"]
#: a model's chain of layers: ~1e-4 of the output's scale (tests/numerics.py)
REL = 1e-4
#: the random DPT's depth is nearly flat (about 7.24 m, spread ~2e-3 m): 1e-5 of its scale,
#: well under what padding by a batch mate changes (~1e-3 m)
DPT_REL = 1e-5


def _model(project: str, config: Path, opts: list[str], extra=()):
    module = load_project(ROOT / "projects" / project)
    cfg = module.build_config(default_argument_parser().parse_args(["--config-file", str(config), *opts, *extra]))
    torch.manual_seed(0)
    return module, cfg, module.Trainer.build_model(cfg).eval()


def _image(h: int, w: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.rand(3, h, w, generator=g) * 255, "height": h, "width": w}


def _expedited(backbone) -> bool:
    return any(getattr(m, "token_reduction", None) is not None for m in backbone.modules())


def _one_by_one(model, inputs):
    with torch.no_grad():
        return [model([x])[0] for x in inputs]


def _batched(model, inputs):
    with torch.no_grad():
        return model(inputs)


# --------------------------------------------------------------------------------------
# the grouping
# --------------------------------------------------------------------------------------
def test_groups_by_padded_size_keep_the_input_order():
    assert padded_size((64, 96), 32) == (64, 96) and padded_size((65, 96), 32) == (96, 96)
    assert padded_size((65, 97), 0) == (65, 97) == padded_size((65, 97), 1)
    sizes = [(64, 96), (96, 64), (60, 90), (96, 64), (64, 96)]
    assert groups_by_padded_size(sizes, 32) == [[0, 2, 4], [1, 3]]
    assert groups_by_padded_size(sizes, 0) == [[0, 4], [1, 3], [2]]
    calls = []

    def fn(batch):
        calls.append([x["i"] for x in batch])
        return [f"out{x['i']}" for x in batch]

    inputs = [{"image": torch.zeros(3, *s), "i": i} for i, s in enumerate(sizes)]
    assert run_by_image_size(inputs, fn, 32) == [f"out{i}" for i in range(5)]
    assert calls == [[0, 2, 4], [1, 3]]
    calls.clear()
    assert run_by_image_size(inputs[:1], fn, 32) == ["out0"] and calls == [[0]]
    with pytest.raises(ValueError, match="returned 1 outputs for 3 inputs"):
        run_by_image_size(inputs, lambda batch: batch[:1], 32)
    with pytest.raises(ValueError, match="size_divisibility must be an int >= 0, got -1"):
        padded_size((4, 4), -1)


def test_loader_batches_with_the_inference_sampler_and_checks_the_key():
    cfg = get_cfg()
    add_expedit_config(cfg)
    assert cfg.TEST.IMS_PER_BATCH == 1
    loader = build_batched_test_loader([{"i": i} for i in range(5)], mapper=None, batch_size=2)
    assert [[d["i"] for d in batch] for batch in loader] == [[0, 1], [2, 3], [4]]
    name = "batches_loader_list"
    if name not in DatasetCatalog.list():
        DatasetCatalog.register(name, lambda: [{"file_name": f"{i}.png", "image_id": i} for i in range(3)])
    cfg.TEST.IMS_PER_BATCH = 2
    loader = build_batched_test_loader(cfg, name, mapper=lambda d: d["image_id"])
    assert list(loader) == [[0, 1], [2]]
    cfg.TEST.IMS_PER_BATCH = 0
    with pytest.raises(ValueError, match="TEST.IMS_PER_BATCH must be an int >= 1, got 0"):
        build_batched_test_loader(cfg, name)


# --------------------------------------------------------------------------------------
# whole models: Swin (Mask2Former), ViT-Hybrid (DPT), expedited
# --------------------------------------------------------------------------------------
def _assert_same_mask2former(got, expected):
    assert_close_f32(got["sem_seg"], expected["sem_seg"], rel=REL)
    ids, infos = got["panoptic_seg"]
    e_ids, e_infos = expected["panoptic_seg"]
    assert torch.equal(ids, e_ids) and infos == e_infos
    a, b = got["instances"], expected["instances"]
    assert torch.equal(a.pred_classes, b.pred_classes) and torch.equal(a.pred_masks, b.pred_masks)
    assert_close_f32(a.scores, b.scores, rel=REL)


@pytest.fixture(scope="module")
def mask2former(m2f_dataset):
    return _model("Mask2Former", M2F_CONFIG, M2F_OPTS)


@pytest.mark.parametrize("sizes", [[(64, 96), (64, 96)], [(64, 96), (96, 64)], [(64, 96), (50, 70)]],
                         ids=["same", "mixed", "mixed_same_padding"])
def test_mask2former_swin_batch_of_two_equals_two_batches_of_one(mask2former, sizes):
    _, cfg, model = mask2former
    assert _expedited(model.backbone)
    inputs = [_image(h, w, seed) for seed, (h, w) in enumerate(sizes)]
    alone, together = _one_by_one(model, inputs), _batched(model, inputs)
    for got, expected in zip(together, alone):
        _assert_same_mask2former(got, expected)
    if padded_size(sizes[0], 32) != padded_size(sizes[1], 32):
        # what the grouping prevents: padded together, the smaller image's output changes
        with torch.no_grad():
            padded = model._forward_batch(inputs)
        with pytest.raises(AssertionError):
            assert_close_f32(padded[1]["sem_seg"], alone[1]["sem_seg"], rel=REL)


@pytest.fixture(scope="module")
def dpt():
    return _model("DPT", DPT_CONFIG, DPT_OPTS)


@pytest.mark.parametrize("sizes", [[(128, 160), (128, 160)], [(128, 160), (160, 128)], [(128, 160), (120, 150)]],
                         ids=["same", "mixed", "mixed_same_padding"])
def test_dpt_vit_hybrid_batch_of_two_equals_two_batches_of_one(dpt, sizes):
    _, _, model = dpt
    assert _expedited(model.backbone)
    inputs = [_image(h, w, seed) for seed, (h, w) in enumerate(sizes)]
    alone, together = _one_by_one(model, inputs), _batched(model, inputs)
    for got, expected in zip(together, alone):
        assert got["depth"].shape == expected["depth"].shape
        assert_close_f32(got["depth"], expected["depth"], rel=DPT_REL)
    d = model.backbone.size_divisibility
    if padded_size(sizes[0], d) != padded_size(sizes[1], d):
        with torch.no_grad():
            padded = model._forward_batch(inputs)
        with pytest.raises(AssertionError):
            assert_close_f32(padded[1]["depth"], alone[1]["depth"], rel=DPT_REL)


# --------------------------------------------------------------------------------------
# backbones alone, expedit applied with apply_patch: a batch of two equals each image alone
# --------------------------------------------------------------------------------------
def _backbone_cfg(base: str):
    cfg = get_cfg()
    add_expedit_config(cfg)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.BACKBONE.NAME = base
    e = cfg.MODEL.EXPEDIT
    e.CLUSTERING_LOCATION, e.NUM_CLUSTERS, e.RECON_K = 2, [4, 4], 5
    v = cfg.MODEL.VIT
    v.EMBED_DIM, v.DEPTH, v.NUM_HEADS, v.IMG_SIZE, v.NUM_CLASSES, v.TAPS = 32, 6, 2, 96, 10, [1, 2, 3, 5]
    t = cfg.MODEL.TIMM_VIT
    t.NAME, t.TAPS = "vit_small_patch16_224", [1, 2, 3, 5]
    t.KWARGS.depth, t.KWARGS.embed_dim, t.KWARGS.num_heads = 6, 32, 2
    s = cfg.MODEL.SWIN
    s.EMBED_DIM, s.DEPTHS, s.NUM_HEADS, s.WINDOW_SIZE = 16, [2, 2, 4, 2], [1, 2, 2, 4], 7
    if base == "ExpeditD2SwinTransformer":  # before global block 5 (stage 3), 4x4 per 7x7 window
        e.CLUSTERING_LOCATION = 5
    d = cfg.MODEL.VITDET
    d.IMG_SIZE, d.EMBED_DIM, d.DEPTH, d.NUM_HEADS, d.WINDOW_SIZE = 160, 32, 6, 2, 5
    d.WINDOW_BLOCK_INDEXES, d.PRETRAIN_IMG_SIZE, d.OUT_CHANNELS, d.SQUARE_PAD = [0, 1, 3, 4], 96, 16, 0
    if base == "ExpeditD2ViTDet":  # 3x3 clusters per 5x5 window
        e.NUM_CLUSTERS, e.RECON_K = [3, 3], 5
    return cfg


@pytest.mark.parametrize("base", ["D2ViT", "D2TimmViT", "ExpeditD2SwinTransformer", "ExpeditD2ViTDet"])
def test_backbone_batch_of_two_equals_each_image_alone(base):
    cfg = _backbone_cfg(base)
    torch.manual_seed(0)
    backbone = build_backbone(cfg).eval()
    apply_patch(getattr(backbone, "net", backbone), settings_from_config(cfg))  # ViTDet: its ViT, under the pyramid
    assert _expedited(backbone)
    x = torch.randn(2, 3, 128, 160, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        together = backbone(x)
        alone = [backbone(x[i:i + 1]) for i in range(2)]
    for name, out in together.items():
        for i in range(2):
            assert_close_f32(out[i:i + 1], alone[i][name], rel=REL, msg=f"{base} {name} image {i}")


# --------------------------------------------------------------------------------------
# evaluation: TEST.IMS_PER_BATCH 2 gives the metrics of 1 (real loader, real evaluators)
# --------------------------------------------------------------------------------------
def _assert_close_metrics(got: dict, expected: dict) -> None:
    assert set(got) == set(expected)
    for task in expected:
        assert set(got[task]) == set(expected[task]), task
        for k, v in expected[task].items():
            assert got[task][k] == pytest.approx(v, rel=1e-5, abs=1e-6, nan_ok=True), (task, k, got[task][k], v)


@pytest.fixture(scope="module")
def m2f_dataset(tmp_path_factory):
    """A COCO panoptic dataset (JSON + PNG) of 3 images of two sizes (64x96, 96x64): the test
    loader's batches of 2 hold images of different sizes."""
    from mask2former.data import register_coco_panoptic_with_sem_seg
    from datasets.prepare_coco_semantic_annos_from_panoptic_annos import main as prepare_semantic

    root = tmp_path_factory.mktemp("batches_coco")
    for sub in ("val2017", "panoptic_val2017"):
        (root / sub).mkdir()
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for i, (h, w) in enumerate([(64, 96), (96, 64), (64, 96)], start=1):
        ids = np.where(np.arange(h)[:, None] < h // 2, 30, 40) * np.ones((1, w), np.int64)
        ids[5:30, 5 + 4 * i: 25 + 4 * i] = 10
        ids[h - 25: h - 5, w - 30: w - 8] = 20
        ids[:, -3:] = 0  # void
        segs = []
        for sid, cat in ((10, 1), (20, 2), (30, 3), (40, 4)):
            ys, xs = np.nonzero(ids == sid)
            segs.append({"id": sid, "category_id": cat, "iscrowd": 0, "area": int(len(ys)),
                         "bbox": [int(xs.min()), int(ys.min()), int(np.ptp(xs) + 1), int(np.ptp(ys) + 1)]})
        rgb = (rng.integers(0, 40, (h, w, 3)) + np.stack([ids * 5 % 256, ids * 3 % 256, ids % 256], -1)).astype(np.uint8)
        Image.fromarray(rgb).save(root / "val2017" / f"{i:06d}.png")
        Image.fromarray(id2rgb(ids)).save(root / "panoptic_val2017" / f"{i:06d}.png")
        images.append({"id": i, "file_name": f"{i:06d}.png", "height": h, "width": w})
        annotations.append({"image_id": i, "file_name": f"{i:06d}.png", "segments_info": segs})
    (root / "panoptic_val2017.json").write_text(json.dumps(
        {"images": images, "annotations": annotations, "categories": M2F_CATEGORIES}))
    prepare_semantic(["--panoptic-json", str(root / "panoptic_val2017.json"),
                      "--panoptic-root", str(root / "panoptic_val2017"), "--out", str(root / "panoptic_semseg_val2017")])
    if M2F_DATASET in DatasetCatalog.list():
        DatasetCatalog.remove(M2F_DATASET)
    register_coco_panoptic_with_sem_seg(
        M2F_DATASET, M2F_CATEGORIES, str(root / "val2017"), str(root / "panoptic_val2017"),
        str(root / "panoptic_val2017.json"), str(root / "panoptic_semseg_val2017"))
    return root


def _evaluate(module, cfg, model, ims_per_batch: int, out: Path) -> dict:
    cfg = cfg.clone()
    cfg.defrost()
    cfg.TEST.IMS_PER_BATCH, cfg.OUTPUT_DIR = ims_per_batch, str(out)
    cfg.freeze()
    loader = module.Trainer.build_test_loader(cfg, cfg.DATASETS.TEST[0])
    assert [len(b) for b in loader] == ([2, 1] if ims_per_batch == 2 else [1, 1, 1])
    return dict(module.Trainer.test(cfg, model))


def test_mask2former_evaluation_in_batches_of_two_gives_the_metrics_of_one(mask2former, tmp_path):
    module, cfg, model = mask2former
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.MASK_FORMER.TEST.INSTANCE_ON = False  # no instances JSON in this dataset
    cfg.freeze()
    one = _evaluate(module, cfg, model, 1, tmp_path / "one")
    two = _evaluate(module, cfg, model, 2, tmp_path / "two")
    assert {"panoptic_seg", "sem_seg"} <= set(one) and 0 < one["sem_seg"]["mIoU"] < 100
    _assert_close_metrics(two, one)


def test_dpt_evaluation_in_batches_of_two_gives_the_metrics_of_one(dpt, tmp_path):
    from datasets.prepare_nyuv2 import main as prepare_nyuv2

    module, cfg, model = dpt
    labeled, splits, _, _ = write_nyuv2_mat(tmp_path / "mat", n=4, n_test=3)
    root = tmp_path / "d2"
    prepare_nyuv2(["--labeled", str(labeled), "--splits", str(splits), "--root", str(root)])
    from dpt import register_nyuv2

    register_nyuv2(root)
    one = _evaluate(module, cfg, model, 1, tmp_path / "one")
    two = _evaluate(module, cfg, model, 2, tmp_path / "two")
    assert one["depth"]["rmse"] > 0
    _assert_close_metrics(two, one)


# --------------------------------------------------------------------------------------
# tools/benchmark_model.py --batch: throughput per batch size, base and expedited
# --------------------------------------------------------------------------------------
def test_benchmark_model_reports_throughput_per_batch_size(tmp_path, capsys):
    from tools import benchmark_model

    out = tmp_path / "dpt"
    benchmark_model.main([
        "--config-file", "projects/DPT/configs/demo/tiny_vit_nyuv2.yaml", "--input-size", "96", "128",
        "--repeats", "1", "--warmup", "0", "--device", "cpu", "--output", str(out), "--batch", "1", "2",
        "--point", "MODEL.EXPEDIT.CLUSTERING_LOCATION=1;MODEL.EXPEDIT.NUM_CLUSTERS=[4, 4]"])
    base, point = json.loads(out.with_suffix(".json").read_text())
    for row in (base, point):
        assert [t["batch"] for t in row["batches"]] == [1, 2]
        for t in row["batches"]:
            assert t["images_per_s"] == pytest.approx(t["batch"] / (t["ms"] / 1e3))
            assert t["speedup_vs_batch_1"] == pytest.approx(t["images_per_s"] / row["batches"][0]["images_per_s"])
            assert t["latency_ratio_ci95"] == [t["latency_ratio"]] * 2  # one round
    assert [t["latency_ratio"] for t in base["batches"]] == [1.0, 1.0]
    assert [t["latency_ratio"] for t in point["batches"]] == pytest.approx(
        [p["ms"] / b["ms"] for p, b in zip(point["batches"], base["batches"])])
    report = out.with_suffix(".md").read_text()
    assert "| setting | batch | ms per batch | images/s |" in report and "| a1_4x4 | 2 |" in report
    with pytest.raises(SystemExit) as exit_:
        benchmark_model.main(["--config-file", "projects/DPT/configs/demo/tiny_vit_nyuv2.yaml",
                              "--input-size", "96", "128", "--device", "cpu", "--batch", "2", "0"])
    assert exit_.value.code == 2 and "--batch: batch sizes must be >= 1, got 0" in capsys.readouterr().err
