"""Small synthetic datasets in the real on-disk formats (for the demo and the tests).

* :func:`write_coco` -- ``coco/`` as COCO ships it: images, ``panoptic_{split}2017.json`` +
  PNGs (things and stuff, void pixels), ``annotations/instances_{split}2017.json`` (boxes as
  polygons, discs as RLE), with the 133 COCO panoptic categories, so Detectron2's and
  Mask2Former's registrations read it under ``$DETECTRON2_DATASETS`` unchanged.
* :func:`write_nyuv2_mat` -- ``nyu_depth_v2_labeled.mat`` (MATLAB v7.3 / HDF5, column-major)
  and ``splits.mat`` (MATLAB v5), the two files ``datasets/prepare_nyuv2.py`` reads.
* :func:`write_ytvis` -- ``ytvis_<year>/<split>.json`` and ``<split>/JPEGImages/`` as YouTube-VIS
  ships them: short videos of shapes moving across the frames, one appearing late and one leaving
  early, with the real category ids and names of that year.

Scenes are simple but learnable: a horizon splits sky from ground; boxes (person) and discs
(car) sit on the ground. Depth grows towards the horizon and objects are nearer than the
ground behind them; colours carry the depth, so a small model can learn it quickly.
All content is a function of the seed.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from .fileio import atomic_write

__all__ = ["SCENE_CATEGORIES", "draw_scene", "write_coco", "write_nyuv2_mat", "write_kitti", "write_ytvis"]

# COCO panoptic ids of what the scenes contain
SCENE_CATEGORIES = {"person": 1, "car": 3, "sky": 187, "grass": 193}


def draw_scene(rng: np.random.Generator, height: int, width: int, max_objects: int = 3):
    """One scene: (rgb uint8 HxWx3, depth float32 HxW metres, segments).

    ``segments``: list of (name, kind, mask) with kind "stuff", "box" or "disc"; masks do
    not overlap (later objects are drawn over earlier ones and clipped out of them)."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    horizon = int(height * rng.uniform(0.3, 0.55))
    sky = yy < horizon
    # ground depth: 1 m at the bottom, 10 m at the horizon; sky at 10 m
    t = np.clip((yy - horizon) / max(height - horizon, 1), 0, 1)
    depth = np.where(sky, 10.0, 10.0 - 9.0 * t).astype(np.float32)
    rgb = np.zeros((height, width, 3), np.float32)
    rgb[sky] = (90, 140, 230)
    rgb[~sky] = np.stack([40 + 10 * depth, 150 - 8 * depth, 40 + 4 * depth], -1)[~sky]
    labels = np.zeros((height, width), np.int64)  # 0 void, 1 sky, 2 ground, 3.. objects
    labels[sky] = 1
    labels[~sky] = 2
    labels[horizon - 1:horizon + 1, : width // 8] = 0  # a little void on the horizon
    objects = []
    for k in range(int(rng.integers(1, max_objects + 1))):
        kind = "box" if rng.random() < 0.5 else "disc"
        h = int(rng.uniform(0.15, 0.35) * height)
        w = int(rng.uniform(0.1, 0.25) * width)
        base = int(rng.uniform(horizon + h * 0.5, height))  # stands on the ground
        x0 = int(rng.uniform(0, width - w))
        y0 = max(base - h, 0)
        if kind == "box":
            m = (yy >= y0) & (yy < base) & (xx >= x0) & (xx < x0 + w)
            colour = (200, 60, 50)
        else:
            cy, cx = (y0 + base) / 2, x0 + w / 2
            m = ((yy - cy) / (h / 2)) ** 2 + ((xx - cx) / (w / 2)) ** 2 <= 1
            colour = (230, 200, 40)
        d = 10.0 - 9.0 * float(np.clip((base - horizon) / max(height - horizon, 1), 0, 1))
        depth[m] = d
        rgb[m] = np.array(colour, np.float32) * (1.1 - 0.05 * d)
        labels[m] = 3 + k
        objects.append(("person" if kind == "box" else "car", kind))
    rgb += rng.normal(0, 6, rgb.shape)
    segments = [("sky", "stuff", labels == 1), ("grass", "stuff", labels == 2)]
    segments += [(name, kind, labels == 3 + k) for k, (name, kind) in enumerate(objects)]
    segments = [s for s in segments if s[2].any()]
    return np.clip(rgb, 0, 255).astype(np.uint8), depth, segments


def write_coco(root, splits: dict[str, int], height: int = 128, width: int = 192, seed: int = 0) -> Path:
    """Write ``root/coco`` (see module doc) with ``splits`` = {"train": n, "val": n} images.
    Also writes the semantic PNGs Mask2Former derives (``panoptic_semseg_*``). Idempotent:
    a split whose JSONs exist is kept. Returns the ``coco`` folder."""
    import pycocotools.mask as mask_util

    from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

    from .evaluation.panoptic import id2rgb, mask_bbox

    coco = Path(root) / "coco"
    categories = [{k: c[k] for k in ("id", "name", "isthing", "color")} for c in COCO_CATEGORIES]
    contiguous = {c["id"]: i for i, c in enumerate(categories)}
    for s, (split, n) in enumerate(sorted(splits.items())):
        pan_json = coco / f"panoptic_{split}2017.json"
        inst_json = coco / "annotations" / f"instances_{split}2017.json"
        if pan_json.exists() and inst_json.exists():
            continue
        rng = np.random.default_rng(seed * 1000 + s)
        dirs = {d: coco / d for d in (f"{split}2017", f"panoptic_{split}2017", f"panoptic_semseg_{split}2017",
                                      "annotations")}
        for d in dirs.values():
            d.mkdir(parents=True, exist_ok=True)
        images, pan_anns, inst_anns = [], [], []
        for i in range(1, n + 1):
            rgb, _, segments = draw_scene(rng, height, width)
            name = f"{i:012d}.png"
            ids = np.zeros((height, width), np.int64)
            sem = np.full((height, width), 255, np.uint8)
            infos = []
            for k, (cat_name, kind, mask) in enumerate(segments):
                cat = SCENE_CATEGORIES[cat_name]
                seg_id = cat * 1000 + k + 1
                ids[mask] = seg_id
                sem[mask] = contiguous[cat]
                infos.append({"id": seg_id, "category_id": cat, "iscrowd": 0, "area": int(mask.sum()),
                              "bbox": mask_bbox(mask)})
                if kind == "box":
                    x, y, w, h = mask_bbox(mask)
                    seg = [[x, y, x + w, y, x + w, y + h, x, y + h]]
                elif kind == "disc":
                    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
                    seg = {"size": [height, width], "counts": rle["counts"].decode("ascii")}
                else:
                    continue
                inst_anns.append({"id": len(inst_anns) + 1, "image_id": i, "category_id": cat, "iscrowd": 0,
                                  "area": float(mask.sum()), "bbox": mask_bbox(mask), "segmentation": seg})
            atomic_write(dirs[f"{split}2017"] / name, lambda p: Image.fromarray(rgb).save(p, format="PNG"))
            atomic_write(dirs[f"panoptic_{split}2017"] / name,
                          lambda p: Image.fromarray(id2rgb(ids)).save(p, format="PNG"))
            atomic_write(dirs[f"panoptic_semseg_{split}2017"] / name,
                          lambda p: Image.fromarray(sem).save(p, format="PNG"))
            images.append({"id": i, "file_name": name, "height": height, "width": width})
            pan_anns.append({"image_id": i, "file_name": name, "segments_info": infos})
        atomic_write(inst_json, json.dumps({"images": images, "annotations": inst_anns,
                                            "categories": [c for c in categories if c["isthing"]]}))
        atomic_write(pan_json, json.dumps({"images": images, "annotations": pan_anns, "categories": categories}))
    return coco


def write_nyuv2_mat(folder, n: int = 4, n_test: int = 2, seed: int = 0, scenes: bool = False):
    """``nyu_depth_v2_labeled.mat`` and ``splits.mat`` with ``n`` 480x640 images, the last
    ``n_test`` of them in the test split. ``scenes``: :func:`draw_scene` content (learnable);
    otherwise smooth gradients. Returns (labeled path, splits path, images, depths) with the
    arrays in MATLAB's layout ((n, 3, 640, 480), (n, 640, 480))."""
    import h5py
    from scipy.io import savemat

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:480, 0:640]
    images = np.zeros((n, 3, 640, 480), dtype=np.uint8)
    depths = np.zeros((n, 640, 480), dtype=np.float32)
    for i in range(n):
        if scenes:
            rgb, depth, _ = draw_scene(rng, 480, 640)
        else:
            rgb = np.stack([(xx + 40 * i) % 256, yy % 256, (xx + yy) % 256], -1).astype(np.uint8)
            depth = (1.0 + 3.0 * xx / 640 + 0.5 * i + 0.01 * rng.standard_normal((480, 640))).astype(np.float32)
        images[i] = rgb.transpose(2, 1, 0)  # (H, W, 3) -> MATLAB (3, W, H)
        depths[i] = depth.T
    labeled = folder / "nyu_depth_v2_labeled.mat"

    def write_h5(path):
        with h5py.File(path, "w") as f:
            f.create_dataset("images", data=images)
            f.create_dataset("depths", data=depths)

    atomic_write(labeled, write_h5)
    splits = folder / "splits.mat"
    idx = np.arange(1, n + 1).reshape(-1, 1)

    def write_splits(path):
        with open(path, "wb") as f:  # a handle: savemat would append ".mat" to the name
            savemat(f, {"trainNdxs": idx[: n - n_test], "testNdxs": idx[n - n_test:]})

    atomic_write(splits, write_splits)
    return labeled, splits, images, depths


def write_kitti(root, n_test: int = 2, n_train: int = 0, sizes=((375, 1242), (370, 1224)), seed: int = 0):
    """A KITTI depth layout under ``root/kitti`` in the real formats: raw RGB PNGs under
    ``raw/<date>/<drive>/image_02/data/``, annotated depth as 16-bit PNGs (depth x 256, 0 =
    no measurement; LiDAR-like: a random 10 % of the pixels below the horizon) under
    ``data_depth_annotated/train/<drive>/proj_depth/groundtruth/image_02/`` (as the KITTI zip
    unpacks), and BTS-style split lists, each ending with an image listed without ground
    truth (``None``). Frame sizes cycle through ``sizes`` (KITTI's vary). Returns
    (test list, train list or None, {depth PNG path: depth in metres as stored})."""
    root = Path(root)
    kitti = root / "kitti"
    rng = np.random.default_rng(seed)
    date, drive = "2011_09_26", "2011_09_26_drive_0002_sync"
    depths, lists, frame = {}, [], 0

    def write_split(name: str, n: int) -> Path:
        nonlocal frame
        lines = []
        for i in range(n + 1):  # the last one without ground truth
            h, w = sizes[frame % len(sizes)]
            stem = f"{frame:010d}"
            image_rel = f"{date}/{drive}/image_02/data/{stem}.png"
            yy, xx = np.mgrid[0:h, 0:w]
            rgb = np.stack([(xx + 13 * frame) % 256, (yy * 2) % 256, (xx // 3 + yy) % 256], -1).astype(np.uint8)
            path = kitti / "raw" / image_rel
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, lambda p: Image.fromarray(rgb).save(p, format="PNG"))
            depth_rel = "None"
            if i < n:
                depth_rel = f"{drive}/proj_depth/groundtruth/image_02/{stem}.png"
                metres = 2.0 + 70.0 * (1.0 - yy / h) + 5.0 * xx / w + rng.uniform(0, 1, (h, w))
                stored = np.round(metres * 256).astype(np.uint16)
                stored[(yy < 0.35 * h) | (rng.random((h, w)) > 0.1)] = 0
                dpath = kitti / "data_depth_annotated" / "train" / depth_rel
                dpath.parent.mkdir(parents=True, exist_ok=True)
                atomic_write(dpath, lambda p: Image.fromarray(stored).save(p, format="PNG"))
                depths[str(dpath)] = stored.astype(np.float32) / 256.0
            lines.append(f"{image_rel} {depth_rel} 721.5377")
            frame += 1
        list_path = root / f"{name}_files_with_gt.txt"
        atomic_write(list_path, "\n".join(lines) + "\n")
        return list_path

    test_list = write_split("eigen_test", n_test)
    train_list = write_split("eigen_train", n_train) if n_train else None
    return test_list, train_list, depths


def _moving_shapes(rng: np.random.Generator, n_frames: int, height: int, width: int, n_objects: int = 3):
    """One video of ``n_objects`` shapes, each moving horizontally in a band of rows of its own
    (so none hides another): object 0 is there throughout, object 1 appears late (from frame
    ``n_frames // 3``, at least 1), object 2 leaves early (absent from the last third, at least the
    last frame). Returns (frames (T, H, W, 3) uint8, masks (N, T, H, W) bool)."""
    yy, xx = np.mgrid[0:height, 0:width]
    background = np.stack([60 + 80 * yy / height, 90 + 60 * xx / width, np.full_like(yy, 120.0)], -1)
    frames = np.repeat(background[None], n_frames, 0).astype(np.float32)
    masks = np.zeros((n_objects, n_frames, height, width), dtype=bool)
    band = height // n_objects
    late, early = max(1, n_frames // 3), n_frames - max(1, n_frames // 3)
    spans = [(0, n_frames), (late, n_frames), (0, early)]
    for k in range(n_objects):
        first, stop = spans[k % 3]
        h = int(rng.integers(max(2, band // 2), band))
        w = int(rng.integers(max(2, width // 8), max(3, width // 4)))
        top = k * band + int(rng.integers(0, band - h + 1))
        x0, x1 = rng.uniform(0, width - w, size=2)
        disc = k % 2 == 1
        colour = rng.uniform(30, 255, size=3)
        for t in range(first, stop):
            left = x0 + (x1 - x0) * t / max(n_frames - 1, 1)
            if disc:
                cy, cx = top + h / 2 - 0.5, left + w / 2 - 0.5
                m = ((yy - cy) / (h / 2)) ** 2 + ((xx - cx) / (w / 2)) ** 2 <= 1
            else:
                c0 = int(round(left))
                m = (yy >= top) & (yy < top + h) & (xx >= c0) & (xx < c0 + w)
            masks[k, t] = m
            frames[t][m] = colour
    frames += rng.normal(0, 4, frames.shape)
    return np.clip(frames, 0, 255).astype(np.uint8), masks


def write_ytvis(root, categories, version: int = 2019, split: str = "valid", n_videos: int = 2,
                n_frames: int = 5, height: int = 48, width: int = 64, with_annotations: bool = True,
                seed: int = 0):
    """Write ``root/ytvis_<version>/<split>.json`` and the JPEG frames under
    ``root/ytvis_<version>/<split>/JPEGImages/<video>/`` as YouTube-VIS has them (frame names
    ``00000.jpg``, ``00005.jpg``, ...: every 5th frame of the source video), ``n_videos`` videos
    of ``n_frames`` frames with three moving objects each (see :func:`_moving_shapes`) of random
    categories among ``categories`` (dicts with ``id`` and ``name``: the project's list of that
    year, e.g. ``mask2former_video.data.ytvis.YTVIS_CATEGORIES_2019``).

    The JSON has ``info``, ``licenses``, ``videos``, ``categories`` (``categories``' ids and names) and, with ``with_annotations``, ``annotations``: per object ``segmentations``
    (compressed RLE with str counts, None where the object is absent), ``bboxes`` ([x, y, w, h]
    or None), ``areas`` (or None), ``category_id``, ``iscrowd`` 0, ``video_id``, ``id`` and the
    video's ``height``, ``width``, ``length``. Without, the key is left out (as in the public
    valid / test sets). Existing files are overwritten, each atomically.

    Returns (JSON path, {video id: (N, T, H, W) bool masks}); the masks are those the
    annotations of that video hold, in their order (drawn also when not written)."""
    import pycocotools.mask as mask_util

    from .evaluation.panoptic import mask_bbox

    if not categories or not all("id" in c and "name" in c for c in categories):
        raise ValueError("categories must be a non-empty list of dicts with 'id' and 'name' (the YouTube-VIS "
                         "categories of the year)")
    if n_frames < 2:
        raise ValueError(f"n_frames must be at least 2 (an object appears late and one leaves early), got {n_frames}")
    base = Path(root) / f"ytvis_{version}"
    rng = np.random.default_rng([seed, version, *split.encode()])
    videos, annotations, truth = [], [], {}
    for vid in range(1, n_videos + 1):
        name = f"{int(rng.integers(16 ** 9)):010x}"  # ten hex digits, as YouTube-VIS names its videos
        frames, masks = _moving_shapes(rng, n_frames, height, width)
        folder = base / split / "JPEGImages" / name
        folder.mkdir(parents=True, exist_ok=True)
        file_names = []
        for t, frame in enumerate(frames):
            file_names.append(f"{name}/{5 * t:05d}.jpg")
            atomic_write(folder / f"{5 * t:05d}.jpg",
                         lambda p, im=frame: Image.fromarray(im).save(p, format="JPEG", quality=95))
        videos.append({"id": vid, "width": width, "height": height, "length": n_frames, "file_names": file_names,
                       "license": 1, "flickr_url": "", "coco_url": "", "date_captured": "2019-04-11 00:00:00"})
        truth[vid] = masks
        cat_ids = rng.choice([c["id"] for c in categories], size=len(masks))
        for k, track in enumerate(masks):
            segms, bboxes, areas = [], [], []
            for m in track:
                if m.any():
                    rle = mask_util.encode(np.asfortranarray(m.astype(np.uint8)))
                    segms.append({"size": [height, width], "counts": rle["counts"].decode("ascii")})
                    bboxes.append([float(v) for v in mask_bbox(m)])
                    areas.append(int(m.sum()))
                else:  # absent in this frame
                    segms.append(None)
                    bboxes.append(None)
                    areas.append(None)
            annotations.append({"id": len(annotations) + 1, "video_id": vid, "category_id": int(cat_ids[k]),
                                "iscrowd": 0, "height": height, "width": width, "length": n_frames,
                                "segmentations": segms, "bboxes": bboxes, "areas": areas})
    data = {"info": {"description": f"synthetic YouTube-VIS {version} {split}"},
            "licenses": [{"id": 1, "name": "synthetic"}], "videos": videos,
            "categories": [{"supercategory": "object", "id": c["id"], "name": c["name"]} for c in categories]}
    if with_annotations:
        data["annotations"] = annotations
    json_path = base / f"{split}.json"
    atomic_write(json_path, json.dumps(data))
    return json_path, truth
