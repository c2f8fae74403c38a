"""Dataset registration in the layout Mask2Former users already have under
``$DETECTRON2_DATASETS`` (see datasets/README.md):

    coco/{train,val}2017/                         images
    coco/panoptic_{train,val}2017.json            COCO panoptic annotations
    coco/panoptic_{train,val}2017/                panoptic PNGs
    coco/panoptic_semseg_{train,val}2017/         semantic PNGs derived from panoptic
                                                  (datasets/prepare_coco_semantic_annos_from_panoptic_annos.py)

    ADEChallengeData2016/images/{training,validation}/      images
    ADEChallengeData2016/ade20k_panoptic_{train,val}.json   + ade20k_panoptic_{train,val}/ PNGs
    ADEChallengeData2016/annotations_detectron2/{training,validation}/   semantic PNGs
    ADEChallengeData2016/ade20k_instance_{train,val}.json   COCO-format instances

Registered: ``coco_2017_{train,val}_panoptic_with_sem_seg``, ``ade20k_panoptic_{train,val}``,
``ade20k_instance_{train,val}`` (COCO instances ``coco_2017_{train,val}`` and ADE20K semantic
``ade20k_sem_seg_{train,val}`` come from Detectron2's builtin registration). Loading happens on
first use; a missing file raises naming the path and the prepare step.
"""
from __future__ import annotations

import json
import os
from functools import partial

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

from expedit_d2.datasets import register_from_root

from .ade20k_categories import ADE20K_150_CATEGORIES

__all__ = ["register_coco_panoptic_with_sem_seg", "register_all", "panoptic_metadata"]


def panoptic_metadata(categories: list[dict]) -> dict:
    """Mask2Former's convention: one contiguous id space for all categories;
    ``thing_dataset_id_to_contiguous_id`` holds the things of it, ``thing_classes`` their
    names (the per-category table of COCOEvaluator's mask AP has one row per thing)."""
    all_map = {c["id"]: i for i, c in enumerate(categories)}
    return {
        "thing_classes": [c["name"] for c in categories if c.get("isthing")],
        "stuff_classes": [c["name"] for c in categories],
        "thing_dataset_id_to_contiguous_id": {c["id"]: all_map[c["id"]] for c in categories if c.get("isthing")},
        "stuff_dataset_id_to_contiguous_id": all_map,
    }


def _require(path: str, step: str) -> None:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found; {step}")


COCO_STEPS = ("download the COCO panoptic annotations (datasets/README.md)",
              "run datasets/prepare_coco_semantic_annos_from_panoptic_annos.py")
ADE20K_STEPS = ("run datasets/prepare_ade20k_pan_ins_seg.py (datasets/README.md)",
                "run datasets/prepare_ade20k_sem_seg.py")


def load_panoptic_with_sem_seg(image_root, panoptic_root, panoptic_json, sem_seg_root, meta, steps=COCO_STEPS):
    """``steps``: what to do when the panoptic JSON / the semantic folder is missing."""
    _require(panoptic_json, steps[0])
    _require(sem_seg_root, steps[1])
    with open(panoptic_json) as f:
        data = json.load(f)
    things = meta["thing_dataset_id_to_contiguous_id"]
    contiguous = meta["stuff_dataset_id_to_contiguous_id"]
    images = {img["id"]: img for img in data["images"]}
    records = []
    for ann in data["annotations"]:
        img = images[ann["image_id"]]
        stem = os.path.splitext(ann["file_name"])[0]
        segments = [dict(s, category_id=contiguous[s["category_id"]], isthing=s["category_id"] in things)
                    for s in ann["segments_info"]]
        records.append({
            "file_name": os.path.join(image_root, img["file_name"]),
            "image_id": ann["image_id"], "height": img["height"], "width": img["width"],
            "pan_seg_file_name": os.path.join(panoptic_root, ann["file_name"]),
            "sem_seg_file_name": os.path.join(sem_seg_root, stem + ".png"),
            "segments_info": segments,
        })
    return records


def register_coco_panoptic_with_sem_seg(name, categories, image_root, panoptic_root, panoptic_json,
                                        sem_seg_root, instances_json=None, steps=COCO_STEPS):
    meta = panoptic_metadata(categories)
    DatasetCatalog.register(name, lambda: load_panoptic_with_sem_seg(
        image_root, panoptic_root, panoptic_json, sem_seg_root, meta, steps))
    MetadataCatalog.get(name).set(
        panoptic_root=panoptic_root, image_root=image_root, panoptic_json=panoptic_json,
        sem_seg_root=sem_seg_root, json_file=instances_json, evaluator_type="coco_panoptic_seg",
        ignore_label=255, label_divisor=1000, **meta)


def register_all(root: str | None = None) -> None:
    """Register the COCO and ADE20K datasets above (lazy; again only when the root changes)."""
    root = root or os.environ.get("DETECTRON2_DATASETS", "datasets")
    ade, coco = os.path.join(root, "ADEChallengeData2016"), os.path.join(root, "coco")
    registrations = {}  # name -> the call that registers it
    for split, folder in (("train", "training"), ("val", "validation")):
        images = os.path.join(ade, "images", folder)
        instances = os.path.join(ade, f"ade20k_instance_{split}.json")
        name = f"ade20k_panoptic_{split}"
        registrations[name] = partial(
            register_coco_panoptic_with_sem_seg, name, ADE20K_150_CATEGORIES, images,
            os.path.join(ade, name), os.path.join(ade, f"{name}.json"),
            os.path.join(ade, "annotations_detectron2", folder), instances, steps=ADE20K_STEPS)
        name = f"ade20k_instance_{split}"
        registrations[name] = partial(register_coco_instances, name, {}, instances, images)
    for split in ("train", "val"):
        name = f"coco_2017_{split}_panoptic_with_sem_seg"
        registrations[name] = partial(
            register_coco_panoptic_with_sem_seg, name, COCO_CATEGORIES,
            os.path.join(coco, f"{split}2017"), os.path.join(coco, f"panoptic_{split}2017"),
            os.path.join(coco, f"panoptic_{split}2017.json"),
            os.path.join(coco, f"panoptic_semseg_{split}2017"),
            os.path.join(coco, "annotations", f"instances_{split}2017.json"))
    for name, register in registrations.items():
        register_from_root(name, root, register)
