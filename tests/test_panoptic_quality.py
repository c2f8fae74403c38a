"""PQ against the definition, on a hand-made fixture with void, crowd and unmatched segments."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from detectron2.data import DatasetCatalog, MetadataCatalog

from expedit_d2.evaluation.panoptic import PanopticQualityEvaluator, id2rgb, pq_compute, pq_single_image, rgb2id

CATEGORIES = [{"id": 1, "name": "person", "isthing": 1}, {"id": 2, "name": "sky", "isthing": 0},
              {"id": 3, "name": "car", "isthing": 1}]
# ground truth: person 10 (12 px), sky 20 (16 px), a car crowd region 30 (8 px), void (12 px)
GT = np.array([[10, 10, 10, 10, 20, 20, 20, 20],
               [10, 10, 10, 10, 20, 20, 20, 20],
               [10, 10, 10, 10, 20, 20, 20, 20],
               [30, 30, 30, 30, 20, 20, 20, 20],
               [30, 30, 30, 30, 0, 0, 0, 0],
               [0, 0, 0, 0, 0, 0, 0, 0]])
GT_SEGMENTS = [{"id": 10, "category_id": 1, "iscrowd": 0}, {"id": 20, "category_id": 2, "iscrowd": 0},
               {"id": 30, "category_id": 3, "iscrowd": 1}]
# prediction: person 100 (11 px, IoU 11/12 with 10), person 500 on the sky (8 px, FP),
# sky 200 (8 px, IoU exactly 0.5 with 20: no match -> FP and FN), car 300 on the car crowd
# region (ignored), person 400 on void (ignored), one void pixel
PRED = np.array([[100, 100, 100, 100, 500, 500, 500, 500],
                 [100, 100, 100, 100, 500, 500, 500, 500],
                 [100, 100, 100, 0, 200, 200, 200, 200],
                 [300, 300, 300, 300, 200, 200, 200, 200],
                 [300, 300, 300, 300, 400, 400, 400, 400],
                 [400, 400, 400, 400, 400, 400, 400, 400]])
PRED_SEGMENTS = [{"id": 100, "category_id": 1}, {"id": 200, "category_id": 2},
                 {"id": 300, "category_id": 3}, {"id": 400, "category_id": 1},
                 {"id": 500, "category_id": 1}]
# by the definition: person TP 1 (IoU 11/12), FP 1 -> PQ (11/12) / 1.5; sky TP 0, FP 1, FN 1
# -> PQ 0; car: nothing counted (crowd), so not averaged
PERSON_PQ, PERSON_SQ, PERSON_RQ = (11 / 12) / 1.5, 11 / 12, 1 / 1.5


def check(m):
    assert m["per_class"][1] == pytest.approx({"pq": PERSON_PQ, "sq": PERSON_SQ, "rq": PERSON_RQ})
    assert m["per_class"][2] == pytest.approx({"pq": 0.0, "sq": 0.0, "rq": 0.0})
    assert 3 not in m["per_class"]
    assert m["All"] == pytest.approx({"pq": PERSON_PQ / 2, "sq": PERSON_SQ / 2, "rq": PERSON_RQ / 2, "n": 2})
    assert m["Things"] == pytest.approx({"pq": PERSON_PQ, "sq": PERSON_SQ, "rq": PERSON_RQ, "n": 1})
    assert m["Stuff"] == pytest.approx({"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 1})


def test_single_image_matches_the_definition():
    stat = pq_single_image(GT, GT_SEGMENTS, PRED, PRED_SEGMENTS, {c["id"]: c for c in CATEGORIES})
    assert (stat.tp[1], stat.fp[1], stat.fn[1]) == (1, 1, 0)
    assert (stat.tp[2], stat.fp[2], stat.fn[2]) == (0, 1, 1)
    assert (stat.tp[3], stat.fp[3], stat.fn[3]) == (0, 0, 0)
    check(stat.metrics({c["id"]: c for c in CATEGORIES}))


def test_rgb_id_round_trip():
    ids = np.array([[0, 1, 255, 256, 65535, 16777215]])
    assert np.array_equal(rgb2id(id2rgb(ids)), ids)


def _write_gt(tmp_path):
    root = tmp_path / "panoptic_val"
    root.mkdir()
    Image.fromarray(id2rgb(GT)).save(root / "000001.png")
    gt_json = tmp_path / "panoptic_val.json"
    gt_json.write_text(json.dumps({
        "images": [{"id": 1, "file_name": "000001.jpg", "height": 6, "width": 8}],
        "annotations": [{"image_id": 1, "file_name": "000001.png", "segments_info": GT_SEGMENTS}],
        "categories": CATEGORIES}))
    return root, gt_json


def test_file_based_pq_compute(tmp_path):
    root, gt_json = _write_gt(tmp_path)
    pred_dir = tmp_path / "pred"
    pred_dir.mkdir()
    Image.fromarray(id2rgb(PRED)).save(pred_dir / "000001.png")
    pred_json = tmp_path / "pred.json"
    pred_json.write_text(json.dumps({"annotations": [
        {"image_id": 1, "file_name": "000001.png", "segments_info": PRED_SEGMENTS}]}))
    check(pq_compute(str(gt_json), str(pred_json), str(root), str(pred_dir)))


def test_evaluator_on_model_outputs(tmp_path, caplog):
    root, gt_json = _write_gt(tmp_path)
    name = "expedit_test_pq_fixture"
    DatasetCatalog.register(name, lambda: [])
    # contiguous ids: things person 0, car 1; stuff sky 2
    MetadataCatalog.get(name).set(panoptic_json=str(gt_json), panoptic_root=str(root),
                                  thing_dataset_id_to_contiguous_id={1: 0, 3: 1},
                                  stuff_dataset_id_to_contiguous_id={2: 2}, label_divisor=1000)
    try:
        ev = PanopticQualityEvaluator(name, distributed=False)
        ev.reset()
        contiguous = {1: 0, 2: 2, 3: 1}
        segments = [{"id": s["id"], "category_id": contiguous[s["category_id"]],
                     "isthing": s["category_id"] != 2} for s in PRED_SEGMENTS]
        ev.process([{"image_id": 1}], [{"panoptic_seg": (torch.from_numpy(PRED), segments)}])
        with caplog.at_level("INFO", logger="expedit_d2"):
            res = ev.evaluate()["panoptic_seg"]
        # Detectron2's panoptic table: one row each for All, Things, Stuff
        table = caplog.records[-1].getMessage()
        header = [c.strip() for c in table.splitlines()[1].strip("|").split("|")]
        assert header == ["", "PQ", "SQ", "RQ", "#categories"]
        rows = {line.split("|")[1].strip(): line for line in table.splitlines()[3:]}
        assert set(rows) == {"All", "Things", "Stuff"}
        assert f"{100 * PERSON_PQ:.3f}" in rows["Things"] and f"{100 * PERSON_PQ / 2:.3f}" in rows["All"]
        assert res["PQ"] == pytest.approx(100 * PERSON_PQ / 2)
        assert res["PQ_th"] == pytest.approx(100 * PERSON_PQ)
        assert res["SQ_th"] == pytest.approx(100 * PERSON_SQ)
        assert res["RQ_th"] == pytest.approx(100 * PERSON_RQ)
        assert res["PQ_st"] == 0.0
        # the label-divisor form of the same prediction (category * 1000 + instance, -1 void)
        ev.reset()
        lab = np.full(PRED.shape, -1, dtype=np.int64)
        for s in PRED_SEGMENTS:
            lab[PRED == s["id"]] = contiguous[s["category_id"]] * 1000 + s["id"]
        ev.process([{"image_id": 1}], [{"panoptic_seg": (torch.from_numpy(lab), None)}])
        assert ev.evaluate()["panoptic_seg"]["PQ"] == pytest.approx(100 * PERSON_PQ / 2)
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def test_bad_predictions_are_named():
    cats = {c["id"]: c for c in CATEGORIES}
    with pytest.raises(KeyError, match="unknown category_id 9"):
        pq_single_image(GT, GT_SEGMENTS, PRED, [{"id": 100, "category_id": 9}], cats)
    with pytest.raises(KeyError, match=r"segment ids \[200, 300, 400, 500\] in the PNG but not in segments_info"):
        pq_single_image(GT, GT_SEGMENTS, PRED, [{"id": 100, "category_id": 1}], cats)
