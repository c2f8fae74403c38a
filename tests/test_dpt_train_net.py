"""End to end on CPU: synthetic NYUv2 in the official formats -> prepare script ->
projects/DPT/train_net.py (--eval-only baseline and expedited, a few training iterations)."""
import json

import numpy as np
import pytest
import torch

from datasets.prepare_nyuv2 import main as prepare_main
from detectron2.data import DatasetCatalog
from detectron2.engine import default_argument_parser
from expedit_d2.synthetic import write_nyuv2_mat
from tests.d2_helpers import load_train_net
from tests.project_opts import DEPTH_METRICS, DPT_TINY_OPTS, ROOT
from tests.reference_keys import official_dpt_names


@pytest.fixture(scope="module")
def nyu_root(tmp_path_factory):
    folder = tmp_path_factory.mktemp("nyu")
    labeled, splits, images, depths = write_nyuv2_mat(folder)
    root = folder / "d2"
    prepare_main(["--labeled", str(labeled), "--splits", str(splits), "--root", str(root)])
    return root, images, depths


def test_prepare_writes_the_registered_layout(nyu_root):
    root, images, depths = nyu_root
    test = json.loads((root / "nyuv2" / "test.json").read_text())
    assert [r["image_id"] for r in test] == [3, 4]
    from PIL import Image

    rgb = np.asarray(Image.open(root / "nyuv2" / test[0]["file_name"]))
    assert rgb.shape == (480, 640, 3) and np.array_equal(rgb, images[2].transpose(2, 1, 0))
    depth = np.load(root / "nyuv2" / test[0]["depth_file_name"])
    assert depth.dtype == np.float32 and np.array_equal(depth, depths[2].T)  # lossless
    # a rerun is idempotent and leaves no temporary files
    mtime = (root / "nyuv2" / test[0]["depth_file_name"]).stat().st_mtime_ns
    prepare_main(["--labeled", str(root.parent / "nyu_depth_v2_labeled.mat"),
                  "--splits", str(root.parent / "splits.mat"), "--root", str(root)])
    assert (root / "nyuv2" / test[0]["depth_file_name"]).stat().st_mtime_ns == mtime
    assert not list((root / "nyuv2").rglob("*.tmp"))


def test_missing_inputs_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="NYUv2 labeled file not found: .*nope.mat"):
        prepare_main(["--labeled", str(tmp_path / "nope.mat"), "--splits", str(tmp_path / "s.mat"),
                      "--root", str(tmp_path)])
    from dpt import load_nyuv2

    with pytest.raises(FileNotFoundError, match=r"nyuv2/test.json.*prepare_nyuv2.py"):
        load_nyuv2(tmp_path, "test")


def _train_net():
    return load_train_net("DPT")


@pytest.fixture(scope="module")
def official_weights(tmp_path_factory, dpt_cfg, seeded_dpt):
    model = seeded_dpt(dpt_cfg(hybrid=True))
    path = tmp_path_factory.mktemp("weights") / "dpt_hybrid_official_names.pt"
    torch.save(official_dpt_names(model), path)
    return path


@pytest.mark.parametrize("config", ["dpt_hybrid_nyuv2.yaml", "dpt_hybrid_nyuv2_expedit_a4_16x16.yaml"])
def test_eval_only_end_to_end(nyu_root, official_weights, tmp_path, monkeypatch, config):
    root, _, _ = nyu_root
    monkeypatch.setenv("DETECTRON2_DATASETS", str(root))
    tn = _train_net()
    args = default_argument_parser().parse_args([
        "--config-file", str(ROOT / "projects/DPT/configs" / config), "--eval-only",
        "MODEL.WEIGHTS", str(official_weights), "OUTPUT_DIR", str(tmp_path), *DPT_TINY_OPTS,
        "MODEL.EXPEDIT.NUM_CLUSTERS", "[16, 16]"])
    res = tn.main(args)
    assert set(res["depth"]) == DEPTH_METRICS
    assert all(np.isfinite(v) for v in res["depth"].values())
    assert 0 <= res["depth"]["d1"] <= 1
    assert "expedit" not in res  # every image was expedited (or the model is the baseline)
    log = (tmp_path / "log.txt").read_text()  # the project's loggers reach Detectron2's log
    table = log[log.index("Depth metrics on"):].splitlines()[1:4]
    assert table[0].startswith("|") and "abs_rel" in table[0] and "rmse" in table[0]


def test_images_smaller_than_the_cluster_grid_are_counted_in_the_results(nyu_root, official_weights,
                                                                         tmp_path, monkeypatch):
    root, _, _ = nyu_root
    monkeypatch.setenv("DETECTRON2_DATASETS", str(root))
    tn = _train_net()
    args = default_argument_parser().parse_args([
        "--config-file", str(ROOT / "projects/DPT/configs/dpt_hybrid_nyuv2_expedit_a4_16x16.yaml"),
        "--eval-only", "MODEL.WEIGHTS", str(official_weights), "OUTPUT_DIR", str(tmp_path), *DPT_TINY_OPTS,
        "MODEL.EXPEDIT.NUM_CLUSTERS", "[36, 36]"])  # NYUv2 frames have 30 x 40 tokens, fewer
    res = tn.main(args)
    assert res["expedit"] == {"unexpedited_images": len(DatasetCatalog.get("nyuv2_test"))}
    assert all(np.isfinite(v) for v in res["depth"].values())
    assert json.loads((tmp_path / "eval_results.json").read_text())["expedit"] == res["expedit"]


def test_model_device_follows_the_machine(nyu_root):
    tn = _train_net()
    cfg = tn.build_config(default_argument_parser().parse_args([
        "--config-file", str(ROOT / "projects/DPT/configs/dpt_hybrid_nyuv2.yaml")]))
    assert cfg.MODEL.DEVICE == ("cuda" if torch.cuda.is_available() else "cpu")
    cfg = tn.build_config(default_argument_parser().parse_args([
        "--config-file", str(ROOT / "projects/DPT/configs/dpt_hybrid_nyuv2.yaml"), "MODEL.DEVICE", "cuda:1"]))
    assert cfg.MODEL.DEVICE == "cuda:1"  # an explicit value wins


def test_a_few_training_iterations(nyu_root, tmp_path, monkeypatch):
    root, _, _ = nyu_root
    monkeypatch.setenv("DETECTRON2_DATASETS", str(root))
    tn = _train_net()
    args = default_argument_parser().parse_args([
        "--config-file", str(ROOT / "projects/DPT/configs/dpt_hybrid_nyuv2_expedit_a4_16x16.yaml"),
        "OUTPUT_DIR", str(tmp_path), "SOLVER.MAX_ITER", "3", "SOLVER.IMS_PER_BATCH", "1",
        "TEST.EVAL_PERIOD", "0", "SOLVER.CHECKPOINT_PERIOD", "100", *DPT_TINY_OPTS,
        "MODEL.EXPEDIT.NUM_CLUSTERS", "[16, 16]"])
    tn.main(args)
    records = [json.loads(line) for line in (tmp_path / "metrics.json").read_text().splitlines()]
    losses = [r["total_loss"] for r in records if "total_loss" in r]  # = loss_depth, the only loss
    assert losses and all(np.isfinite(losses))
    assert (tmp_path / "model_final.pth").exists()


def test_ctrl_c_during_training_says_how_to_resume(nyu_root, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.processes import process_group

    root, _, _ = nyu_root
    cmd = [sys.executable, str(ROOT / "projects/DPT/train_net.py"), "--config-file",
           str(ROOT / "projects/DPT/configs/dpt_hybrid_nyuv2_expedit_a4_16x16.yaml"),
           "OUTPUT_DIR", str(tmp_path), "SOLVER.MAX_ITER", "100000", "SOLVER.IMS_PER_BATCH", "1",
           "TEST.EVAL_PERIOD", "0", *DPT_TINY_OPTS, "MODEL.EXPEDIT.NUM_CLUSTERS", "[16, 16]"]
    log = tmp_path / "log.txt"
    with process_group(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                       env={**os.environ, "DETECTRON2_DATASETS": str(root)}) as proc:
        # generous: on a loaded 2-core machine start-up alone can take minutes, and the
        # interrupt is meant for the training loop, not for the imports
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and not (
                log.exists() and "Starting training" in log.read_text()):
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert "Starting training" in log.read_text(), "training did not start within 300 s"
        os.killpg(proc.pid, signal.SIGINT)
        err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("interrupted: checkpoints saved so far are in OUTPUT_DIR")


def test_eval_only_with_onednn_linears_gives_the_same_metrics(nyu_root, official_weights, tmp_path, monkeypatch):
    """MODEL.CPU_LINEAR onednn through train_net.py: the official-name checkpoint loads into
    the OneDNNLinear layers and the metrics equal the BLAS run's up to float rounding."""
    from expedit_d2.cpu_linear import OneDNNLinear

    root, _, _ = nyu_root
    monkeypatch.setenv("DETECTRON2_DATASETS", str(root))
    tn = _train_net()
    results, built = {}, []
    build_model = tn.Trainer.build_model.__func__
    monkeypatch.setattr(tn.Trainer, "build_model", classmethod(lambda cls, cfg: built.append(build_model(cls, cfg))
                                                               or built[-1]))
    for mode in ("blas", "onednn"):
        args = default_argument_parser().parse_args([
            "--config-file", str(ROOT / "projects/DPT/configs/dpt_hybrid_nyuv2_expedit_a4_16x16.yaml"),
            "--eval-only", "MODEL.WEIGHTS", str(official_weights), "OUTPUT_DIR", str(tmp_path / mode), *DPT_TINY_OPTS,
            "MODEL.EXPEDIT.NUM_CLUSTERS", "[16, 16]", "MODEL.CPU_LINEAR", mode])
        results[mode] = tn.main(args)["depth"]
    assert [any(isinstance(m, OneDNNLinear) for m in model.modules()) for model in built] == [False, True]
    assert results["onednn"].keys() == results["blas"].keys() == DEPTH_METRICS
    for key, value in results["blas"].items():
        assert results["onednn"][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
