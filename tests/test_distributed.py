"""Evaluation in several CPU processes (gloo, :mod:`expedit_d2.launch`) through the projects'
``train_net.py --eval-only``: exactly the metrics of one process, every image evaluated
once (an odd count, so the ranks' shares differ), results written by rank 0 only, and a
rank that raises ends the run with its error (on one machine and on two).

Each run is a real ``train_net.py`` subprocess (its processes spawn fresh interpreters that
import torch and Detectron2), so the runs are few and each serves several assertions. Every
process runs one intra-op thread (``OMP_NUM_THREADS=1``): the one-process and the
two-process runs then do the same arithmetic per image, and the metrics compare exactly.
"""
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from detectron2.engine import default_argument_parser
from expedit_d2.engine import EVAL_RESULTS, load_project
from expedit_d2.fileio import atomic_write
from expedit_d2.synthetic import write_coco, write_nyuv2_mat

ROOT = Path(__file__).resolve().parents[1]
N_IMAGES = 5  # odd: rank 0 evaluates 3, rank 1 evaluates 2
TIMEOUT_S = 300  # a run that hangs fails the test instead of the suite

M2F_CONFIG = str(ROOT / "projects/Mask2Former/configs/demo/tiny_swin_coco_panoptic.yaml")
M2F_OPTS = ["MODEL.DEVICE", "cpu", "MODEL.SWIN.DEPTHS", "[2, 2, 2, 2]", "MODEL.SWIN.EMBED_DIM", "16",
            "MODEL.SEM_SEG_HEAD.CONVS_DIM", "32", "MODEL.SEM_SEG_HEAD.MASK_DIM", "32",
            "MODEL.MASK_FORMER.HIDDEN_DIM", "32", "MODEL.MASK_FORMER.DEC_LAYERS", "3",
            "MODEL.MASK_FORMER.TEST.OBJECT_MASK_THRESHOLD", "0.0", "MODEL.MASK_FORMER.TEST.OVERLAP_THRESHOLD", "0.0",
            "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "96",
            "DATASETS.TRAIN", "('coco_2017_val_panoptic_with_sem_seg',)"]
DPT_CONFIG = str(ROOT / "projects/DPT/configs/dpt_hybrid_nyuv2_expedit_a4_16x16.yaml")
DPT_OPTS = ["MODEL.DEVICE", "cpu", "MODEL.VIT.EMBED_DIM", "32", "MODEL.VIT.DEPTH", "6", "MODEL.VIT.NUM_HEADS", "2",
            "MODEL.VIT.IMG_SIZE", "96", "MODEL.VIT.NUM_CLASSES", "10", "MODEL.VIT.HYBRID_LAYERS", "[1, 1, 1]",
            "MODEL.VIT.TAPS", "[0, 1, 3, 5]", "MODEL.DPT.REASSEMBLE_FEATURES", "[16, 24, 32, 32]",
            "MODEL.DPT.FUSION_FEATURES", "16", "MODEL.EXPEDIT.NUM_CLUSTERS", "[16, 16]", "DATALOADER.NUM_WORKERS", "0"]


def _random_weights(project, config, opts, path):
    """The project's model for ``config`` + ``opts`` with seeded random weights, saved in
    Detectron2's format (``--eval-only`` needs a checkpoint that covers the model)."""
    cfg = project.build_config(default_argument_parser().parse_args(["--config-file", config, *opts]))
    torch.manual_seed(0)
    model = project.Trainer.build_model(cfg).eval()
    torch.save({"model": model.state_dict()}, path)
    return cfg, model


def _shift(a: np.ndarray, fill) -> np.ndarray:
    """``a`` (.., H, W) moved 2 pixels right, ``fill`` coming in on the left."""
    out = np.full_like(a, fill)
    out[..., 2:] = a[..., :-2]
    return out


def _predictions_as_ground_truth(coco: Path, records, outputs, meta, n_instances: int = 3):
    """Rewrite the val split's ground truth from the model's own predictions moved 2 pixels
    right: panoptic PNGs + JSON from its panoptic segments, semantic PNGs from its semantic
    argmax, the instances JSON from its ``n_instances`` best-scored instances. Random weights
    then score non-trivially (matches with IoU < 1, small segments unmatched), so PQ, mask AP
    and mIoU are sums of many float terms, which an order of summation that differed between
    one and two processes would change."""
    import pycocotools.mask as mask_util

    from expedit_d2.evaluation.panoptic import id2rgb, mask_bbox

    to_dataset = {v: k for k, v in meta.stuff_dataset_id_to_contiguous_id.items()}
    pan = json.loads((coco / "panoptic_val2017.json").read_text())
    instances = json.loads((coco / "annotations" / "instances_val2017.json").read_text())
    pan["annotations"], instances["annotations"] = [], []
    for rec, out in zip(records, outputs):
        ids, infos = out["panoptic_seg"]
        ids = _shift(ids.numpy(), 0)
        gt = np.zeros(ids.shape, np.int64)
        segments = []
        for info in infos:
            mask = ids == info["id"]
            if mask.any():
                cat = to_dataset[info["category_id"]]
                gt[mask] = cat * 1000 + info["id"]
                segments.append({"id": cat * 1000 + info["id"], "category_id": cat, "iscrowd": 0,
                                 "area": int(mask.sum()), "bbox": mask_bbox(mask)})
        inst = out["instances"]
        for k in inst.scores.argsort(descending=True)[:n_instances].tolist():
            mask = _shift(inst.pred_masks[k].numpy() > 0, False)
            if mask.any():
                rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
                instances["annotations"].append({
                    "id": len(instances["annotations"]) + 1, "image_id": rec["image_id"], "iscrowd": 0,
                    "category_id": to_dataset[int(inst.pred_classes[k])], "area": float(mask.sum()),
                    "bbox": mask_bbox(mask), "segmentation": {"size": list(mask.shape),
                                                              "counts": rle["counts"].decode("ascii")}})
        sem = _shift(out["sem_seg"].argmax(0).numpy().astype(np.uint8), 255)
        name = Path(rec["pan_seg_file_name"]).name
        atomic_write(coco / "panoptic_val2017" / name, lambda p: Image.fromarray(id2rgb(gt)).save(p, format="PNG"))
        atomic_write(coco / "panoptic_semseg_val2017" / name, lambda p: Image.fromarray(sem).save(p, format="PNG"))
        pan["annotations"].append({"image_id": rec["image_id"], "file_name": name, "segments_info": segments})
    atomic_write(coco / "panoptic_val2017.json", json.dumps(pan))
    atomic_write(coco / "annotations" / "instances_val2017.json", json.dumps(instances))
    return sum(len(a["segments_info"]) for a in pan["annotations"]), len(instances["annotations"])


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    """Synthetic COCO (real layout, N_IMAGES val images) whose ground truth is the tiny
    Mask2Former's own prediction moved by 2 pixels, and that model's weights."""
    from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog

    from mask2former.data import register_all

    root = tmp_path_factory.mktemp("coco_dist")
    coco_dir = write_coco(root, {"val": N_IMAGES}, height=64, width=96)
    register_all(str(root))
    project = load_project(ROOT / "projects/Mask2Former")
    cfg, model = _random_weights(project, M2F_CONFIG, M2F_OPTS, root / "m2f.pth")
    name = cfg.DATASETS.TEST[0]
    records = DatasetCatalog.get(name)
    mapper = DatasetMapper(cfg, is_train=False)
    with torch.no_grad():
        outputs = [model([mapper(r)])[0] for r in records]
    n_segments, n_instances = _predictions_as_ground_truth(coco_dir, records, outputs, MetadataCatalog.get(name))
    assert n_segments >= 2 * N_IMAGES and n_instances >= 2 * N_IMAGES  # something to match in every image
    return root, root / "m2f.pth"


@pytest.fixture(scope="module")
def nyu(tmp_path_factory):
    """Synthetic NYUv2 prepared by the project's script (N_IMAGES test frames) and the tiny
    expedited DPT's weights."""
    from datasets.prepare_nyuv2 import main as prepare_nyuv2

    folder = tmp_path_factory.mktemp("nyu_dist")
    labeled, splits, _, _ = write_nyuv2_mat(folder, n=N_IMAGES + 1, n_test=N_IMAGES)
    root = folder / "d2"
    prepare_nyuv2(["--labeled", str(labeled), "--splits", str(splits), "--root", str(root)])
    _random_weights(load_project(ROOT / "projects/DPT"), DPT_CONFIG, DPT_OPTS, folder / "dpt.pth")
    return root, folder / "dpt.pth"


def _env(datasets_root) -> dict:
    return {**os.environ, "DETECTRON2_DATASETS": str(datasets_root), "OMP_NUM_THREADS": "1"}


def _cmd(project, config, opts, weights, out, *flags):
    return [sys.executable, str(ROOT / "projects" / project / "train_net.py"), "--config-file", config, "--eval-only",
            *flags, *opts, "MODEL.WEIGHTS", str(weights), "OUTPUT_DIR", str(out)]


def _run(cmd, env) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=TIMEOUT_S, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _results(out: Path) -> dict:
    return json.loads((out / EVAL_RESULTS).read_text())


def _assert_same_metrics(got: dict, expected: dict) -> None:
    """Every metric equal to the bit: compared as JSON with sorted keys (floats by ``repr``,
    the shortest text that reads back to the same double; a NaN, e.g. COCO's AP of an
    absent size range, equals a NaN)."""
    assert json.dumps(got, sort_keys=True) == json.dumps(expected, sort_keys=True), (got, expected)


def _batches(log: Path) -> int:
    """How many images Detectron2's ``inference_on_dataset`` gave this rank (batch 1)."""
    return int(re.search(r"Start inference on (\d+) batches", log.read_text()).group(1))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_machines(out: Path, weights, env) -> tuple[list[int], list[str]]:
    """The DPT evaluation as two "machines" of one process each (``--num-machines 2``,
    ``--machine-rank`` 0 and 1, one ``--dist-url``), here two launches on this host run side
    by side; returns their exit statuses and stderr texts."""
    url = f"tcp://127.0.0.1:{_free_port()}"
    logs = [out.with_name(f"{out.name}.machine{rank}.stderr") for rank in (0, 1)]
    with contextlib.ExitStack() as stack:
        machines = [subprocess.Popen(_cmd("DPT", DPT_CONFIG, DPT_OPTS, weights, out, "--num-gpus", "1",
                                          "--num-machines", "2", "--machine-rank", str(rank), "--dist-url", url),
                                     stdout=subprocess.DEVNULL, stderr=stack.enter_context(open(log, "w")),
                                     env=env, cwd=ROOT)
                     for rank, log in enumerate(logs)]
        try:
            codes = [m.wait(timeout=TIMEOUT_S) for m in machines]
        finally:
            for m in machines:
                m.kill()
    return codes, [log.read_text() for log in logs]


def test_mask2former_two_processes_give_the_metrics_of_one(coco, tmp_path):
    """Panoptic (our PQ evaluator), instance (COCOEvaluator) and semantic (SemSegEvaluator)
    in one run, on 2 CPU processes (``--num-gpus 2`` on a machine without GPUs) and on 1."""
    root, weights = coco
    env = _env(root)
    one, two = tmp_path / "one", tmp_path / "two"
    _run(_cmd("Mask2Former", M2F_CONFIG, M2F_OPTS, weights, one, "--num-gpus", "1"), env)
    _run(_cmd("Mask2Former", M2F_CONFIG, M2F_OPTS, weights, two, "--num-gpus", "2"), env)
    res_one, res_two = _results(one), _results(two)
    _assert_same_metrics(res_two, res_one)
    assert set(res_one) == {"panoptic_seg", "segm", "bbox", "sem_seg"}
    # non-trivial: the ground truth is the prediction moved by 2 pixels (the boxes of the
    # large masks still overlap at IoU > 0.95, so box AP may be 100; the masks' is not)
    for task, metric in (("panoptic_seg", "PQ"), ("segm", "AP"), ("sem_seg", "mIoU")):
        assert 5 < res_one[task][metric] < 100, (task, res_one[task])
    assert 5 < res_one["bbox"]["AP"] <= 100, res_one["bbox"]
    # the images were shared out (3 + 2), and each evaluator saw each image once
    assert (_batches(one / "log.txt"), _batches(two / "log.txt"), _batches(two / "log.txt.rank1")) == (5, 3, 2)
    for out in (one, two):
        assert f"Panoptic quality on {N_IMAGES} images" in (out / "log.txt").read_text()
        predictions = torch.load(out / "inference" / "instances_predictions.pth")
        assert sorted(p["image_id"] for p in predictions) == list(range(1, N_IMAGES + 1))
        sem = json.loads((out / "inference" / "sem_seg_predictions.json").read_text())
        pairs = [(p["file_name"], p["category_id"]) for p in sem]
        assert len(set(pairs)) == len(pairs) and len({f for f, _ in pairs}) == N_IMAGES
    # rank 0 alone writes the results and the evaluators' files
    assert "Panoptic quality on" not in (two / "log.txt.rank1").read_text()
    assert sorted(p.name for p in two.iterdir() if p.name.startswith(EVAL_RESULTS)) == [EVAL_RESULTS]


def test_dpt_on_two_machines_gives_the_metrics_of_one_process(nyu, tmp_path):
    """--num-machines 2 --machine-rank 0/1 --dist-url tcp://...: two launches (here on one
    host) of one process each make one 2-rank run; the depth metrics equal one process's."""
    root, weights = nyu
    env = _env(root)
    one, two = tmp_path / "one", tmp_path / "two"
    _run(_cmd("DPT", DPT_CONFIG, DPT_OPTS, weights, one), env)
    codes, errs = _two_machines(two, weights, env)
    assert codes == [0, 0], "\n".join(e[-3000:] for e in errs)
    res_one, res_two = _results(one), _results(two)
    _assert_same_metrics(res_two, res_one)
    assert set(res_one) == {"depth"} and all(np.isfinite(v) and v > 0 for v in res_one["depth"].values())
    assert (_batches(one / "log.txt"), _batches(two / "log.txt"), _batches(two / "log.txt.rank1")) == (5, 3, 2)
    assert f"Depth metrics on {N_IMAGES} images (0 without valid pixels)" in (two / "log.txt").read_text()


def _bad_last_image(root: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the NYUv2 root whose last test image is not an image (rank 1 of 2 reads it:
    the last of the images' contiguous shares); returns (the copy, the bad file)."""
    bad_root = tmp_path / "datasets"
    shutil.copytree(root, bad_root)
    test = json.loads((bad_root / "nyuv2" / "test.json").read_text())
    bad = bad_root / "nyuv2" / test[-1]["file_name"]
    bad.write_bytes(b"not an image")
    return bad_root, bad


def _assert_failed_with(err: str, header: str, last_line_start: str) -> None:
    """``train_net.py: <header>`` then the failed rank's traceback, its exception last."""
    err = err.strip()
    assert f"train_net.py: {header}" in err, err[-3000:]
    assert "Traceback (most recent call last):" in err  # the rank's own traceback, for the frames
    assert err.splitlines()[-1].startswith(last_line_start), err[-3000:]


def test_a_rank_that_raises_ends_the_run_with_its_error(nyu, tmp_path):
    """Rank 1 raises on the bad image (possibly while rank 0 is still evaluating, else while
    it waits in a collective); the run ends at once with rank 1's error, exit status 1."""
    bad_root, bad = _bad_last_image(nyu[0], tmp_path)
    proc = subprocess.run(_cmd("DPT", DPT_CONFIG, DPT_OPTS, nyu[1], tmp_path / "out", "--num-gpus", "2"),
                          capture_output=True, text=True, env=_env(bad_root), timeout=TIMEOUT_S, cwd=ROOT)
    assert proc.returncode == 1, proc.stderr[-3000:]
    _assert_failed_with(proc.stderr, "process 1 (rank 1 of 2) failed",
                        "PIL.UnidentifiedImageError: cannot identify image file")
    assert str(bad) in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "out" / EVAL_RESULTS).exists()


def test_on_two_machines_a_rank_that_raises_ends_both(nyu, tmp_path):
    """--num-machines 2: machine 1's rank raises on the bad image and machine 1 ends with that
    error; machine 0 (its rank waiting for rank 1 in a collective) ends on the lost
    connection instead of waiting out the process group's 30-minute timeout."""
    bad_root, bad = _bad_last_image(nyu[0], tmp_path)
    codes, errs = _two_machines(tmp_path / "out", nyu[1], _env(bad_root))
    assert codes == [1, 1], "\n".join(e[-3000:] for e in errs)
    _assert_failed_with(errs[1], "process 0 (rank 1 of 2) failed",
                        "PIL.UnidentifiedImageError: cannot identify image file")
    assert str(bad) in errs[1].strip().splitlines()[-1]
    _assert_failed_with(errs[0], "process 0 (rank 0 of 2) failed", "RuntimeError: ")
    assert "Connection closed by peer" in errs[0].strip().splitlines()[-1]
    assert not (tmp_path / "out" / EVAL_RESULTS).exists()


def _never_called():
    raise AssertionError("launch ran the function despite bad flags")


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_processes=0), "--num-gpus 0: expected an integer >= 1"),
    (dict(num_processes=2, num_machines=0), "--num-machines 0: expected an integer >= 1"),
    (dict(num_processes=1, num_machines=2, machine_rank=2, dist_url="tcp://127.0.0.1:1"),
     "--machine-rank 2: expected 0 <= rank < --num-machines 2"),
    (dict(num_processes=1, num_machines=2, machine_rank=1, dist_url="auto"),
     "--dist-url 'auto' works on one machine only"),
    (dict(num_processes=2, backend="mpi"), "--dist-backend 'mpi': expected one of"),
])
def test_launch_flags_that_cannot_work_are_named(kwargs, message):
    from expedit_d2.launch import LaunchError, launch

    with pytest.raises(LaunchError, match=re.escape(message)):
        launch(_never_called, **kwargs)


def test_backend_auto_follows_the_machine_and_cpu_processes_only_evaluate(tmp_path):
    from expedit_d2.launch import LaunchError, resolve_backend

    assert resolve_backend("auto") == ("nccl" if torch.cuda.is_available() else "gloo")
    assert resolve_backend("gloo") == "gloo"
    if not torch.cuda.is_available():
        with pytest.raises(LaunchError, match="--dist-backend nccl needs CUDA"):
            resolve_backend("nccl")
    # several gloo processes train nothing: train_net.py says so (exit 2) before any process starts
    proc = subprocess.run([sys.executable, str(ROOT / "projects/DPT/train_net.py"), "--config-file", DPT_CONFIG,
                           "--num-gpus", "2", "--dist-backend", "gloo", "OUTPUT_DIR", str(tmp_path)],
                          capture_output=True, text=True, timeout=TIMEOUT_S, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "train_net.py: error: several CPU processes (gloo) evaluate only: add --eval-only")
    assert not any(tmp_path.iterdir())
