"""Every Mask2Former config builds the official model; expedited configs differ from their
baseline only in the backbone keys."""
from pathlib import Path

import pytest
import torch

from detectron2.config import get_cfg

from mask2former import MaskFormer, add_maskformer2_config
from tests.reference_keys import read_keys

CONFIGS = Path(__file__).resolve().parents[1] / "projects/Mask2Former/configs"
ALL = sorted(str(p.relative_to(CONFIGS)) for p in CONFIGS.rglob("maskformer2_*.yaml"))
REFERENCE = {"coco/panoptic": "coco_panoptic", "coco/instance": "coco_instance", "ade20k/panoptic": "ade20k_panoptic"}


def load(rel):
    cfg = get_cfg()
    add_maskformer2_config(cfg)
    cfg.merge_from_file(str(CONFIGS / rel))
    return cfg


@pytest.mark.parametrize("rel", ALL)
def test_config_builds_the_official_model(rel):
    cfg = load(rel)
    with torch.device("meta"):
        model = MaskFormer(**MaskFormer.from_config(cfg))
    keys = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    ref = next((v for k, v in REFERENCE.items() if rel.startswith(k)), None)
    if ref is not None:
        assert keys == read_keys(f"mask2former_swinL_{ref}")
    else:  # ADE20K semantic: 150 classes + no-object, 100 queries
        assert keys["sem_seg_head.predictor.class_embed.weight"] == (151, 256)
        assert keys["sem_seg_head.predictor.query_feat.weight"] == (100, 256)


def _flat(node, prefix=""):
    out = {}
    for k, v in node.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


@pytest.mark.parametrize("rel", [r for r in ALL if "expedit" in r])
def test_expedited_config_differs_only_in_backbone_keys(rel):
    base_rel = rel[: rel.index("_expedit")] + ".yaml"
    exp, base = _flat(load(rel)), _flat(load(base_rel))
    changed = {k for k in exp if exp[k] != base[k]}
    assert changed and all(k.startswith(("MODEL.BACKBONE.", "MODEL.SWIN.")) for k in changed), changed
    assert exp["MODEL.BACKBONE.NAME"] == "D2HourglassSwinTransformer"


def test_ade20k_registration_reads_the_official_layout(tmp_path):
    import json

    from detectron2.data import DatasetCatalog, MetadataCatalog

    from mask2former.data import register_all

    ade = tmp_path / "ADEChallengeData2016"
    (ade / "ade20k_panoptic_val").mkdir(parents=True)
    (ade / "ade20k_panoptic_val.json").write_text(json.dumps({
        "images": [{"id": 7, "file_name": "ADE_val_00000001.jpg", "height": 4, "width": 5}],
        "annotations": [{"image_id": 7, "file_name": "ADE_val_00000001.png",
                         "segments_info": [{"id": 3, "category_id": 12, "iscrowd": 0}]}],
        "categories": []}))
    (ade / "annotations_detectron2" / "validation").mkdir(parents=True)
    names = ["ade20k_panoptic_train", "ade20k_panoptic_val", "ade20k_instance_train", "ade20k_instance_val"]
    for n in names:
        if n in DatasetCatalog.list():
            DatasetCatalog.remove(n)
            MetadataCatalog.remove(n)
    register_all(str(tmp_path))
    (rec,) = DatasetCatalog.get("ade20k_panoptic_val")
    assert rec["file_name"].endswith("images/validation/ADE_val_00000001.jpg")
    assert rec["sem_seg_file_name"].endswith("annotations_detectron2/validation/ADE_val_00000001.png")
    assert rec["segments_info"] == [{"id": 3, "category_id": 12, "iscrowd": 0, "isthing": True}]  # person
    meta = MetadataCatalog.get("ade20k_panoptic_val")
    assert len(meta.thing_dataset_id_to_contiguous_id) == 100 and len(meta.stuff_classes) == 150
    with pytest.raises(FileNotFoundError, match="ade20k_panoptic_train.json not found"):
        DatasetCatalog.get("ade20k_panoptic_train")
    for n in names:  # leave the catalog as register_all at the default root would
        DatasetCatalog.remove(n)
        MetadataCatalog.remove(n)


def test_ade20k_semantic_prepare(tmp_path):
    import numpy as np
    from PIL import Image

    from datasets.prepare_ade20k_sem_seg import main as prepare

    root = tmp_path / "ADEChallengeData2016"
    for split in ("training", "validation"):
        (root / "annotations" / split).mkdir(parents=True)
        Image.fromarray(np.array([[0, 1, 150], [7, 0, 2]], dtype=np.uint8)).save(
            root / "annotations" / split / "ADE_x_00000001.png")
    prepare(["--root", str(root)])
    out = np.asarray(Image.open(root / "annotations_detectron2" / "validation" / "ADE_x_00000001.png"))
    assert out.tolist() == [[255, 0, 149], [6, 255, 1]]
    done = root / "annotations_detectron2" / "validation" / "ADE_x_00000001.png"
    mtime = done.stat().st_mtime_ns
    prepare(["--root", str(root)])  # a rerun keeps finished files
    assert done.stat().st_mtime_ns == mtime and not list(root.rglob("*.tmp"))
    with pytest.raises(FileNotFoundError, match="ADE20K annotations not found"):
        prepare(["--root", str(tmp_path / "missing")])
