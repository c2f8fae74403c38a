#!/usr/bin/env python
"""ADE20K panoptic and instance annotations, in COCO formats, from the raw ADE20K labels.

Inputs under ``ADEChallengeData2016/`` (what Mask2Former users unpack):

    images/{training,validation}/*.jpg
    annotations/{training,validation}/*.png           semantic: 0 "other", 1..150 the classes
    annotations_instance/{training,validation}/*.png  instances: R = class of the 100-class
                                                      instance benchmark (0 none), G = instance
                                                      number within the image (0 none)

and ``ade20k_instance_catid_mapping.txt`` from the ADE20K repository (``utils/``), whose rows
``<instance class> <SceneParsing class> <full ADE class>`` map the 100 instance classes onto
the 150 (1-based both).

Outputs, the files ``mask2former.data`` registers (``ade20k_panoptic_*``, ``ade20k_instance_*``):

    ade20k_panoptic_{train,val}.json + ade20k_panoptic_{train,val}/*.png   COCO panoptic
    ade20k_instance_{train,val}.json                                        COCO instances (RLE)

Category ids are the 0-based SceneParsing ids in both (things and stuff share one id space,
as in Mask2Former). A panoptic image is built by painting the stuff classes of the semantic
label, then every instance over them (the two annotations overlap in a few pixels; instances
win); pixels in neither are void. Image ids are the file stems.

Resumable: each image's segments are appended to ``<output>.partial.jsonl`` once its PNG is
in place, a rerun skips those images, and the JSONs are written atomically at the end.

    python datasets/prepare_ade20k_pan_ins_seg.py [--root $DETECTRON2_DATASETS/ADEChallengeData2016]
                                                  [--catid-mapping ade20k_instance_catid_mapping.txt]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
from PIL import Image
from expedit_d2.progress import progress_bar  # a bar on a terminal only

from expedit_d2.evaluation.panoptic import id2rgb, mask_bbox
from expedit_d2.fileio import atomic_write

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "projects" / "Mask2Former"))
from mask2former.data.ade20k_categories import ADE20K_150_CATEGORIES  # noqa: E402
from expedit_d2.cli import HelpFormatter  # noqa: E402

SPLITS = (("train", "training"), ("val", "validation"))
MAPPING_SOURCE = "https://github.com/CSAILVision/ADE20K (utils/ade20k_instance_catid_mapping.txt)"


def read_catid_mapping(path: Path) -> dict[int, int]:
    """Instance class (1-based, as in the R channel) -> 0-based SceneParsing id."""
    if not path.is_file():
        raise FileNotFoundError(f"category mapping not found: {path}; get it from {MAPPING_SOURCE} "
                                "and pass --catid-mapping")
    mapping = {}
    for n, line in enumerate(path.read_text().splitlines()[1:], start=2):
        fields = line.split()
        if not fields:
            continue
        if len(fields) < 2 or not (fields[0].isdigit() and fields[1].isdigit()):
            raise ValueError(f"{path}:{n}: expected '<instance id> <scene-parsing id> ...', got {line!r}")
        mapping[int(fields[0])] = int(fields[1]) - 1
    things = {c["id"] for c in ADE20K_150_CATEGORIES if c["isthing"]}
    if set(mapping.values()) != things or len(mapping) != len(things):
        raise ValueError(f"{path}: maps {len(mapping)} instance classes onto "
                         f"{len(set(mapping.values()))} classes; the 100 thing classes of "
                         "ADE20K-150 were expected")
    return mapping


def convert_image(semantic: np.ndarray, instance: np.ndarray, mapping: dict[int, int], name: str):
    """One image -> (panoptic id map, panoptic segments_info, instance annotations without ids).

    ``semantic``: HxW uint8 (0 void, 1..150); ``instance``: HxWx3 uint8 (R class, G number)."""
    if instance.ndim != 3 or instance.shape[:2] != semantic.shape:
        raise ValueError(f"{name}: instance PNG of shape {instance.shape} does not match the "
                         f"semantic PNG of shape {semantic.shape} (expected HxWx3 with the same HxW)")
    pan = np.zeros(semantic.shape, dtype=np.int64)
    segments, instances = [], []
    for label in np.unique(semantic):
        cat = int(label) - 1
        if label == 0 or ADE20K_150_CATEGORIES[cat]["isthing"]:  # the list is indexed by id
            continue
        mask = semantic == label
        pan[mask] = len(segments) + 1
        segments.append({"id": len(segments) + 1, "category_id": cat, "iscrowd": 0})
    for number in np.unique(instance[..., 1]):
        if number == 0:
            continue
        mask = instance[..., 1] == number
        classes = np.unique(instance[..., 0][mask])
        if len(classes) != 1 or int(classes[0]) not in mapping:
            raise ValueError(f"{name}: instance {int(number)} has classes {classes.tolist()} "
                             "(expected one class listed in the category mapping)")
        cat = mapping[int(classes[0])]
        pan[mask] = len(segments) + 1
        segments.append({"id": len(segments) + 1, "category_id": cat, "iscrowd": 0})
        rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
        instances.append({"category_id": cat, "iscrowd": 0, "bbox": mask_bbox(mask),
                          "area": int(mask_util.area(rle)), "segmentation":
                          {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}})
    kept = []
    for s in segments:  # instances may cover a stuff segment entirely
        mask = pan == s["id"]
        if mask.any():
            kept.append(dict(s, area=int(mask.sum()), bbox=mask_bbox(mask)))
    return pan, kept, instances


def convert_split(root: Path, split: str, folder: str, mapping: dict[int, int]) -> int:
    images_dir = root / "images" / folder
    semantic_dir = root / "annotations" / folder
    instance_dir = root / "annotations_instance" / folder
    for d in (images_dir, semantic_dir, instance_dir):
        if not d.is_dir():
            raise FileNotFoundError(f"ADE20K folder not found: {d} (unpack ADEChallengeData2016.zip and "
                                    "the instance annotations there)")
    pan_dir = root / f"ade20k_panoptic_{split}"
    pan_dir.mkdir(exist_ok=True)
    partial = root / f"ade20k_panoptic_{split}.partial.jsonl"
    done = {}
    if partial.exists():
        for line in partial.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill: redo that image
                continue
            done[rec["image"]["id"]] = rec
    files = sorted(images_dir.glob("*.jpg"))
    with open(partial, "a") as log:
        for f in progress_bar(files, desc=f"ade20k {split}", unit="img"):
            stem = f.stem
            if stem in done:
                continue
            with Image.open(f) as im:
                width, height = im.size
            semantic = np.asarray(Image.open(semantic_dir / f"{stem}.png"))
            instance = np.asarray(Image.open(instance_dir / f"{stem}.png").convert("RGB"))
            if semantic.shape != (height, width):
                raise ValueError(f"{semantic_dir / (stem + '.png')}: shape {semantic.shape}, image is "
                                 f"{height}x{width}")
            pan, segments, instances = convert_image(semantic, instance, mapping, stem)
            target = pan_dir / f"{stem}.png"
            atomic_write(target, lambda p: Image.fromarray(id2rgb(pan)).save(p, format="PNG"))
            rec = {"image": {"id": stem, "file_name": f.name, "width": width, "height": height},
                   "segments_info": segments, "instances": instances}
            log.write(json.dumps(rec) + "\n")
            log.flush()
            done[stem] = rec
    recs = [done[f.stem] for f in files]
    categories = [dict(c) for c in ADE20K_150_CATEGORIES]
    atomic_write(root / f"ade20k_panoptic_{split}.json", json.dumps({
        "images": [r["image"] for r in recs], "categories": categories,
        "annotations": [{"image_id": r["image"]["id"], "file_name": r["image"]["id"] + ".png",
                         "segments_info": r["segments_info"]} for r in recs]}))
    annotations = []
    for r in recs:
        for a in r["instances"]:
            annotations.append(dict(a, id=len(annotations) + 1, image_id=r["image"]["id"]))
    atomic_write(root / f"ade20k_instance_{split}.json", json.dumps({
        "images": [r["image"] for r in recs], "annotations": annotations,
        "categories": [{"id": c["id"], "name": c["name"]} for c in categories if c["isthing"]]}))
    partial.unlink()
    return len(recs)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    default_root = Path(os.environ.get("DETECTRON2_DATASETS", "datasets")) / "ADEChallengeData2016"
    parser.add_argument("--root", type=Path, default=default_root)
    parser.add_argument("--catid-mapping", type=Path, default=None,
                        help="ade20k_instance_catid_mapping.txt (default: the one in --root, else "
                             "datasets/ beside this script)")
    parser.add_argument("--splits", nargs="+", default=[s for s, _ in SPLITS], choices=[s for s, _ in SPLITS])
    args = parser.parse_args(argv)
    mapping_path = args.catid_mapping
    if mapping_path is None:
        candidates = [args.root / "ade20k_instance_catid_mapping.txt",
                      Path(__file__).resolve().parent / "ade20k_instance_catid_mapping.txt"]
        mapping_path = next((c for c in candidates if c.is_file()), candidates[0])
    mapping = read_catid_mapping(mapping_path)
    for split, folder in SPLITS:
        if split in args.splits:
            n = convert_split(args.root, split, folder, mapping)
            print(f"{n} {split} images -> {args.root / f'ade20k_panoptic_{split}.json'}, "
                  f"{args.root / f'ade20k_instance_{split}.json'}")


if __name__ == "__main__":
    main()
