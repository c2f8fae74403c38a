"""YouTube-VIS 2019 / 2021 for Detectron2: the categories, the JSON loader, the registration of
the official dataset names, and the inference-time video mapper.

Layout under ``$DETECTRON2_DATASETS`` (Mask2Former's ``datasets/README.md``)::

    ytvis_2019/{train,valid,test}.json                  the YouTube-VIS annotation files
    ytvis_2019/{train,valid,test}/JPEGImages/<video>/   the frames (00000.jpg, 00005.jpg, ...)
    ytvis_2021/...                                      the same for 2021

Registered: ``ytvis_2019_{train,val,test}`` and ``ytvis_2021_{train,val,test}`` (note ``val``
in the name, ``valid`` on disk). A dataset dict is one video: ``file_names`` (one per frame),
``height``, ``width``, ``length``, ``video_id`` and ``annotations``, a list with one list per
frame of the objects visible in that frame (``id``, ``category_id`` contiguous, ``iscrowd``,
``bbox`` XYWH_ABS, ``segmentation``). The public valid / test JSONs have no annotations: their
videos load with an empty list for every frame.
"""
from __future__ import annotations

import copy
import json
import logging
import os
from functools import partial

import numpy as np
import torch
from pycocotools import mask as mask_util

from detectron2.config import configurable
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import BoxMode

from expedit_d2.datasets import register_from_root

__all__ = ["YTVIS_CATEGORIES_2019", "YTVIS_CATEGORIES_2021", "YTVIS_SPLITS", "ytvis_metadata",
           "load_ytvis_json", "register_ytvis_instances", "register_ytvis", "YTVISDatasetMapper"]

logger = logging.getLogger(__name__)


def _categories(table: str) -> list[dict]:
    """Category dicts from lines of ``id name r g b`` (every YouTube-VIS category is a thing)."""
    out = []
    for line in table.strip().splitlines():
        cid, name, r, g, b = line.split()
        out.append({"id": int(cid), "name": name, "color": [int(r), int(g), int(b)], "isthing": 1})
    return out


# id, name, colour as the official Mask2Former video code lists them
YTVIS_CATEGORIES_2019 = _categories("""
1 person 220 20 60
2 giant_panda 0 82 0
3 lizard 119 11 32
4 parrot 165 42 42
5 skateboard 134 134 103
6 sedan 0 0 142
7 ape 255 109 65
8 dog 0 226 252
9 snake 5 121 0
10 monkey 0 60 100
11 hand 250 170 30
12 rabbit 100 170 30
13 duck 179 0 194
14 cat 255 77 255
15 cow 120 166 157
16 fish 73 77 174
17 train 0 80 100
18 horse 182 182 255
19 turtle 0 143 149
20 bear 174 57 255
21 motorbike 0 0 230
22 giraffe 72 0 118
23 leopard 255 179 240
24 fox 0 125 92
25 deer 209 0 151
26 owl 188 208 182
27 surfboard 145 148 174
28 airplane 106 0 228
29 truck 0 0 70
30 zebra 199 100 0
31 tiger 166 196 102
32 elephant 110 76 0
33 snowboard 133 129 255
34 boat 0 0 192
35 shark 183 130 88
36 mouse 130 114 135
37 frog 107 142 35
38 eagle 0 228 0
39 earless_seal 174 255 243
40 tennis_racket 255 208 186
""")

YTVIS_CATEGORIES_2021 = _categories("""
1 airplane 106 0 228
2 bear 174 57 255
3 bird 255 109 65
4 boat 0 0 192
5 car 0 0 142
6 cat 255 77 255
7 cow 120 166 157
8 deer 209 0 151
9 dog 0 226 252
10 duck 179 0 194
11 earless_seal 174 255 243
12 elephant 110 76 0
13 fish 73 77 174
14 flying_disc 250 170 30
15 fox 0 125 92
16 frog 107 142 35
17 giant_panda 0 82 0
18 giraffe 72 0 118
19 horse 182 182 255
20 leopard 255 179 240
21 lizard 119 11 32
22 monkey 0 60 100
23 motorbike 0 0 230
24 mouse 130 114 135
25 parrot 165 42 42
26 person 220 20 60
27 rabbit 100 170 30
28 shark 183 130 88
29 skateboard 134 134 103
30 snake 5 121 0
31 snowboard 133 129 255
32 squirrel 188 208 182
33 surfboard 145 148 174
34 tennis_racket 255 208 186
35 tiger 166 196 102
36 train 0 80 100
37 truck 0 0 70
38 turtle 0 143 149
39 whale 0 228 0
40 zebra 199 100 0
""")

CATEGORIES = {2019: YTVIS_CATEGORIES_2019, 2021: YTVIS_CATEGORIES_2021}

# dataset name -> (image root, annotation JSON), relative to the dataset root
YTVIS_SPLITS = {
    f"ytvis_{year}_{name}": (f"ytvis_{year}/{folder}/JPEGImages", f"ytvis_{year}/{folder}.json")
    for year in (2019, 2021)
    for name, folder in (("train", "train"), ("val", "valid"), ("test", "test"))
}


def ytvis_metadata(categories: list[dict]) -> dict:
    """``thing_classes``, ``thing_colors`` and ``thing_dataset_id_to_contiguous_id`` (the
    categories sorted by id onto 0..N-1) of a YouTube-VIS category list."""
    cats = sorted(categories, key=lambda c: c["id"])
    return {"thing_classes": [c["name"] for c in cats],
            "thing_colors": [list(c["color"]) for c in cats],
            "thing_dataset_id_to_contiguous_id": {c["id"]: i for i, c in enumerate(cats)}}


def _category_map(data: dict, json_file: str, dataset_name: str) -> dict:
    """The contiguous ids of the JSON's categories (sorted by id), checked against (or, when
    the dataset has none yet, recorded in) the dataset's metadata."""
    cats = sorted(data.get("categories") or [], key=lambda c: c["id"])
    if not cats:
        raise ValueError(f"{json_file} lists no categories; they are needed to map category ids of "
                         f"dataset {dataset_name!r} to contiguous ids")
    ids = [c["id"] for c in cats]
    if ids != list(range(1, len(ids) + 1)):
        logger.warning(f"{json_file}: category ids are not 1..{len(ids)}; they are mapped to 0..{len(ids) - 1} "
                       "in id order")
    id_map = {cid: i for i, cid in enumerate(ids)}
    names = [c["name"] for c in cats]
    meta = MetadataCatalog.get(dataset_name)
    registered = meta.get("thing_dataset_id_to_contiguous_id", None)
    if registered is None:
        meta.set(thing_classes=names, thing_dataset_id_to_contiguous_id=id_map)
    elif registered != id_map or list(meta.get("thing_classes", names)) != names:
        raise ValueError(f"{json_file}: its categories {list(zip(ids, names))[:5]}... differ from those dataset "
                         f"{dataset_name!r} is registered with; the evaluator would report wrong categories")
    return id_map


def _frame_segmentation(segm):
    """One frame's segmentation as the loader keeps it: compressed RLE kept, uncompressed RLE
    compressed, polygons with fewer than 3 points dropped (None when none is left)."""
    if isinstance(segm, dict):
        if isinstance(segm.get("counts"), list):
            return mask_util.frPyObjects(segm, *segm["size"])
        return segm
    polygons = [p for p in segm if len(p) >= 6 and len(p) % 2 == 0]
    return polygons or None


def load_ytvis_json(json_file, image_root, dataset_name=None, extra_annotation_keys=None) -> list[dict]:
    """The videos of a YouTube-VIS annotation JSON as Detectron2 dicts (see the module doc),
    sorted by video id.

    An object is listed in a frame only where both its ``bboxes`` and its ``segmentations``
    entry of that frame are non-empty; polygons with fewer than 3 points are dropped and an
    object left without any in a frame is not listed there. With ``dataset_name``, category ids
    are mapped to 0..N-1 in the order of the JSON's category ids (the mapping is recorded in that
    dataset's metadata, or checked against what is registered there); without, they are kept as
    in the file. ``extra_annotation_keys``: annotation fields copied into every frame's object
    besides ``id``, ``category_id`` and ``iscrowd``."""
    json_file, image_root = os.fspath(json_file), os.fspath(image_root)
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"YouTube-VIS annotations not found: {json_file} (download the YouTube-VIS "
                                "split and place its JSON and JPEGImages/ as in datasets/README.md)")
    with open(json_file) as f:
        data = json.load(f)
    if not isinstance(data, dict) or not isinstance(data.get("videos"), list):
        raise ValueError(f"{json_file} is not a YouTube-VIS annotation file (no 'videos' list)")
    id_map = _category_map(data, json_file, dataset_name) if dataset_name is not None else None

    videos = sorted(data["videos"], key=lambda v: v["id"])
    by_video = {v["id"]: [] for v in videos}
    annotations = data.get("annotations") or []
    for ann in annotations:
        if ann.get("video_id") in by_video:
            by_video[ann["video_id"]].append(ann)
    n_kept = sum(len(a) for a in by_video.values())
    if n_kept < len(annotations):
        logger.warning(f"{json_file}: {len(annotations) - n_kept} of {len(annotations)} annotations belong to "
                       "videos the file does not list; they are left out")

    keys = ["iscrowd", "category_id", "id"] + list(extra_annotation_keys or [])
    n_dropped = 0
    records = []
    for video in videos:
        length, vid = int(video["length"]), video["id"]
        if len(video["file_names"]) < length:
            raise ValueError(f"{json_file}: video {vid} has length {length} but {len(video['file_names'])} file_names")
        frames = [[] for _ in range(length)]
        for ann in by_video[vid]:
            bboxes, segms = ann.get("bboxes") or [], ann.get("segmentations") or []
            if not bboxes or not segms:
                continue
            if len(bboxes) < length or len(segms) < length:
                raise ValueError(f"{json_file}: annotation {ann.get('id')} of video {vid} has {len(segms)} "
                                 f"segmentations and {len(bboxes)} bboxes for {length} frames")
            base = {k: ann[k] for k in keys if k in ann}
            if id_map is not None:
                if base.get("category_id") not in id_map:
                    raise ValueError(f"{json_file}: annotation {ann.get('id')} of video {vid} has category_id "
                                     f"{ann.get('category_id')!r}, not among the file's categories")
                base["category_id"] = id_map[base["category_id"]]
            for t in range(length):
                if not bboxes[t] or not segms[t]:
                    continue  # absent in this frame
                segm = _frame_segmentation(segms[t])
                if segm is None:
                    n_dropped += 1
                    continue
                frames[t].append(dict(base, bbox=bboxes[t], bbox_mode=BoxMode.XYWH_ABS, segmentation=segm))
        records.append({
            "file_names": [os.path.join(image_root, name) for name in video["file_names"][:length]],
            "height": video["height"], "width": video["width"], "length": length, "video_id": vid,
            "annotations": frames,
        })
    if n_dropped:
        logger.warning(f"{json_file}: {n_dropped} per-frame objects without a valid polygon (even length, at "
                       "least 3 points) are left out of their frames")
    logger.info(f"Loaded {len(records)} YouTube-VIS videos from {json_file}")
    return records


def register_ytvis_instances(name: str, metadata: dict, json_file, image_root) -> None:
    """Register a YouTube-VIS-format dataset ``name`` (loaded on first use) with ``metadata``
    plus ``json_file``, ``image_root`` and ``evaluator_type="ytvis"``."""
    json_file, image_root = os.fspath(json_file), os.fspath(image_root)
    DatasetCatalog.register(name, partial(load_ytvis_json, json_file, image_root, name))
    MetadataCatalog.get(name).set(json_file=json_file, image_root=image_root, evaluator_type="ytvis", **metadata)


def register_ytvis(root: str | None = None) -> None:
    """Register ``ytvis_{2019,2021}_{train,val,test}`` under ``root`` (default
    ``$DETECTRON2_DATASETS``, else ``datasets``); again only when the root changes. Nothing is
    read here: a missing JSON raises FileNotFoundError when the dataset is loaded."""
    root = root or os.environ.get("DETECTRON2_DATASETS", "datasets")
    for name, (image_root, json_file) in YTVIS_SPLITS.items():
        year = int(name.split("_")[1])
        register_from_root(name, root, partial(
            register_ytvis_instances, name, ytvis_metadata(CATEGORIES[year]),
            os.path.join(root, json_file), os.path.join(root, image_root)))


class YTVISDatasetMapper:
    """A video dict -> the model's input at inference: every frame read in ``image_format``
    and resized by ``augmentations`` (one at a time, as Mask2Former's video mapper does), as
    ``image``: a list of (3, H, W) uint8 tensors, with ``file_names``, ``height``, ``width``
    (the original size, which the predictions are resized back to), ``length`` and
    ``video_id`` kept. Training (frame sampling, annotations) is not implemented."""

    @configurable
    def __init__(self, is_train: bool = False, *, augmentations: list, image_format: str):
        if is_train:
            raise NotImplementedError("YTVISDatasetMapper maps videos for inference only (is_train=False)")
        self.is_train = False
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format

    @classmethod
    def from_config(cls, cfg, is_train: bool = False):
        augs = [T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST, "choice")]
        return {"is_train": is_train, "augmentations": augs, "image_format": cfg.INPUT.FORMAT}

    def __call__(self, dataset_dict: dict) -> dict:
        out = {k: copy.deepcopy(v) for k, v in dataset_dict.items() if k not in ("annotations", "file_names")}
        out["file_names"] = list(dataset_dict["file_names"][:dataset_dict["length"]])
        out["image"] = []
        for file_name in out["file_names"]:
            image = utils.read_image(file_name, format=self.image_format)
            utils.check_image_size(out, image)
            aug_input = T.AugInput(image)
            self.augmentations(aug_input)
            out["image"].append(torch.as_tensor(np.ascontiguousarray(aug_input.image.transpose(2, 0, 1))))
        return out
