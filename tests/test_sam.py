"""SAM as its users run it: segment-anything's SamPredictor and SamAutomaticMaskGenerator on an
expedited model, the official Expedit-SAM presets, checkpoints in the real format, the mask
agreement measure and tools/sam_amg.py end to end.

Full-size models: ViT-B is built, saved as segment-anything's checkpoints are
(``torch.save(sam.state_dict())``, ~360 MB in tmp_path, deleted after), loaded with
``sam_model_registry["vit_b"](checkpoint=...)`` and patched with every preset; its encoder is
not run on a real 1024 x 1024 input (about a minute on two shared CPU cores). Instead ViT-B,
ViT-L and ViT-H are built on the meta device (no memory, no weights) and their expedited
encoders run on a meta input: every shape of the patched forward at full size, no
arithmetic. ViT-L and ViT-H are never written to disk.
"""
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from segment_anything import SamAutomaticMaskGenerator, SamPredictor, sam_model_registry

from expedit_d2 import ExpeditSettings, remove_patch
from expedit_d2.sam import (
    DEFAULT_PRESET, PRESET_SOURCES, PUBLISHED_BASE_SPEED, PUBLISHED_SPEED, SAM_PRESETS, best_iou_means,
    build_tiny_sam, expedit_sam, mask_ious, mean_best_iou, official_settings, sam_settings)
from tests.numerics import assert_close_f32
from tools import sam_amg

#: float32 rounding of one computation done twice, relative to the output's scale
TOLERANCE = 1e-5


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One thread: on a small shared machine several threads mostly wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torch.set_flush_denormal(False)  # the tool's --keep-denormals default turned it on


def picture(h=240, w=320):
    """A flat background, a disc and a rectangle (uint8 RGB)."""
    yy, xx = np.mgrid[:h, :w]
    img = np.empty((h, w, 3), np.uint8)
    img[:] = (40, 90, 160)
    img[(yy - 100) ** 2 + (xx - 110) ** 2 < 60 ** 2] = (220, 200, 40)
    img[150:220, 180:300] = (200, 50, 60)
    return img


def assert_close_scaled(got, want):
    assert_close_f32(got, want, rel=TOLERANCE)


# --------------------------------------------------------------------------------------
# the presets
# --------------------------------------------------------------------------------------
# README.md's speed table (location, clusters) and the amg.py / app.py settings
OFFICIAL = {"h_a18_121": (18, 11), "h_a14_100": (14, 10), "h_a8_100": (8, 10), "h_a8_81": (8, 9),
            "h_a6_81": (6, 9), "h_amg": (6, 10), "h_demo_1.2x": (16, 9), "h_demo_1.5x": (6, 9)}


def test_presets_are_the_official_settings():
    assert set(SAM_PRESETS) == set(OFFICIAL) == set(PRESET_SOURCES) and DEFAULT_PRESET == "h_amg"
    for name, (alpha, side) in OFFICIAL.items():
        s = SAM_PRESETS[name]
        tau = 0.01 if name.startswith("h_demo") else 5e-3  # encoder defaults vs amg.py/benchmark.py defaults
        assert (s.clustering_location, s.num_clusters) == (alpha, (side, side)), name
        assert (s.iters, s.window, s.recon_k, s.temperature, s.recon_temperature) == (5, 5, 20, tau, tau), name
        assert s.reconstruction_mode == "topk" and not s.recon_subtract_min_distance
    assert PUBLISHED_SPEED == {"h_a18_121": (1.40, 1.10), "h_a14_100": (1.52, 1.19), "h_a8_100": (1.64, 1.30),
                               "h_a8_81": (1.82, 1.44), "h_a6_81": (1.89, 1.49)}
    assert PUBLISHED_BASE_SPEED == 1.27
    for speed, ratio in PUBLISHED_SPEED.values():  # the README's ratios: its (unrounded) speeds over 1.27
        assert speed / PUBLISHED_BASE_SPEED == pytest.approx(ratio, abs=0.01)


def test_presets_scale_to_the_depth_and_bad_names_are_refused():
    assert [sam_settings(n, 12).clustering_location for n in OFFICIAL] == [7, 5, 3, 3, 2, 2, 6, 2]
    assert [sam_settings(n, 24).clustering_location for n in OFFICIAL] == [14, 11, 6, 6, 5, 5, 12, 5]
    assert sam_settings("h_a8_81") is SAM_PRESETS["h_a8_81"]
    mine = ExpeditSettings(clustering_location=3, num_clusters=(7, 7), recon_k=5)
    assert sam_settings(mine, 12) is mine
    with pytest.raises(ValueError, match=r"unknown SAM preset 'h_fast'; the presets are: h_a18_121, "):
        sam_settings("h_fast")
    with pytest.raises(ValueError, match=r"num_cluster=99 must be a square"):
        official_settings(6, 99)


# --------------------------------------------------------------------------------------
# SamPredictor and SamAutomaticMaskGenerator, unchanged, on an expedited model
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    return build_tiny_sam()  # 416 x 416 input: 26 x 26 tokens, padded to 28 x 28 by the windows


def test_sam_predictor_runs_the_expedited_encoder(tiny):
    img, point = picture(), dict(point_coords=np.array([[110, 100]]), point_labels=np.array([1]))
    predictor = SamPredictor(tiny)
    predictor.set_image(img)
    base_features = predictor.features
    base_masks, base_scores, base_logits = predictor.predict(**point)
    encoder_input = sam_amg.encoder_input(tiny, img)
    try:
        assert expedit_sam(tiny, "h_amg") is tiny
        assert type(tiny.image_encoder).__name__ == "ExpeditImageEncoderViT"
        assert tiny.image_encoder.token_reduction.location == 1  # alpha 6 of 32 -> 1 of 4
        predictor.set_image(img)  # the predictor made before the patch
        masks, scores, logits = predictor.predict(**point)
        with torch.no_grad():
            assert_close_scaled(predictor.features, tiny.image_encoder(encoder_input))
        again = SamPredictor(tiny)  # and one made after it
        again.set_image(img)
        assert torch.equal(again.features, predictor.features)
    finally:
        remove_patch(tiny.image_encoder)
    assert masks.shape == base_masks.shape == (3, 240, 320) and masks.dtype == np.bool_
    assert scores.shape == (3,) and logits.shape == (3, 104, 104) and logits.dtype == np.float32
    change = ((predictor.features - base_features).norm() / base_features.norm()).item()
    assert 1e-3 < change < 0.5  # expedited, yet near: the tiny model's tokens are spatially redundant
    ious = np.diag(mask_ious(masks, base_masks))
    assert ious.mean() > 0.7, ious
    predictor.set_image(img)  # unpatched again: the base model's outputs, bitwise
    assert torch.equal(predictor.features, base_features)
    assert np.array_equal(predictor.predict(**point)[0], base_masks)


def test_automatic_mask_generator_on_the_expedited_model(tiny):
    img = picture()
    generator = SamAutomaticMaskGenerator(tiny, points_per_side=4, pred_iou_thresh=0, stability_score_thresh=0)
    base = generator.generate(img)
    try:
        expedit_sam(tiny, "h_a8_81")
        expedited = generator.generate(img)
    finally:
        remove_patch(tiny.image_encoder)
    assert base and expedited
    for m in expedited:
        assert {"segmentation", "area", "bbox", "predicted_iou", "point_coords", "stability_score",
                "crop_box"} <= set(m)
        assert m["segmentation"].shape == (240, 320) and m["segmentation"].dtype == np.bool_
        assert m["area"] == m["segmentation"].sum()
    a, b = [m["segmentation"] for m in expedited], [m["segmentation"] for m in base]
    assert 0.4 < mean_best_iou(a, b) <= 1 and 0.4 < mean_best_iou(b, a) <= 1


# --------------------------------------------------------------------------------------
# full-size models: real checkpoint format (ViT-B), full-size shapes (B, L, H on meta)
# --------------------------------------------------------------------------------------
def test_vit_b_checkpoint_in_the_real_format_loads_and_takes_every_preset(tmp_path):
    torch.manual_seed(0)
    written = sam_model_registry["vit_b"]()
    state = written.state_dict()
    assert {k.split(".")[0] for k in state} == {"image_encoder", "prompt_encoder", "mask_decoder"}
    path = tmp_path / "sam_vit_b.pth"
    try:
        torch.save(state, path)
        sam = sam_model_registry["vit_b"](checkpoint=str(path))
    finally:
        path.unlink(missing_ok=True)
    names = list(sam.state_dict())
    assert names == list(state)
    assert all(torch.equal(v, state[k]) for k, v in sam.state_dict().items())
    for preset in SAM_PRESETS:
        expedit_sam(sam, preset)
        assert list(sam.state_dict()) == names
        assert sam.image_encoder.token_reduction.location == sam_settings(preset, 12).clustering_location
        remove_patch(sam.image_encoder)
    assert type(sam.image_encoder).__name__ == "ImageEncoderViT"


@pytest.mark.parametrize("model_type, depth, preset", [
    ("vit_b", 12, "h_a18_121"), ("vit_l", 24, "h_a14_100"), ("vit_h", 32, "h_a6_81")])
def test_full_size_encoders_take_the_presets_and_keep_their_shapes(model_type, depth, preset):
    with torch.device("meta"):
        sam = sam_model_registry[model_type]()
    encoder = sam.image_encoder
    assert len(encoder.blocks) == depth
    for name, settings in SAM_PRESETS.items():
        alpha = sam_settings(name, depth).clustering_location
        assert 0 <= alpha < depth and (depth != 32 or alpha == settings.clustering_location)
        expedit_sam(sam, name)
        remove_patch(encoder)
    expedit_sam(sam, preset)
    with torch.no_grad():
        out = encoder(torch.empty(1, 3, 1024, 1024, device="meta"))
    assert out.shape == (1, 256, 64, 64)


# --------------------------------------------------------------------------------------
# mask agreement
# --------------------------------------------------------------------------------------
def square(top, left, size=4, shape=(8, 8)):
    m = np.zeros(shape, bool)
    m[top:top + size, left:left + size] = True
    return m


def test_mean_best_iou_on_hand_made_masks():
    a, shifted, apart = square(0, 0), square(0, 2), square(4, 4)
    assert mean_best_iou([a], [a]) == 1.0
    assert mean_best_iou([a], [apart]) == 0.0
    assert mean_best_iou([a], [shifted]) == pytest.approx(8 / 24)  # 8 shared pixels of 24
    assert mean_best_iou([a, apart], [shifted, a]) == pytest.approx((1 + 0) / 2)
    assert mean_best_iou([shifted, a], [a, apart]) == pytest.approx((8 / 24 + 1) / 2)
    assert mean_best_iou([], [a]) is None and mean_best_iou([a], []) == 0.0
    assert best_iou_means(mask_ious([shifted, a], [a, apart])) == pytest.approx(((8 / 24 + 1) / 2, (1 + 0) / 2))
    np.testing.assert_allclose(mask_ious(np.stack([a, apart]), [a, shifted, apart]),
                               [[1, 8 / 24, 0], [0, 0, 1]])
    big = [square(0, 0, 500, (600, 600)), square(100, 100, 500, (600, 600))]  # several pixel chunks
    assert mask_ious(big[:1], big[1:], chunk=1000)[0, 0] == pytest.approx(400 ** 2 / (2 * 500 ** 2 - 400 ** 2))
    with pytest.raises(ValueError, match="masks of different sizes"):
        mask_ious([a], [square(0, 0, shape=(9, 9))])


# --------------------------------------------------------------------------------------
# tools/sam_amg.py
# --------------------------------------------------------------------------------------
def test_sam_amg_tool_end_to_end_on_a_tiny_random_model(tmp_path):
    Image.fromarray(picture()).save(tmp_path / "scene.png")
    folder = tmp_path / "more"
    folder.mkdir()
    Image.fromarray(picture(200, 150)).save(folder / "scene.jpg")  # same stem: scene_2.png
    out = tmp_path / "out"
    assert sam_amg.main(["--random-weights", "--input", str(tmp_path / "scene.png"), str(folder), "--output",
                         str(out), "--preset", "h_a8_81", "--points-per-side", "3", "--repeats", "1",
                         "--warmup", "0", "--threads", "1", "--device", "cpu"]) == 0
    with Image.open(out / "scene.png") as im:
        assert im.size == (2 * 320 + sam_amg.GAP, 240) and im.mode == "RGB"
    with Image.open(out / "scene_2.png") as im:
        assert im.size == (2 * 150 + sam_amg.GAP, 200)
    data = json.loads((out / "summary.json").read_text())
    assert {"model", "model_type", "checkpoint", "random_weights", "device", "preset", "settings", "amg",
            "repeats", "warmup", "images"} <= set(data)
    assert data["model_type"] == "tiny" and data["checkpoint"] is None and data["preset"] == "h_a8_81"
    assert data["settings"]["clustering_location"] == 1 and data["settings"]["num_clusters"] == [9, 9]
    assert data["amg"] == {"points_per_side": 3, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}
    assert [r["png"] for r in data["images"]] == ["scene.png", "scene_2.png"]
    for r in data["images"]:
        assert set(r["seconds"]) == {"encoder_base", "encoder_expedited", "amg_base", "amg_expedited"}
        assert all(t > 0 for t in r["seconds"].values()) and set(r["speedup"]) == {"encoder", "amg"}
        assert r["masks"]["base"] > 0 and r["masks"]["expedited"] > 0
        assert all(0 <= v <= 1 for v in r["mean_best_iou"].values())
    assert "| [scene.png](scene.png) |" in (out / "summary.md").read_text()


def test_sam_amg_explicit_settings_replace_the_preset():
    args = sam_amg.build_parser().parse_args(["--random-weights", "--input", "x.png", "--output", "o",
                                              "--preset", "h_a18_121", "--num-clusters", "64", "--temperature",
                                              "0.02", "--reconstruction-k", "9"])
    s = sam_amg.expedit_settings(args, 32)
    assert (s.clustering_location, s.num_clusters, s.temperature, s.recon_temperature, s.recon_k, s.iters) == (
        18, (8, 8), 0.02, 0.02, 9, 5)
    assert sam_amg.expedit_settings(args, 12).clustering_location == 7


@pytest.mark.parametrize("extra, message", [
    ([], r"give --checkpoint PATH, or --random-weights"),
    (["--random-weights", "--checkpoint", "sam.pth"], r"give --checkpoint PATH, or --random-weights"),
    (["--checkpoint", "{tmp}/missing.pth"], r"--checkpoint \S+missing.pth: no such file"),
    (["--checkpoint", "{tmp}/scene.png", "--model-type", "tiny"], r"--model-type tiny has no checkpoint format"),
    (["--random-weights", "--num-clusters", "99"], r"num_cluster=99 must be a square"),
    (["--random-weights", "--clustering-location", "40"],
     r"--clustering-location \(MODEL.EXPEDIT.CLUSTERING_LOCATION\)=40 is outside this ViT's blocks 0..3"),
    (["--random-weights", "--num-clusters", "225"],
     r"--num-clusters \(MODEL.EXPEDIT.NUM_CLUSTERS\)=\[15, 15\]: a windowed ViT clusters each 14x14"),
    (["--random-weights", "--cluster-window-size", "4"],
     r"--cluster-window-size \(MODEL.EXPEDIT.WINDOW\) must be an odd int >= 1, got 4"),
    (["--random-weights", "--points-per-side", "0"], r"--points-per-side 0: must be >= 1"),
])
def test_sam_amg_bad_input_names_the_value(tmp_path, capsys, extra, message):
    Image.fromarray(picture(32, 32)).save(tmp_path / "scene.png")
    argv = ["--input", str(tmp_path / "scene.png"), "--output", str(tmp_path / "out"), "--device", "cpu",
            *[a.format(tmp=tmp_path) for a in extra]]
    with pytest.raises(SystemExit):
        sam_amg.main(argv)
    assert re.search(message, capsys.readouterr().err)


def test_sam_amg_names_a_missing_or_unreadable_input(tmp_path, capsys):
    with pytest.raises(SystemExit):
        sam_amg.main(["--random-weights", "--input", str(tmp_path / "nope.jpg"), "--output", str(tmp_path)])
    assert "--input " + str(tmp_path / "nope.jpg") + ": no such file or folder" in capsys.readouterr().err
    (tmp_path / "notes.png").write_text("not a picture")
    with pytest.raises(SystemExit):
        sam_amg.main(["--random-weights", "--input", str(tmp_path), "--output", str(tmp_path / "out")])
    assert "--input " + str(tmp_path / "notes.png") + ": not an image PIL can read" in capsys.readouterr().err


def test_a_checkpoint_of_another_model_type_is_refused_naming_both(tmp_path, capsys):
    path = tmp_path / "tiny.pth"
    torch.save(build_tiny_sam().state_dict(), path)
    Image.fromarray(picture(32, 32)).save(tmp_path / "scene.png")
    with pytest.raises(SystemExit):
        sam_amg.main(["--checkpoint", str(path), "--model-type", "vit_b", "--input", str(tmp_path),
                      "--output", str(tmp_path / "out"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert f"--checkpoint {path} does not load into SAM vit_b (--model-type)" in err

