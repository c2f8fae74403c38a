"""KITTI depth (DPT project): the official evaluation protocol (BTS's eval_with_pngs.py as
Expedit-DPT's EVALUATION.md runs it: --garg_crop --do_kb_crop, 1e-3..80 m, predictions
stored as 16-bit PNGs of depth x 256), the Eigen-split layout and its prepare script, the
KITTI model's settings, and train_net.py --eval-only end to end on a synthetic KITTI in the
real file formats."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datasets.prepare_kitti import main as prepare_main
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import default_argument_parser
from dpt import DPTDepth, DepthDatasetMapper, add_dpt_config, convert_dpt_state_dict, load_kitti
from dpt.data import kb_crop_box
from dpt.evaluation import DepthEvaluator, depth_metrics, eval_crop_mask, png_quantize, read_depth
from expedit_d2.synthetic import write_kitti
from tests.d2_helpers import load_train_net
from tests.project_opts import DEPTH_METRICS, DPT_TINY_OPTS, ROOT
from tests.reference_keys import official_dpt_names, read_keys

CONFIGS = ROOT / "projects/DPT/configs"


# --------------------------------------------------------------------------------------
# the protocol, by hand
# --------------------------------------------------------------------------------------
def test_garg_and_eigen_crops_are_the_official_fractions_of_the_frame():
    garg = eval_crop_mask((375, 1242), "kitti_garg")
    rows, cols = np.nonzero(garg.any(1))[0], np.nonzero(garg.any(0))[0]
    # int(0.40810811 * 375) = 153 .. int(0.99189189 * 375) = 371, int(0.03594771 * 1242) = 44 ..
    # int(0.96405229 * 1242) = 1197 (end-exclusive)
    assert (rows[0], rows[-1] + 1, cols[0], cols[-1] + 1) == (153, 371, 44, 1197)
    assert garg.sum() == (371 - 153) * (1197 - 44)
    eigen = eval_crop_mask((375, 1242), "kitti_eigen")
    rows = np.nonzero(eigen.any(1))[0]
    assert (rows[0], rows[-1] + 1) == (124, 342)
    assert eval_crop_mask((4, 5), None).all()
    with pytest.raises(ValueError, match=r"evaluation crop 'garg': expected one of \['nyu_eigen', 'kitti_garg'"):
        eval_crop_mask((375, 1242), "garg")


def test_the_benchmark_crop_is_the_bottom_middle_352_x_1216():
    assert kb_crop_box(375, 1242) == [23, 13, 352, 1216]
    assert kb_crop_box(370, 1224) == [18, 4, 352, 1216]
    assert kb_crop_box(376, 1241) == [24, 12, 352, 1216]  # the left margin rounds down
    with pytest.raises(ValueError, match="a KITTI frame of 350x1242 is smaller than the benchmark crop 352x1216"):
        kb_crop_box(350, 1242)


def test_predictions_are_rounded_as_their_16_bit_pngs():
    p = np.array([257 / 256, 10.001, 10.00390625 - 1e-6, -3.0, 300.0, np.nan], dtype=np.float32)
    q = png_quantize(p, 256)
    assert q.dtype == np.float32
    assert q.tolist() == [257 / 256, 10.0, 10.0, 0.0, 65535 / 256, 0.0]


def _frame(value=np.nan, shape=(375, 1242)):
    return np.full(shape, value, dtype=np.float32)


def test_metrics_follow_eval_with_pngs_on_a_hand_computed_frame():
    """Two valid pixels inside the Garg crop, others outside it, beyond 80 m or at 0; the
    prediction covers the benchmark crop, is rounded down to 1/256 m and clipped to 80 m."""
    gt = _frame(0.0)
    gt[200, 100] = 10.0
    gt[300, 600] = 40.0
    gt[100, 100] = 20.0  # above the Garg crop
    gt[200, 1230] = 20.0  # right of it (and outside the prediction)
    gt[250, 500] = 85.0  # beyond 80 m
    box = kb_crop_box(*gt.shape)  # [23, 13, 352, 1216]
    pred = np.full((352, 1216), 10.001, dtype=np.float32)  # stored as 2560 / 256 = 10.0
    pred[300 - 23, 600 - 13] = 120.0  # clipped to 80
    m = depth_metrics(pred, gt, 1e-3, 80.0, "kitti_garg", box, prediction_png_scale=256)
    p, g = np.array([10.0, 80.0]), np.array([10.0, 40.0])
    assert m["rmse"] == pytest.approx(np.sqrt(np.mean((g - p) ** 2)), rel=1e-12)  # sqrt(800)
    assert m["abs_rel"] == pytest.approx(0.5, rel=1e-12) and m["sq_rel"] == pytest.approx(20.0, rel=1e-12)
    assert m["d1"] == 0.5 and m["d2"] == 0.5 and m["d3"] == 0.5  # 80 / 40 = 2 > 1.25^3
    assert m["rmse_log"] == pytest.approx(np.sqrt(np.log(2) ** 2 / 2), rel=1e-12)
    # without the PNG rounding, 10.001 m counts as it is
    raw = depth_metrics(pred, gt, 1e-3, 80.0, "kitti_garg", box)
    assert raw["abs_rel"] == pytest.approx((0.001 / 10 + 1.0) / 2, rel=1e-5)
    # nothing valid: None (counted as "without valid pixels")
    assert depth_metrics(pred, _frame(0.0), 1e-3, 80.0, "kitti_garg", box) is None


def test_valid_ground_truth_outside_the_prediction_and_bad_shapes_are_named():
    gt = _frame(0.0)
    gt[370, 300] = 5.0  # inside the Garg crop (rows 153:371), below a crop box that stops at row 360
    with pytest.raises(ValueError, match=r"valid ground truth outside the predicted crop_box \[8, 13, 352, 1216\]"):
        depth_metrics(np.ones((352, 1216), np.float32), gt, 1e-3, 80.0, "kitti_garg", [8, 13, 352, 1216])
    with pytest.raises(ValueError, match=r"prediction \(352, 1200\) does not fit crop_box \[23, 13, 352, 1216\]"):
        depth_metrics(np.ones((352, 1200), np.float32), gt, 1e-3, 80.0, "kitti_garg", [23, 13, 352, 1216])
    with pytest.raises(ValueError, match=r"evaluation crop 'garg'"):
        DepthEvaluator("x", crop="garg")


def test_depth_pngs_are_read_as_depth_times_256(tmp_path):
    stored = np.array([[0, 256, 65535]], dtype=np.uint16)
    Image.fromarray(stored).save(tmp_path / "d.png")
    assert read_depth(tmp_path / "d.png").tolist() == [[0.0, 1.0, 65535 / 256]]
    Image.fromarray(stored.astype(np.uint8)).save(tmp_path / "d8.png")
    with pytest.raises(ValueError, match=r"d8.png: expected a 16-bit depth PNG \(depth x 256\), got uint8"):
        read_depth(tmp_path / "d8.png")
    with pytest.raises(ValueError, match=r"unknown depth format"):
        read_depth(tmp_path / "d.tiff")


# --------------------------------------------------------------------------------------
# the layout and its prepare script
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def kitti_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("kitti_d2")
    test_list, train_list, depths = write_kitti(root, n_test=2, n_train=1)
    prepare_main(["--eigen-test-list", str(test_list), "--eigen-train-list", str(train_list), "--root", str(root)])
    return root, test_list, depths


def test_prepare_indexes_the_images_with_ground_truth(kitti_root):
    root, test_list, depths = kitti_root
    test = json.loads((root / "kitti" / "eigen_test.json").read_text())
    assert [r["image_id"] for r in test] == [0, 1]  # line 3 of the list has no ground truth
    assert [(r["height"], r["width"]) for r in test] == [(375, 1242), (370, 1224)]
    assert test[0]["file_name"] == "raw/2011_09_26/2011_09_26_drive_0002_sync/image_02/data/0000000000.png"
    assert test[0]["depth_file_name"].startswith("data_depth_annotated/train/2011_09_26_drive_0002_sync/")
    assert len(json.loads((root / "kitti" / "eigen_train.json").read_text())) == 1
    records = load_kitti(root, "eigen_test")
    assert records[1]["crop_box"] == [18, 4, 352, 1216]
    np.testing.assert_array_equal(read_depth(records[0]["depth_file_name"]), depths[records[0]["depth_file_name"]])
    # a copy of the list without the date folders (as some BTS copies have it) indexes the same
    undated = test_list.with_name("undated.txt")
    undated.write_text(test_list.read_text().replace("2011_09_26/2011_09_26_drive", "2011_09_26_drive"))
    prepare_main(["--eigen-test-list", str(undated), "--root", str(root)])
    assert json.loads((root / "kitti" / "eigen_test.json").read_text()) == test
    # rerunning rewrites the same index, and leaves no temporary file
    before = (root / "kitti" / "eigen_test.json").read_text()
    prepare_main(["--eigen-test-list", str(test_list), "--root", str(root)])
    assert (root / "kitti" / "eigen_test.json").read_text() == before
    assert not list((root / "kitti").glob(".*.tmp"))


def test_prepare_names_what_is_missing(tmp_path, capsys):
    test_list, _, depths = write_kitti(tmp_path, n_test=2)
    missing = sorted(depths)[1]  # the second test image's depth PNG
    Path(missing).unlink()
    with pytest.raises(SystemExit) as e:
        prepare_main(["--eigen-test-list", str(test_list), "--root", str(tmp_path)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "1 depth maps listed in" in err and missing.split("data_depth_annotated/train/")[1] in err
    assert not (tmp_path / "kitti" / "eigen_test.json").exists()  # nothing written
    bad = tmp_path / "bad.txt"
    bad.write_text("a.png b.png\n")
    with pytest.raises(SystemExit):
        prepare_main(["--eigen-test-list", str(bad), "--root", str(tmp_path)])
    assert "bad.txt:1: expected '<image> <depth or None> <focal>', got 'a.png b.png'" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match=r"kitti/eigen_train.json.*prepare_kitti.py .*--eigen-train-list"):
        load_kitti(tmp_path, "eigen_train")


def test_the_mapper_crops_the_image_and_evaluation_reads_the_whole_frame(kitti_root):
    root, _, _ = kitti_root
    record = load_kitti(root, "eigen_test")[0]
    d = DepthDatasetMapper(False)(record)
    assert d["image"].shape == (3, 352, 1216) and (d["height"], d["width"]) == (352, 1216)
    full = np.asarray(Image.open(record["file_name"]))
    np.testing.assert_array_equal(d["image"].permute(1, 2, 0).numpy(), full[23:375, 13:1229])
    assert "depth" not in d
    train = DepthDatasetMapper(True)(load_kitti(root, "eigen_train")[0])
    assert train["depth"].shape == (352, 1216)


# --------------------------------------------------------------------------------------
# the model and train_net.py
# --------------------------------------------------------------------------------------
def _kitti_cfg(name="dpt_hybrid_kitti.yaml"):
    cfg = get_cfg()
    add_dpt_config(cfg)
    cfg.merge_from_file(str(CONFIGS / name))
    return cfg


def test_kitti_configs_are_the_official_model_and_settings():
    cfg = _kitti_cfg()
    assert (cfg.MODEL.DPT.SCALE, cfg.MODEL.DPT.SHIFT, cfg.MODEL.DPT.INVERT) == (0.00006016, 0.00579, True)
    assert cfg.DATASETS.TEST == ("kitti_eigen_test",) and cfg.MODEL.DPT.MAX_DEPTH == 80.0
    with torch.device("meta"):
        model = DPTDepth(**DPTDepth.from_config(cfg))
    # dpt_hybrid_kitti-cb926ef4.pt is DPT's DPTDepthModel on vitb_rn50_384: the hybrid's names
    mapped = convert_dpt_state_dict({k: torch.empty(v, device="meta") for k, v in read_keys("dpt_hybrid_kitti").items()})
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == {k: tuple(v.shape) for k, v in mapped.items()}
    for name, alpha, n in (("a6_28x28", 6, 28), ("a4_20x20", 4, 20), ("a4_16x16", 4, 16)):
        e = _kitti_cfg(f"dpt_hybrid_kitti_expedit_{name}.yaml").MODEL.EXPEDIT
        assert (e.CLUSTERING_LOCATION, tuple(e.NUM_CLUSTERS)) == (alpha, (n, n))
        assert (e.RECONSTRUCTION, e.ITERS, e.WINDOW, e.TEMPERATURE) == ("nearest", 5, 5, 1.0)


@pytest.fixture(scope="module")
def kitti_weights(tmp_path_factory, dpt_cfg, seeded_dpt):
    """Seeded random weights whose head output is stretched into KITTI's range: the raw
    output r (about 1 +- 0.1 at random) becomes about 1500 +- 2000, depths of a few to 80 m
    (1 / (0.00006016 r + 0.00579)) instead of 172 m everywhere, clipped to 80."""
    path = tmp_path_factory.mktemp("kitti_weights") / "dpt_hybrid_kitti_official_names.pt"
    state = official_dpt_names(seeded_dpt(dpt_cfg(hybrid=True)))
    state["scratch.output_conv.4.weight"] = state["scratch.output_conv.4.weight"] * 20000
    state["scratch.output_conv.4.bias"] = (state["scratch.output_conv.4.bias"] - 1.03) * 20000 + 1500
    torch.save(state, path)
    return path


def _args(config, weights, out, *opts):
    return default_argument_parser().parse_args([
        "--config-file", str(CONFIGS / config), "--eval-only", "MODEL.WEIGHTS", str(weights),
        "OUTPUT_DIR", str(out), *DPT_TINY_OPTS, *opts])


def test_eval_only_on_kitti_follows_the_protocol(kitti_root, kitti_weights, tmp_path, monkeypatch):
    """Baseline and expedited (28 x 28 clusters on the crop's 22 x 76 tokens: clustered, not
    skipped); the reported metrics are those of the model's own predictions placed in each
    frame, rounded to 1/256 m, Garg-cropped."""
    root, _, depths = kitti_root
    monkeypatch.setenv("DETECTRON2_DATASETS", str(root))
    tn = load_train_net("DPT")
    base = tn.main(_args("dpt_hybrid_kitti.yaml", kitti_weights, tmp_path / "base"))
    fast = tn.main(_args("dpt_hybrid_kitti_expedit_a6_28x28.yaml", kitti_weights, tmp_path / "fast",
                         "MODEL.EXPEDIT.CLUSTERING_LOCATION", "2"))  # the tiny ViT has 6 blocks
    assert set(base["depth"]) == DEPTH_METRICS and "expedit" not in fast  # every image expedited
    assert all(np.isfinite(v) for v in fast["depth"].values()) and fast["depth"] != base["depth"]

    cfg = tn.setup(_args("dpt_hybrid_kitti.yaml", kitti_weights, tmp_path / "check"))
    model = tn.Trainer.build_model(cfg).eval()
    tn.Checkpointer(model).load(str(kitti_weights))
    errors = []
    for record in DatasetCatalog.get("kitti_eigen_test"):
        with torch.no_grad():
            pred = model([DepthDatasetMapper(False)(record)])[0]["depth"].numpy()
        assert pred.shape == (352, 1216)
        top, left, h, w = record["crop_box"]
        frame = np.zeros((record["height"], record["width"]))
        frame[top:top + h, left:left + w] = np.clip(np.floor(pred.astype(np.float32) * 256) / 256, 1e-3, 80)
        gt = depths[record["depth_file_name"]]
        H, W = gt.shape
        crop = np.zeros_like(gt, dtype=bool)
        crop[int(0.40810811 * H):int(0.99189189 * H), int(0.03594771 * W):int(0.96405229 * W)] = True
        valid = crop & (gt > 1e-3) & (gt < 80)
        errors.append(np.sqrt(np.mean((gt[valid] - frame[valid]) ** 2)))
    assert base["depth"]["rmse"] == pytest.approx(np.mean(errors), rel=1e-6)
    meta = MetadataCatalog.get("kitti_eigen_test")
    assert (meta.eval_crop, meta.max_depth, meta.prediction_png_scale) == ("kitti_garg", 80.0, 256)
