"""YouTube-VIS data: registration of the official dataset names and paths, the JSON loader (per-frame
objects, contiguous ids, sets without annotations), the inference mapper, the synthetic writer,
and the evaluator on the synthetic set with the ground truth as predictions."""
import json
import os
import uuid

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_util

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode

from expedit_d2.synthetic import write_ytvis

NAMES = [f"ytvis_{year}_{split}" for year in (2019, 2021) for split in ("train", "val", "test")]
N_FRAMES, H, W = 5, 48, 64


def _unregister():
    for name in NAMES:
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)


@pytest.fixture(scope="module")
def ytvis_root(tmp_path_factory):
    """A dataset root with 2019 train (annotated), 2019 valid (no annotations, as published)
    and 2021 valid (annotated); no test sets and no 2021 train. Returns (root, {(year, split):
    (json path, masks)})."""
    from mask2former_video.data.ytvis import YTVIS_CATEGORIES_2019 as C19, YTVIS_CATEGORIES_2021 as C21

    root = tmp_path_factory.mktemp("datasets")
    written = {(2019, "train"): write_ytvis(root, C19, 2019, "train", n_frames=N_FRAMES, height=H, width=W),
               (2019, "valid"): write_ytvis(root, C19, 2019, "valid", n_frames=N_FRAMES, height=H, width=W,
                                            with_annotations=False),
               (2021, "valid"): write_ytvis(root, C21, 2021, "valid", n_videos=3, n_frames=N_FRAMES, height=H,
                                            width=W, seed=1)}
    return root, written


@pytest.fixture
def registered(ytvis_root):
    """The six official names registered under the synthetic root; removed afterwards, so the
    catalog is left as registration at the default root would find it."""
    from mask2former_video.data import register_ytvis

    root, written = ytvis_root
    _unregister()
    register_ytvis(str(root))
    yield root, written
    _unregister()


def decode(segm) -> np.ndarray:
    return mask_util.decode(segm).astype(bool)


# --------------------------------------------------------------------------------------
# registration
# --------------------------------------------------------------------------------------
def test_official_names_paths_and_metadata(registered, monkeypatch):
    from mask2former_video.data.ytvis import YTVIS_CATEGORIES_2019, YTVIS_CATEGORIES_2021

    root, _ = registered
    assert set(NAMES) <= set(DatasetCatalog.list())
    for year, cats in ((2019, YTVIS_CATEGORIES_2019), (2021, YTVIS_CATEGORIES_2021)):
        assert [c["id"] for c in cats] == list(range(1, 41)) and all(c["isthing"] for c in cats)
        for split, folder in (("train", "train"), ("val", "valid"), ("test", "test")):
            meta = MetadataCatalog.get(f"ytvis_{year}_{split}")
            assert meta.json_file == os.path.join(str(root), f"ytvis_{year}", f"{folder}.json")
            assert meta.image_root == os.path.join(str(root), f"ytvis_{year}", folder, "JPEGImages")
            assert meta.evaluator_type == "ytvis" and meta.dataset_root == str(root)
            assert meta.thing_classes == [c["name"] for c in cats]
            assert meta.thing_colors == [c["color"] for c in cats]
            assert meta.thing_dataset_id_to_contiguous_id == {i: i - 1 for i in range(1, 41)}
    assert MetadataCatalog.get("ytvis_2019_val").thing_classes[:3] == ["person", "giant_panda", "lizard"]
    assert MetadataCatalog.get("ytvis_2021_val").thing_classes[:3] == ["airplane", "bear", "bird"]
    assert {c["name"] for c in YTVIS_CATEGORIES_2021} - {c["name"] for c in YTVIS_CATEGORIES_2019} == {
        "bird", "car", "flying_disc", "squirrel", "whale"}
    # the default root is $DETECTRON2_DATASETS; a new root registers the names again
    from mask2former_video.data import register_ytvis

    monkeypatch.setenv("DETECTRON2_DATASETS", "/elsewhere")
    register_ytvis()
    assert MetadataCatalog.get("ytvis_2021_test").json_file == os.path.join("/elsewhere", "ytvis_2021", "test.json")


def test_missing_json_raises_when_loaded_naming_the_path(registered):
    root, _ = registered  # registration itself read nothing: 2021 train and the test sets are absent
    path = os.path.join(str(root), "ytvis_2021", "train.json")
    with pytest.raises(FileNotFoundError, match=f"not found: {path}"):
        DatasetCatalog.get("ytvis_2021_train")


# --------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------
def test_load_train_per_frame_objects(registered):
    root, written = registered
    json_path, truth = written[2019, "train"]
    gt = json.loads(json_path.read_text())
    videos = DatasetCatalog.get("ytvis_2019_train")
    assert [v["video_id"] for v in videos] == [1, 2]
    for video in videos:
        vid = video["video_id"]
        (entry,) = [v for v in gt["videos"] if v["id"] == vid]
        assert (video["height"], video["width"], video["length"]) == (H, W, N_FRAMES)
        assert video["file_names"] == [os.path.join(str(root), "ytvis_2019", "train", "JPEGImages", f)
                                       for f in entry["file_names"]]
        assert all(os.path.isfile(f) for f in video["file_names"])
        anns = [a for a in gt["annotations"] if a["video_id"] == vid]
        assert len(video["annotations"]) == N_FRAMES
        # object 0 throughout, object 1 from frame 1 (late), object 2 up to frame 3 (leaves early)
        present = [[a["id"] for a in frame] for frame in video["annotations"]]
        ids = [a["id"] for a in anns]
        assert present == [[ids[0], ids[2]]] + [ids] * 3 + [[ids[0], ids[1]]]
        for t, frame in enumerate(video["annotations"]):
            for obj in frame:
                k = ids.index(obj["id"])
                assert obj["category_id"] == anns[k]["category_id"] - 1  # contiguous
                assert obj["iscrowd"] == 0 and obj["bbox_mode"] == BoxMode.XYWH_ABS
                assert obj["bbox"] == anns[k]["bboxes"][t]
                assert np.array_equal(decode(obj["segmentation"]), truth[vid][k, t])


@pytest.mark.parametrize("annotations", ["absent", None, []])
def test_a_set_without_annotations_loads_empty_frames(registered, tmp_path, annotations):
    from mask2former_video.data import load_ytvis_json

    root, written = registered
    if annotations == "absent":  # as written (and as the public valid.json has it)
        videos = DatasetCatalog.get("ytvis_2019_val")
        assert "annotations" not in json.loads(written[2019, "valid"][0].read_text())
    else:
        data = json.loads(written[2019, "valid"][0].read_text())
        data["annotations"] = annotations
        (tmp_path / "v.json").write_text(json.dumps(data))
        videos = load_ytvis_json(tmp_path / "v.json", "frames")
    assert len(videos) == 2
    assert all(v["annotations"] == [[]] * N_FRAMES and len(v["file_names"]) == N_FRAMES for v in videos)


def test_loader_rules_of_the_official_loader(tmp_path):
    """Objects need a box and a segmentation in a frame; polygons of < 3 points are dropped;
    uncompressed RLE is compressed; ids stay raw without a dataset name."""
    from mask2former_video.data import load_ytvis_json

    box = [1.0, 1.0, 2.0, 2.0]
    poly = [1.0, 1.0, 3.0, 1.0, 3.0, 3.0]
    raw = {"size": [4, 5], "counts": [6, 2, 2, 2, 8]}
    data = {"videos": [{"id": 9, "length": 4, "height": 4, "width": 5, "file_names": [f"v/{i}.jpg" for i in range(5)]}],
            "categories": [{"id": 3, "name": "a"}, {"id": 7, "name": "b"}],
            "annotations": [{"id": 1, "video_id": 9, "category_id": 7, "iscrowd": 0, "bboxes": [box, None, box, box],
                             "segmentations": [[poly], [poly], [[1.0, 2.0]], raw]},
                            {"id": 2, "video_id": 5, "category_id": 3, "bboxes": [box] * 4,  # no such video
                             "segmentations": [[poly]] * 4}]}
    path = tmp_path / "a.json"
    path.write_text(json.dumps(data))
    (video,) = load_ytvis_json(path, "root")
    assert video["file_names"] == [os.path.join("root", f"v/{i}.jpg") for i in range(4)]  # length frames
    frames = video["annotations"]
    assert [len(f) for f in frames] == [1, 0, 0, 1]  # no box in frame 1, no valid polygon in frame 2
    assert frames[0][0]["segmentation"] == [poly] and frames[0][0]["category_id"] == 7  # raw id
    assert isinstance(frames[3][0]["segmentation"]["counts"], bytes)
    assert decode(frames[3][0]["segmentation"]).sum() == 4
    name = f"ytvis_rules_{uuid.uuid4().hex[:8]}"  # a fresh dataset name: the mapping is recorded there
    (video,) = load_ytvis_json(path, "root", dataset_name=name)
    assert video["annotations"][0][0]["category_id"] == 1  # 7 is the second category by id
    meta = MetadataCatalog.get(name)
    assert meta.thing_classes == ["a", "b"] and meta.thing_dataset_id_to_contiguous_id == {3: 0, 7: 1}
    MetadataCatalog.remove(name)
    MetadataCatalog.get(name).set(thing_classes=["a", "c"], thing_dataset_id_to_contiguous_id={3: 0, 7: 1})
    with pytest.raises(ValueError, match=f"differ from those dataset '{name}' is registered with"):
        load_ytvis_json(path, "root", dataset_name=name)
    MetadataCatalog.remove(name)
    data["annotations"][0]["category_id"] = 5
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="annotation 1 of video 9 has category_id 5, not among the file's categories"):
        load_ytvis_json(path, "root", dataset_name=name)
    MetadataCatalog.remove(name)


# --------------------------------------------------------------------------------------
# mapper
# --------------------------------------------------------------------------------------
def test_mapper_reads_and_resizes_every_frame(registered):
    from detectron2.config import get_cfg

    from mask2former_video.data import YTVISDatasetMapper

    video = DatasetCatalog.get("ytvis_2019_train")[0]
    cfg = get_cfg()
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 96, 1000
    out = YTVISDatasetMapper(cfg, False)(video)
    assert set(out) == {"image", "file_names", "height", "width", "length", "video_id"}
    assert (out["height"], out["width"], out["length"], out["video_id"]) == (H, W, N_FRAMES, video["video_id"])
    assert out["file_names"] == video["file_names"] and "annotations" in video  # the input is kept
    assert len(out["image"]) == N_FRAMES
    assert all(im.shape == (3, 96, 128) and im.dtype == torch.uint8 for im in out["image"])
    cfg.INPUT.MAX_SIZE_TEST = 100  # the longer edge capped: 48x64 -> 75x100
    cfg.INPUT.FORMAT = "RGB"
    rgb = YTVISDatasetMapper(cfg)(video)["image"]
    assert all(im.shape == (3, 75, 100) for im in rgb)
    cfg.INPUT.FORMAT = "BGR"
    bgr = YTVISDatasetMapper(cfg)(video)["image"]
    assert all(torch.equal(a, b.flip(0)) for a, b in zip(rgb, bgr))
    with pytest.raises(NotImplementedError, match="inference only"):
        YTVISDatasetMapper(cfg, True)


# --------------------------------------------------------------------------------------
# writer
# --------------------------------------------------------------------------------------
def test_writer_round_trip(ytvis_root):
    from mask2former_video.data.ytvis import YTVIS_CATEGORIES_2019, YTVIS_CATEGORIES_2021

    from PIL import Image

    root, written = ytvis_root
    for (year, split), (json_path, truth) in written.items():
        assert json_path == root / f"ytvis_{year}" / f"{split}.json"
        gt = json.loads(json_path.read_text())
        official = YTVIS_CATEGORIES_2019 if year == 2019 else YTVIS_CATEGORIES_2021
        assert [(c["id"], c["name"]) for c in gt["categories"]] == [(c["id"], c["name"]) for c in official]
        for v in gt["videos"]:
            assert v["length"] == N_FRAMES and (v["height"], v["width"]) == (H, W)
            assert [os.path.basename(f) for f in v["file_names"]] == [f"{5 * t:05d}.jpg" for t in range(N_FRAMES)]
            for f in v["file_names"]:
                with Image.open(root / f"ytvis_{year}" / split / "JPEGImages" / f) as im:
                    assert im.format == "JPEG" and im.size == (W, H) and im.mode == "RGB"
        assert not list((root / f"ytvis_{year}").rglob("*.tmp"))
        if split == "valid" and year == 2019:
            assert "annotations" not in gt and set(truth) == {1, 2}
            continue
        for vid, masks in truth.items():
            anns = [a for a in gt["annotations"] if a["video_id"] == vid]
            assert masks.shape == (len(anns), N_FRAMES, H, W) == (3, N_FRAMES, H, W)
            for a, track in zip(anns, masks):
                assert a["iscrowd"] == 0 and 1 <= a["category_id"] <= 40
                for t, m in enumerate(track):
                    if not m.any():
                        assert a["segmentations"][t] is None and a["bboxes"][t] is None and a["areas"][t] is None
                        continue
                    assert isinstance(a["segmentations"][t]["counts"], str)
                    assert np.array_equal(decode(a["segmentations"][t]), m)
                    assert a["areas"][t] == m.sum()
                    assert a["bboxes"][t] == list(mask_util.toBbox(a["segmentations"][t]))
            assert not (masks.sum(0) > 1).any()  # the objects never overlap
    again = write_ytvis(root / "again", YTVIS_CATEGORIES_2021, 2021, "valid", n_videos=3, n_frames=N_FRAMES,
                        height=H, width=W, seed=1)
    assert all(np.array_equal(again[1][v], written[2021, "valid"][1][v]) for v in again[1])  # a function of the seed
    with pytest.raises(ValueError, match="categories must be a non-empty list"):
        write_ytvis(root / "bad", [], 2020)


# --------------------------------------------------------------------------------------
# the evaluator on the synthetic set
# --------------------------------------------------------------------------------------
def test_evaluator_on_the_ground_truth_as_predictions(registered, tmp_path):
    from expedit_d2.evaluation import YTVISEvaluator

    _, written = registered
    json_path, truth = written[2021, "valid"]
    gt = json.loads(json_path.read_text())
    ids = MetadataCatalog.get("ytvis_2021_val").thing_dataset_id_to_contiguous_id
    ev = YTVISEvaluator("ytvis_2021_val", output_dir=str(tmp_path), distributed=False)
    ev.reset()
    for video in DatasetCatalog.get("ytvis_2021_val"):
        vid = video["video_id"]
        labels = [ids[a["category_id"]] for a in gt["annotations"] if a["video_id"] == vid]
        ev.process([{"video_id": vid, "length": video["length"]}],
                   {"pred_scores": [0.9] * len(labels), "pred_labels": labels,
                    "pred_masks": [torch.from_numpy(m) for m in truth[vid]]})
    m = ev.evaluate()["segm"]
    # 99.99999999999997: the API's precision tp / (tp + fp + eps)
    for key in ("AP", "AP50", "AP75", "APs"):
        assert m[key] == pytest.approx(100.0, abs=1e-9) and m[key] <= 100.0
    assert np.isnan(m["APm"]) and np.isnan(m["APl"])  # 48x64 frames: every object is small
