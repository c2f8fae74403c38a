"""YouTube-VIS AP against numbers worked out by hand from the YouTube-VIS API's arithmetic
(spatio-temporal IoU, mean area over non-zero frames, COCO matching and 101-point precision).

Precision is tp / (tp + fp + eps) in the API, so a "1.0" is 1 / (1 + 2.2e-16): compare with a tolerance."""
import json
import math
import uuid

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_util

from detectron2.data import MetadataCatalog

from expedit_d2.evaluation import YTVISEvaluator, ytvis_evaluate
from expedit_d2.evaluation.ytvis import (IOU_THRESHOLDS, YTVISGroundTruth, mean_area, spatiotemporal_iou,
                                         to_rle)

H, W = 4, 5


def box(r0, r1, c0, c1, shape=(H, W)) -> np.ndarray:
    """A bool mask with rows r0:r1 and columns c0:c1 set."""
    m = np.zeros(shape, dtype=bool)
    m[r0:r1, c0:c1] = True
    return m


def rle(m: np.ndarray) -> dict:
    r = mask_util.encode(np.asfortranarray(m.astype(np.uint8)))
    r["counts"] = r["counts"].decode("ascii")
    return r


def ground_truth(videos: dict, annotations: list, categories=(1,)) -> dict:
    """videos {id: (length, height, width)}; annotations: dicts with video_id, category_id, masks
    (one bool array or None per frame), optional iscrowd and areas (default: the masks' areas)."""
    anns = []
    for i, a in enumerate(annotations):
        masks = a["masks"]
        anns.append({"id": i + 1, "video_id": a["video_id"], "category_id": a["category_id"],
                     "iscrowd": a.get("iscrowd", 0),
                     "segmentations": [None if m is None else rle(m) for m in masks],
                     "areas": a.get("areas", [None if m is None else int(m.sum()) for m in masks])})
    return {"videos": [{"id": v, "length": t, "height": h, "width": w, "file_names": [f"{v}/{i}.jpg" for i in range(t)]}
                       for v, (t, h, w) in videos.items()],
            "categories": [{"id": c, "name": f"cat{c}"} for c in categories],
            "annotations": anns}


def pred(video_id, score, masks, category_id=1) -> dict:
    return {"video_id": video_id, "category_id": category_id, "score": score,
            "segmentations": [None if m is None else rle(m) for m in masks]}


ONE = 1 / (1 + np.spacing(1))  # the API's precision of a lone true positive


# --------------------------------------------------------------------------------------
# geometry
# --------------------------------------------------------------------------------------
def test_spatiotemporal_iou_by_hand():
    # frame 0: both absent (adds nothing); 1: object appears late, GT absent, prediction 2 px
    # (union +2); 2: GT 4 px, prediction 4 px, 2 px shared (inter 2, union 6); 3: prediction absent
    # (union +3); 4: both present but empty (adds nothing). IoU = 2 / (2 + 6 + 3) = 2/11.
    empty = np.zeros((H, W), bool)
    gt = [None, None, box(0, 2, 0, 2), box(3, 4, 0, 3), empty]
    dt = [None, box(0, 1, 3, 5), box(0, 2, 1, 3), None, empty]
    assert [m.sum() if m is not None else None for m in gt] == [None, None, 4, 3, 0]
    iou = spatiotemporal_iou([to_rle(rle(m), H, W) if m is not None else None for m in dt],
                             [to_rle(rle(m), H, W) if m is not None else None for m in gt])
    assert iou == pytest.approx(2 / 11, abs=1e-15)
    # both absent (or empty) everywhere: no union, IoU 0 (the API prints a warning and uses 0)
    assert spatiotemporal_iou([None, rle(empty)], [None, rle(empty)]) == 0.0
    # the same object, present only in the last frame
    assert spatiotemporal_iou([None, rle(box(0, 2, 0, 2))], [None, rle(box(0, 2, 0, 2))]) == 1.0
    with pytest.raises(ValueError, match="3 and 2 frames"):
        spatiotemporal_iou([None] * 3, [None] * 2)


def test_segmentation_formats_give_the_same_mask():
    m = box(1, 3, 1, 4)
    compressed = rle(m)
    uncompressed = {"size": [H, W], "counts": [5, 2, 2, 2, 2, 2, 5]}  # column-major runs of m
    polygon = [[1, 1, 4, 1, 4, 3, 1, 3]]  # x, y corners; pycocotools fills the same 6 pixels
    as_bytes = dict(compressed, counts=compressed["counts"].encode())
    for segm in (uncompressed, polygon, as_bytes):
        r = to_rle(segm, H, W)
        assert np.array_equal(mask_util.decode(r), m.astype(np.uint8)), segm
        assert spatiotemporal_iou([r], [compressed]) == 1.0
    for absent in (None, [], {}):
        assert to_rle(absent, H, W) is None
    with pytest.raises(ValueError, match=r"mask size \[4, 6\].*\[4, 5\]"):
        to_rle(rle(np.zeros((4, 6), bool)), H, W)


def test_track_area_is_the_mean_over_non_zero_frames():
    assert mean_area([None, 0, 100, 200]) == 150.0  # None and 0 left out
    assert mean_area([None, 0]) == 0.0
    assert mean_area([]) == 0.0


# --------------------------------------------------------------------------------------
# AP arithmetic
# --------------------------------------------------------------------------------------
def test_perfect_prediction():
    masks = [None, box(0, 2, 0, 2), box(1, 3, 1, 3)]  # appears in frame 1
    gt = ground_truth({1: (3, H, W)}, [{"video_id": 1, "category_id": 1, "masks": masks}])
    m = ytvis_evaluate(gt, [pred(1, 0.9, masks)])
    assert list(m) == ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10"]
    for k in ("AP", "AP50", "AP75", "APs"):
        assert m[k] == pytest.approx(100 * ONE, abs=1e-12)
    assert m["AR1"] == m["AR10"] == 100.0
    assert math.isnan(m["APm"]) and math.isnan(m["APl"])  # no medium / large track: undefined, NaN


@pytest.mark.parametrize("inter, union, reached", [(3, 5, 3), (4, 7, 2)])
def test_partial_iou_reaches_the_thresholds_up_to_it(inter, union, reached):
    # IoU 3/5 = 0.6 is >= the 0.60 threshold (matching takes IoU >= threshold), so it counts at
    # 0.50, 0.55 and 0.60: AP = 3/10 of the thresholds; IoU 4/7 = 0.571 reaches 0.50 and 0.55 only
    assert 0.6 >= IOU_THRESHOLDS[2] and 4 / 7 < IOU_THRESHOLDS[2]
    gt_mask = np.zeros((H, W), bool)
    gt_mask.flat[:union] = True
    dt_mask = np.zeros((H, W), bool)
    dt_mask.flat[:inter] = True
    gt = ground_truth({1: (2, H, W)}, [{"video_id": 1, "category_id": 1, "masks": [gt_mask, None]}])
    m = ytvis_evaluate(gt, [pred(1, 0.5, [dt_mask, None])])
    assert m["AP"] == pytest.approx(100 * reached / 10 * ONE, abs=1e-12)
    assert m["AP50"] == pytest.approx(100 * ONE, abs=1e-12)
    assert m["AP75"] == 0.0
    assert m["AR1"] == pytest.approx(100 * reached / 10, abs=1e-12)  # recall 1 at `reached` of 10 thresholds


def test_tied_scores_keep_the_results_order():
    # two predictions with the same score on one GT: the one listed first is matched first (stable sort)
    target = box(0, 4, 0, 5)  # 20 px
    good = [target]
    partial = [box(0, 4, 0, 3)]  # 12 of 20 px: IoU 0.6
    gt = ground_truth({1: (1, H, W)}, [{"video_id": 1, "category_id": 1, "masks": [target]}])
    # good first: TP at every threshold, the partial one an FP after it -> precision 1 at recall 1
    assert ytvis_evaluate(gt, [pred(1, 0.7, good), pred(1, 0.7, partial)])["AP"] == pytest.approx(100 * ONE)
    # partial first: at 0.50..0.60 it takes the GT (TP, then FP: precision 1 at recall 1);
    # at 0.65..0.95 it is an FP before the TP: precision 1/2 at every recall point
    m = ytvis_evaluate(gt, [pred(1, 0.7, partial), pred(1, 0.7, good)])
    assert m["AP"] == pytest.approx(100 * (3 * ONE + 7 * 0.5) / 10)
    assert m["AR1"] == pytest.approx(100 * 3 / 10)  # the first prediction alone reaches 0.60 at most


def test_ties_across_videos_are_broken_by_video_id():
    # video 1's prediction misses, video 2's is perfect, both score 0.5, listed video 2 first.
    # Pooled in video id order: [FP, TP] -> recall [0, 1/2], envelope precision 1/2; the 51 recall
    # points 0.00..0.50 get 1/2, the other 50 get 0: AP = 0.5 * 51 / 101 at every threshold.
    obj, elsewhere = box(0, 2, 0, 2), box(2, 4, 3, 5)
    gt = ground_truth({1: (1, H, W), 2: (1, H, W)}, [{"video_id": v, "category_id": 1, "masks": [obj]} for v in (1, 2)])
    m = ytvis_evaluate(gt, [pred(2, 0.5, [obj]), pred(1, 0.5, [elsewhere])])
    assert m["AP"] == pytest.approx(100 * 0.5 * 51 / 101)
    assert m["AR1"] == m["AR10"] == 50.0
    # in the listed order ([TP, FP]) it would have been precision 1 on 51 points: 100 * 51 / 101
    assert m["AP"] != pytest.approx(100 * 51 / 101)


def test_ar1_and_ar10_with_several_predictions_per_video():
    a, b, junk = box(0, 2, 0, 2), box(2, 4, 3, 5), box(0, 1, 4, 5)
    gt = ground_truth({1: (1, H, W)}, [{"video_id": 1, "category_id": 1, "masks": [a]},
                                       {"video_id": 1, "category_id": 1, "masks": [b]}])
    m = ytvis_evaluate(gt, [pred(1, 0.7, [b]), pred(1, 0.9, [a]), pred(1, 0.8, [junk])])
    # by score: A (TP), junk (FP), B (TP): recall [1/2, 1/2, 1], precision [1, 1/2, 2/3] ->
    # envelope [1, 2/3, 2/3]; recall points 0.00..0.50 (51) get 1, 0.51..1.00 (50) get 2/3
    assert m["AP"] == pytest.approx(100 * (51 * ONE + 50 * 2 / 3) / 101)
    assert m["AR1"] == 50.0  # one prediction per video: one of two objects
    assert m["AR10"] == 100.0


def test_categories_without_ground_truth_are_left_out():
    obj = box(0, 2, 0, 2)
    gt = ground_truth({1: (1, H, W)}, [{"video_id": 1, "category_id": 1, "masks": [obj]}], categories=(1, 2, 3))
    # category 1 perfect; 2 has neither GT nor prediction; 3 only a prediction: both -1, not 0
    m = ytvis_evaluate(gt, [pred(1, 0.9, [obj], category_id=1), pred(1, 0.8, [obj], category_id=3)])
    assert m["AP"] == pytest.approx(100 * ONE)
    assert m["AR10"] == 100.0
    # a category the ground truth does not list is skipped, as the API's category filter does
    assert ytvis_evaluate(gt, [pred(1, 0.9, [obj]), pred(1, 0.95, [box(2, 4, 2, 4)], category_id=7)])["AP"] == \
        pytest.approx(100 * ONE)
    # nothing defined at all (only crowd GT): every metric NaN, as Mask2Former reports -1
    crowd_only = ground_truth({1: (1, H, W)}, [{"video_id": 1, "category_id": 1, "masks": [obj], "iscrowd": 1}])
    assert all(math.isnan(v) for v in ytvis_evaluate(crowd_only, [pred(1, 0.9, [obj])]).values())


def test_crowd_tracks_use_plain_iou_and_absorb_several_predictions():
    normal, crowd = box(0, 2, 0, 2), box(3, 4, 0, 5)  # crowd 5 px
    inside = box(3, 4, 0, 3)  # 3 px inside the crowd region: IoU 3/5 (COCO would use 3/3 for crowd)
    gt = ground_truth({1: (1, H, W)}, [{"video_id": 1, "category_id": 1, "masks": [normal]},
                                       {"video_id": 1, "category_id": 1, "masks": [crowd], "iscrowd": 1}])
    m = ytvis_evaluate(gt, [pred(1, 0.9, [inside]), pred(1, 0.85, [inside]), pred(1, 0.8, [normal])])
    # 0.50..0.60: both predictions on the crowd are matched to it and ignored -> [TP]: precision 1
    # 0.65..0.95: they are FPs before the TP -> precision 1/3 at every recall point
    assert m["AP"] == pytest.approx(100 * (3 * ONE + 7 / 3) / 10)
    assert m["AP50"] == pytest.approx(100 * ONE)
    assert m["AP75"] == pytest.approx(100 / 3)


def test_area_ranges_use_the_mean_over_non_zero_frames_and_youtube_vis_bounds():
    side = 130  # 130^2 = 16900 px: medium for YouTube-VIS (128^2..256^2), large for COCO (> 96^2)
    full, empty = np.ones((side, side), bool), np.zeros((side, side), bool)
    junk = box(0, 2, 0, 2, shape=(side, side))  # 4 px, small
    gt = ground_truth({1: (2, side, side)}, [{"video_id": 1, "category_id": 1, "masks": [full, empty]}])
    assert gt["annotations"][0]["areas"] == [16900, 0]  # mean 16900 without the 0 (8450, small, with it)
    m = ytvis_evaluate(gt, [pred(1, 0.9, [junk, empty]), pred(1, 0.8, [full, empty])])
    assert m["AP"] == pytest.approx(50.0)  # all areas: the junk is an FP before the TP: precision 1/2
    # medium: the junk (4 px) is unmatched and outside the range: ignored, so precision 1
    assert m["APm"] == pytest.approx(100 * ONE)
    assert math.isnan(m["APs"]) and math.isnan(m["APl"])  # the only track is medium


def test_at_most_100_predictions_per_video_after_a_stable_sort():
    obj, junk = box(0, 2, 0, 2), box(2, 4, 3, 5)
    gt = ground_truth({1: (1, H, W)}, [{"video_id": 1, "category_id": 1, "masks": [obj]}])
    junks = [pred(1, 0.5, [junk]) for _ in range(100)]
    assert ytvis_evaluate(gt, junks + [pred(1, 0.5, [obj])])["AR10"] == 0.0  # 101st of equal scores: cut
    m = ytvis_evaluate(gt, [pred(1, 0.5, [obj])] + junks)
    assert m["AP"] == pytest.approx(100 * ONE) and m["AR1"] == 100.0


def test_bad_results_raise_naming_the_value():
    obj = box(0, 2, 0, 2)
    gt = ground_truth({1: (2, H, W)}, [{"video_id": 1, "category_id": 1, "masks": [obj, None]}])
    with pytest.raises(ValueError, match="unknown video_id 9"):
        ytvis_evaluate(gt, [pred(9, 0.5, [obj, None])])
    with pytest.raises(ValueError, match="3 segmentations for a video of length 2"):
        ytvis_evaluate(gt, [pred(1, 0.5, [obj, None, None])])
    with pytest.raises(ValueError, match=r"frame 0: mask size \[3, 5\]"):
        ytvis_evaluate(gt, [pred(1, 0.5, [np.ones((3, 5), bool), None])])
    with pytest.raises(ValueError, match="score must be a finite number, got nan"):
        ytvis_evaluate(gt, [pred(1, float("nan"), [obj, None])])
    with pytest.raises(ValueError, match="missing \\['score'\\]"):
        ytvis_evaluate(gt, [{"video_id": 1, "category_id": 1, "segmentations": [None, None]}])
    bad_gt = ground_truth({1: (2, H, W)}, [{"video_id": 1, "category_id": 1, "masks": [obj]}])
    with pytest.raises(ValueError, match="annotation 1 .*1 segmentations for a video of length 2"):
        YTVISGroundTruth(bad_gt)


# --------------------------------------------------------------------------------------
# the Detectron2 evaluator
# --------------------------------------------------------------------------------------
@pytest.fixture
def dataset(tmp_path):
    """A registered two-video dataset (video 1: 3 frames 4x5, video 2: 2 frames 6x7) of
    categories 5 (contiguous 0) and 8 (contiguous 1); ``(name, gt dict)``. ``annotated=False``
    drops the annotations, as YouTube-VIS valid sets ship."""
    names = []

    def make(annotated=True):
        gt = ground_truth({1: (3, H, W), 2: (2, 6, 7)},
                          [{"video_id": 1, "category_id": 5, "masks": [None, box(0, 2, 0, 2), box(0, 2, 1, 3)]},
                           {"video_id": 2, "category_id": 8, "masks": [box(0, 6, 0, 7, (6, 7)), None]}],
                          categories=(5, 8))
        if not annotated:
            del gt["annotations"]
        name = f"ytvis_test_{uuid.uuid4().hex[:8]}"
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(gt))
        MetadataCatalog.get(name).set(json_file=str(path), thing_classes=["cat5", "cat8"],
                                      thing_dataset_id_to_contiguous_id={5: 0, 8: 1})
        names.append(name)
        return name, gt

    yield make
    for name in names:
        MetadataCatalog.remove(name)


def video_masks(gt, video_id):
    """The GT masks of ``video_id`` as one (T, H, W) bool tensor (zeros where absent)."""
    video = next(v for v in gt["videos"] if v["id"] == video_id)
    ann = next(a for a in gt["annotations"] if a["video_id"] == video_id)
    return torch.from_numpy(np.stack([mask_util.decode(s).astype(bool) if s else np.zeros((video["height"], video["width"]), bool)
                                      for s in ann["segmentations"]]))


def test_evaluator_end_to_end(dataset, tmp_path):
    name, gt = dataset()
    out_dir = tmp_path / "out"
    ev = YTVISEvaluator(name, output_dir=str(out_dir))
    ev.reset()
    # Mask2Former's video model returns one dict for its one video; a list of dicts works too
    ev.process([{"video_id": 1, "length": 3}],
               {"pred_scores": [0.9, 0.4], "pred_labels": [0, 1],
                "pred_masks": [video_masks(gt, 1), torch.zeros(3, H, W, dtype=torch.bool)]})
    ev.process([{"video_id": 2, "length": 2}],
               [{"pred_scores": [0.8], "pred_labels": [1], "pred_masks": [video_masks(gt, 2).numpy()]}])
    res = ev.evaluate()
    assert list(res) == ["segm"]
    m = res["segm"]
    assert m["AP"] == pytest.approx(100 * ONE) and m["AR1"] == 100.0
    # per category: the empty cat8 prediction in video 1 (avg area 0) comes after the TP of video 2
    assert m["AP-cat5"] == pytest.approx(100 * ONE) and m["AP-cat8"] == pytest.approx(100 * ONE)

    results = json.loads((out_dir / "results.json").read_text())
    assert len(results) == 3
    assert [(r["video_id"], r["category_id"], r["score"]) for r in results] == [(1, 5, 0.9), (1, 8, 0.4), (2, 8, 0.8)]
    for r in results:
        length = 3 if r["video_id"] == 1 else 2
        assert len(r["segmentations"]) == length
        assert all(isinstance(s["counts"], str) for s in r["segmentations"])
    assert [s["size"] for s in results[2]["segmentations"]] == [[6, 7], [6, 7]]
    # the file scores the same as the evaluator
    from_file = ytvis_evaluate(gt, results)
    assert all(a == m[k] or (math.isnan(a) and math.isnan(m[k])) for k, a in from_file.items())
    assert not list(out_dir.glob(".*.tmp"))


def test_evaluator_without_annotations_writes_results_only(dataset, tmp_path, caplog):
    name, gt = dataset(annotated=False)
    ev = YTVISEvaluator(name, output_dir=str(tmp_path / "out"))
    ev.reset()
    ev.process([{"video_id": 2, "length": 2}],
               {"pred_scores": [0.8], "pred_labels": [0], "pred_masks": [torch.ones(2, 6, 7, dtype=torch.bool)]})
    with caplog.at_level("INFO", logger="expedit_d2.evaluation.ytvis"):
        assert ev.evaluate() == {}
    assert "no annotations" in caplog.text
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert len(results) == 1 and results[0]["category_id"] == 5
    assert mask_util.area(results[0]["segmentations"][0]) == 42


def test_evaluator_refuses_bad_outputs(dataset):
    name, gt = dataset()
    ev = YTVISEvaluator(name)
    ev.reset()
    ok = {"pred_scores": [0.5], "pred_labels": [0], "pred_masks": [torch.zeros(3, H, W, dtype=torch.bool)]}
    with pytest.raises(ValueError, match="unknown video_id 42"):
        ev.process([{"video_id": 42, "length": 3}], ok)
    with pytest.raises(ValueError, match=r"mask shape \(2, 4, 5\) differs from the video's \(length, height, width\) \(3, 4, 5\)"):
        ev.process([{"video_id": 1}], dict(ok, pred_masks=[torch.zeros(2, H, W, dtype=torch.bool)]))
    with pytest.raises(ValueError, match=r"mask shape \(3, 4, 6\)"):
        ev.process([{"video_id": 1}], dict(ok, pred_masks=[torch.zeros(3, H, 6, dtype=torch.bool)]))
    with pytest.raises(ValueError, match="input length 4 but length 3"):
        ev.process([{"video_id": 1, "length": 4}], ok)
    with pytest.raises(ValueError, match="label 2 is not a contiguous id"):
        ev.process([{"video_id": 1}], dict(ok, pred_labels=[2]))
    with pytest.raises(ValueError, match="1 scores, 2 labels and 1 masks"):
        ev.process([{"video_id": 1}], dict(ok, pred_labels=[0, 1]))
    assert ev._predictions == []
