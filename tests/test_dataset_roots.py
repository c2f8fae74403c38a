"""The projects' dataset registrations follow the dataset root within one process: a second
registration from another root ($DETECTRON2_DATASETS or an argument) replaces the first,
the same root keeps it, and a dataset registered by the user under the same name is kept."""
import json

import pytest

from detectron2.data import DatasetCatalog, MetadataCatalog

from dpt import register_nyuv2
from expedit_d2.datasets import register_from_root
from mask2former.data import register_all

NAMES = ("nyuv2_train", "nyuv2_test", "roots_test_dataset") + tuple(
    f"{prefix}_{split}{suffix}" for split in ("train", "val") for prefix, suffix in
    (("ade20k_panoptic", ""), ("ade20k_instance", ""), ("coco_2017", "_panoptic_with_sem_seg")))


@pytest.fixture
def clean_catalog():
    """Leaves the names these tests register as they found them (absent or registered)."""
    saved = {n: (DatasetCatalog[n], MetadataCatalog.get(n).as_dict())
             for n in NAMES if n in DatasetCatalog.list()}
    for n in saved:
        DatasetCatalog.remove(n)
        MetadataCatalog.remove(n)
    yield
    for n in NAMES:
        if n in DatasetCatalog.list():
            DatasetCatalog.remove(n)
            MetadataCatalog.remove(n)
    for n, (func, meta) in saved.items():
        DatasetCatalog.register(n, func)
        meta.pop("name")
        MetadataCatalog.get(n).set(**meta)


def _nyu_root(root, image_id):
    (root / "nyuv2").mkdir(parents=True)
    (root / "nyuv2" / "test.json").write_text(json.dumps(
        [{"image_id": image_id, "file_name": "x.png", "depth_file_name": "x.npy"}]))
    return root


def test_nyuv2_follows_the_root(tmp_path, monkeypatch, clean_catalog):
    a, b = _nyu_root(tmp_path / "a", 1), _nyu_root(tmp_path / "b", 2)
    monkeypatch.setenv("DETECTRON2_DATASETS", str(a))
    register_nyuv2()
    assert [r["image_id"] for r in DatasetCatalog.get("nyuv2_test")] == [1]
    monkeypatch.setenv("DETECTRON2_DATASETS", str(b))
    register_nyuv2()
    (record,) = DatasetCatalog.get("nyuv2_test")
    assert record["image_id"] == 2 and record["file_name"] == str(b / "nyuv2" / "x.png")
    meta = MetadataCatalog.get("nyuv2_test")
    assert meta.dataset_root == str(b) and meta.evaluator_type == "depth"
    register_nyuv2(a)  # an argument wins over the environment
    assert [r["image_id"] for r in DatasetCatalog.get("nyuv2_test")] == [1]
    with pytest.raises(FileNotFoundError, match=f"NYUv2 train index not found: {a}"):
        DatasetCatalog.get("nyuv2_train")


def test_same_root_and_user_registrations_are_kept(tmp_path, clean_catalog):
    calls = []

    def register():
        calls.append(1)
        DatasetCatalog.register("roots_test_dataset", lambda: [{"image_id": len(calls)}])

    assert register_from_root("roots_test_dataset", tmp_path, register)
    assert not register_from_root("roots_test_dataset", str(tmp_path), register)  # same root
    assert register_from_root("roots_test_dataset", tmp_path / "other", register)
    assert calls == [1, 1] and DatasetCatalog.get("roots_test_dataset") == [{"image_id": 2}]

    DatasetCatalog.register("nyuv2_test", lambda: [{"image_id": "mine"}])  # the user's own
    register_nyuv2(_nyu_root(tmp_path / "c", 3))
    assert DatasetCatalog.get("nyuv2_test") == [{"image_id": "mine"}]
    assert MetadataCatalog.get("nyuv2_train").dataset_root == str(tmp_path / "c")


def test_coco_panoptic_follows_the_root(tmp_path, clean_catalog):
    register_all(str(tmp_path / "a"))
    register_all(str(tmp_path / "b"))
    meta = MetadataCatalog.get("coco_2017_val_panoptic_with_sem_seg")
    assert meta.dataset_root == str(tmp_path / "b")
    assert meta.panoptic_json == str(tmp_path / "b" / "coco" / "panoptic_val2017.json")
    with pytest.raises(FileNotFoundError, match="b/coco/panoptic_val2017.json"):
        DatasetCatalog.get("coco_2017_val_panoptic_with_sem_seg")
