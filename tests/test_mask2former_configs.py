"""Every Mask2Former config builds the official model; expedited configs differ from their
baseline only in the backbone keys and carry the published Expedit-Mask2Former settings."""
from pathlib import Path

import pytest
import torch

from mask2former import MaskFormer
from tests.mask2former_settings import (CONFIGS, PUBLISHED, REFERENCE, flat, installed_settings,
                                         settings_in_config)
from tests.reference_keys import read_keys

ALL = sorted(str(p.relative_to(CONFIGS)) for p in CONFIGS.rglob("maskformer2_*.yaml"))
EXPEDITED = [r for r in ALL if "expedit" in r or "hourglass" in r]


@pytest.fixture
def load(m2f_project_cfg):
    """``load(rel, *opts)``: the frozen config of our config ``CONFIGS / rel``."""
    return lambda rel, *opts: m2f_project_cfg(CONFIGS / rel, *opts)


def published_for(rel):
    return next(v for k, v in PUBLISHED.items() if rel.startswith(k) or f"/{k}/" in rel)


@pytest.mark.parametrize("rel", ALL)
def test_config_builds_the_official_model(rel, load):
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


def _baseline_of(rel):
    if "_expedit" in rel:
        return rel[: rel.index("_expedit")] + ".yaml"
    return rel.replace("maskformer2_hourglass_swin", "maskformer2_swin")


@pytest.mark.parametrize("rel", EXPEDITED)
def test_expedited_config_differs_only_in_backbone_keys(rel, load):
    exp, base = flat(load(rel)), flat(load(_baseline_of(rel)))
    changed = {k for k in exp if exp[k] != base[k]}
    assert changed and all(k.startswith(("MODEL.BACKBONE.", "MODEL.SWIN.")) for k in changed), changed
    assert exp["MODEL.BACKBONE.NAME"] == "D2HourglassSwinTransformer"


@pytest.mark.parametrize("rel", EXPEDITED)
def test_expedited_config_carries_the_published_settings(rel, load):
    """Config values and what the built backbone's hook really uses, both names of each."""
    cfg = load(rel)
    assert settings_in_config(cfg) == published_for(rel)
    with torch.device("meta"):
        model = MaskFormer(**MaskFormer.from_config(cfg))
    assert installed_settings(model.backbone) == published_for(rel)


@pytest.mark.parametrize("rel", [r for r in ALL if "_expedit" in r])
def test_our_expedit_names_are_aliases_of_the_official_names(rel, load):
    """One home per set of values: ``*_expedit_a*_8x8.yaml`` only points at the official name."""
    official = rel[: rel.index("_expedit")].replace("maskformer2_swin", "maskformer2_hourglass_swin") + ".yaml"
    assert (CONFIGS / official).is_file()
    body = [ln for ln in (CONFIGS / rel).read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert body == [f'_BASE_: "{Path(official).name}"']
    assert flat(load(rel)) == flat(load(official))


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


def _write_ade20k_raw(root, n_images=2):
    """Raw ADE20K-style inputs: JPEG images, semantic PNGs (0..150), instance PNGs (R class,
    G number), and a category mapping that sends instance class k to the k-th thing class."""
    import numpy as np
    from PIL import Image

    from mask2former.data.ade20k_categories import ADE20K_150_CATEGORIES

    things = [c["id"] for c in ADE20K_150_CATEGORIES if c["isthing"]]
    root.mkdir(parents=True, exist_ok=True)
    rows = ["Instacne100 SceneParsing150 FullADE20K"] + [f"{k + 1} {t + 1} {1000 + k}" for k, t in enumerate(things)]
    (root / "ade20k_instance_catid_mapping.txt").write_text("\n".join(rows) + "\n")
    for folder in ("training", "validation"):
        for sub in ("images", "annotations", "annotations_instance"):
            (root / sub / folder).mkdir(parents=True)
        for i in range(n_images):
            sem = np.zeros((20, 30), dtype=np.uint8)
            sem[:10] = 1 + 2  # sky (stuff, id 2)
            sem[10:] = 1 + 0  # wall (stuff, id 0)
            sem[:, 25:] = 0  # void
            ins = np.zeros((20, 30, 3), dtype=np.uint8)
            ins[2:8, 2 + i:8 + i] = (things.index(12) + 1, 1, 0)  # person
            ins[12:18, 10:20] = (things.index(20) + 1, 2, 0)  # car
            sem[ins[..., 1] > 0] = 1 + 12  # the semantic label says "person" under both (overlap)
            stem = f"ADE_{folder}_{i + 1:08d}"
            Image.fromarray(np.full((20, 30, 3), 100 + i, np.uint8)).save(root / "images" / folder / f"{stem}.jpg")
            Image.fromarray(sem).save(root / "annotations" / folder / f"{stem}.png")
            Image.fromarray(ins).save(root / "annotations_instance" / folder / f"{stem}.png")


def _register_ade20k_under(root):
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from mask2former.data import register_all

    for name in [f"ade20k_{kind}_{split}" for kind in ("panoptic", "instance") for split in ("train", "val")]:
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
    register_all(str(root))


def test_prepare_ade20k_panoptic_and_instance(tmp_path):
    import json

    import numpy as np
    from PIL import Image
    from pycocotools.coco import COCO

    from datasets.prepare_ade20k_pan_ins_seg import main as prepare
    from datasets.prepare_ade20k_sem_seg import main as prepare_sem
    from detectron2.data import DatasetCatalog
    from expedit_d2.evaluation.panoptic import rgb2id

    root = tmp_path / "ADEChallengeData2016"
    _write_ade20k_raw(root)
    # a killed earlier run: one finished image logged, one line cut in half
    prepare(["--root", str(root), "--splits", "val"])
    partial = root / "ade20k_panoptic_val.partial.jsonl"
    first = json.loads((root / "ade20k_panoptic_val.json").read_text())
    (root / "ade20k_panoptic_val.json").unlink()
    rec = {"image": first["images"][0], "segments_info": first["annotations"][0]["segments_info"], "instances": []}
    partial.write_text(json.dumps(rec) + "\n" + json.dumps(rec)[:25])
    prepare(["--root", str(root)])
    assert not partial.exists() and not list(root.rglob("*.tmp"))

    pan = json.loads((root / "ade20k_panoptic_val.json").read_text())
    ann = pan["annotations"][1]
    ids = rgb2id(np.asarray(Image.open(root / "ade20k_panoptic_val" / ann["file_name"])))
    cats = {s["id"]: s["category_id"] for s in ann["segments_info"]}
    assert sorted(cats.values()) == [0, 2, 12, 20]  # wall, sky (stuff), person, car (things)
    assert cats[ids[4, 4]] == 12 and cats[ids[15, 15]] == 20 and cats[ids[1, 1]] == 2 and cats[ids[19, 0]] == 0
    assert (ids[:, 25:] == 0).all()  # void stays void
    for s in ann["segments_info"]:
        assert s["area"] == int((ids == s["id"]).sum())

    coco = COCO(str(root / "ade20k_instance_train.json"))
    assert len(coco.getAnnIds()) == 4 and sorted(coco.getCatIds())[:2] == [7, 8]  # bed, window: things
    a = coco.loadAnns(coco.getAnnIds(catIds=[12]))[0]
    assert a["area"] == 36 and a["bbox"] == [2, 2, 6, 6] and coco.annToMask(a).sum() == 36

    prepare_sem(["--root", str(root)])
    _register_ade20k_under(tmp_path)
    recs = DatasetCatalog.get("ade20k_panoptic_val")
    assert len(recs) == 2 and {s["category_id"] for s in recs[1]["segments_info"]} == {0, 2, 12, 20}
    inst = DatasetCatalog.get("ade20k_instance_val")
    # the first val image came from the partial log (written with no instances): not recomputed
    assert [len(r["annotations"]) for r in inst] == [0, 2]

    bad = tmp_path / "bad_mapping.txt"
    bad.write_text("header\n1 8 165\n")
    with pytest.raises(ValueError, match="bad_mapping.txt: maps 1 instance classes"):
        prepare(["--root", str(root), "--catid-mapping", str(bad)])
    with pytest.raises(FileNotFoundError, match="category mapping not found"):
        prepare(["--root", str(root), "--catid-mapping", str(tmp_path / "nope.txt")])


def test_missing_ade20k_panoptic_names_the_prepare_step(tmp_path):
    from detectron2.data import DatasetCatalog

    _register_ade20k_under(tmp_path)
    with pytest.raises(FileNotFoundError, match="ade20k_panoptic_train.json not found; run datasets/prepare_ade20k_pan"):
        DatasetCatalog.get("ade20k_panoptic_train")
