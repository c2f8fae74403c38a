"""DPT depth model: official names, checkpoint loading, depth output, expedit by config."""
import pytest
import torch

from detectron2.config import get_cfg

from dpt import DPTDepth, add_dpt_config, convert_dpt_state_dict, silog_loss
from dpt.head import DPTScratch, FusionBlock
from expedit_d2.blocked import cpu_inference
from tests.compile_check import compiled_in_inference
from tests.numerics import assert_close_f32
from tests.project_opts import DPT_BASE_YAML
from tests.reference_keys import official_dpt_names, read_keys


@pytest.mark.parametrize("hybrid, ref", [(True, "dpt_hybrid_vitb_rn50_384"), (False, "dpt_large_vitl16_384")])
def test_full_model_matches_official_keys(hybrid, ref, dpt_cfg):
    cfg = dpt_cfg(hybrid, tiny=False)
    with torch.device("meta"):
        model = DPTDepth(**DPTDepth.from_config(cfg))
    official = read_keys(ref)
    mapped = convert_dpt_state_dict({k: torch.empty(v, device="meta") for k, v in official.items()})
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in mapped.items()}


@pytest.mark.parametrize("hybrid", [True, False])
def test_official_checkpoint_loads_and_predicts_depth(tmp_path, hybrid, dpt_cfg, seeded_dpt):
    src = seeded_dpt(dpt_cfg(hybrid))
    path = tmp_path / "dpt_official_names.pt"
    torch.save(official_dpt_names(src), path)
    model = seeded_dpt(dpt_cfg(hybrid), seed=7)
    result = model.load_state_dict(convert_dpt_state_dict(torch.load(path)), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    image = torch.rand(3, 96, 128) * 255
    with torch.no_grad():
        (out,) = model([{"image": image, "height": 96, "width": 128}])
    depth = out["depth"]
    assert depth.shape == (96, 128)
    assert torch.isfinite(depth).all() and (depth > 0).all()
    # raw output r >= 0 (ReLU) -> depth = 1 / (0.000305 r + 0.1378) <= 1 / 0.1378
    assert depth.max() <= 1 / 0.1378 + 1e-4


def test_expedit_disabled_is_identical_and_enabled_differs(dpt_cfg, seeded_dpt):
    cfg = dpt_cfg()
    plain = seeded_dpt(cfg)
    cfg.MODEL.BACKBONE.NAME, cfg.MODEL.EXPEDIT.ENABLED = "ExpeditBackbone", False
    disabled = seeded_dpt(cfg)
    disabled.load_state_dict(plain.state_dict())
    cfg.MODEL.EXPEDIT.ENABLED = True
    enabled = seeded_dpt(cfg)
    enabled.load_state_dict(plain.state_dict())
    batch = [{"image": torch.rand(3, 96, 128) * 255}]
    with torch.no_grad():
        a, b, c = plain(batch)[0]["depth"], disabled(batch)[0]["depth"], enabled(batch)[0]["depth"]
    assert torch.equal(a, b)
    assert c.shape == a.shape and torch.isfinite(c).all() and not torch.equal(a, c)


@pytest.mark.parametrize("reconstruction", [None, "topk", "nearest"])
def test_depth_network_compiles_to_one_graph_in_inference(reconstruction, dpt_cfg, seeded_dpt):
    """Backbone (the hybrid's convs and stem pooling included), reassemble and fusion as one
    graph under inference mode (``tools/benchmark_model.py --compile model``), the eager
    outputs bitwise; expedited with either reconstruction (None: not expedited)."""
    cfg = dpt_cfg()
    if reconstruction:
        cfg.MODEL.BACKBONE.NAME = "ExpeditBackbone"
        cfg.MODEL.EXPEDIT.RECONSTRUCTION = reconstruction
    model = seeded_dpt(cfg)
    eager, ours, again, frames = compiled_in_inference(model.forward_raw, torch.randn(1, 3, 96, 128))
    assert frames == 1 and torch.equal(ours, eager) and torch.equal(again, eager)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input_is_rejected_naming_the_image(bad, dpt_cfg, seeded_dpt):
    model = seeded_dpt(dpt_cfg())
    image = torch.rand(3, 96, 128) * 255
    image[1, 5, 7] = bad
    ok = {"image": torch.rand(3, 96, 128) * 255, "file_name": "fine.png"}
    with pytest.raises(ValueError, match=r"input image '/data/nyu/rgb_00042.png' \(batch index 1\) has 1 non-finite"):
        model([ok, {"image": image, "file_name": "/data/nyu/rgb_00042.png"}])
    with pytest.raises(ValueError, match=r"input image batch index 0 has 1 non-finite"):
        model([{"image": image}])
    with torch.no_grad():  # integer images are never scanned, and finite ones pass
        assert torch.isfinite(model([{"image": (torch.rand(3, 96, 128) * 255).to(torch.uint8)}])[0]["depth"]).all()


def test_training_step_gives_finite_loss_and_gradients(dpt_cfg, seeded_dpt):
    model = seeded_dpt(dpt_cfg()).train()
    depth = torch.rand(96, 128) * 5 + 0.5
    depth[:10] = 0  # invalid pixels are ignored
    losses = model([{"image": torch.rand(3, 96, 128) * 255, "depth": depth}])
    loss = losses["loss_depth"]
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_silog_loss_is_scale_invariant_for_lambda_one():
    pred, target = torch.rand(50) + 0.5, torch.rand(50) + 0.5
    valid = torch.ones(50, dtype=torch.bool)
    a = silog_loss(pred, target, valid, variance_focus=1.0)
    b = silog_loss(pred * 3.0, target, valid, variance_focus=1.0)
    torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)
    assert silog_loss(target, target, valid) < 1e-3


def test_converter_rejects_foreign_keys():
    with pytest.raises(KeyError, match=r"not part of a DPT checkpoint: \['model.conv.weight'\]"):
        convert_dpt_state_dict({"model.conv.weight": torch.zeros(1)})


def test_non_vit_backbone_is_rejected(dpt_cfg, seeded_dpt):
    cfg = dpt_cfg()
    cfg.MODEL.BACKBONE.NAME = "ExpeditD2SwinTransformer"
    with pytest.raises(TypeError, match=r"DPTDepth needs a token-tap backbone .*ExpeditD2SwinTransformer has no method 'embed_tokens'"):
        seeded_dpt(cfg)


# ----------------------------------------------------------------------------------
# depth metrics (BTS convention) on hand-made fixtures
# ----------------------------------------------------------------------------------
def test_depth_metrics_by_hand():
    import numpy as np

    from dpt import depth_metrics

    gt = np.zeros((480, 640))
    pred = np.full((480, 640), 7.0)
    # four valid pixels inside the Eigen crop
    gt[100, 100], pred[100, 100] = 2.0, 2.0
    gt[100, 101], pred[100, 101] = 4.0, 2.0  # ratio 2
    gt[200, 300], pred[200, 300] = 1.0, 1.2  # ratio 1.2
    gt[300, 500], pred[300, 500] = 6.0, 100.0  # clipped to 10 -> ratio 1.67
    # excluded: outside the crop, outside the depth range, invalid
    gt[10, 10], pred[10, 10] = 3.0, 0.1  # row 10 < 45
    gt[100, 620], pred[100, 620] = 3.0, 0.1  # column 620 >= 601
    gt[150, 150], pred[150, 150] = 10.0, 0.1  # gt not < 10
    gt[151, 150], pred[151, 150] = 0.0005, 0.1  # gt not > 1e-3
    m = depth_metrics(pred, gt)
    g, p = np.array([2.0, 4.0, 1.0, 6.0]), np.array([2.0, 2.0, 1.2, 10.0])
    assert m["abs_rel"] == pytest.approx(np.mean(np.abs(g - p) / g))
    assert m["sq_rel"] == pytest.approx(np.mean((g - p) ** 2 / g))
    assert m["rmse"] == pytest.approx(np.sqrt((0 + 4 + 0.04 + 16) / 4))
    e = np.log(p) - np.log(g)
    assert m["rmse_log"] == pytest.approx(np.sqrt(np.mean(e**2)))
    assert m["silog"] == pytest.approx(100 * np.sqrt(np.mean(e**2) - np.mean(e) ** 2))
    assert m["log10"] == pytest.approx(np.mean(np.abs(np.log10(g) - np.log10(p))))
    assert (m["d1"], m["d2"], m["d3"]) == pytest.approx((0.5, 0.5, 0.75))


def test_depth_evaluator_averages_per_image(caplog):
    import numpy as np

    from dpt import DepthEvaluator

    gt = np.zeros((480, 640), dtype=np.float32)
    gt[100:110, 100:110] = 2.0
    ev = DepthEvaluator("fixture", distributed=False)
    ev.reset()
    ev.process([{"depth": torch.from_numpy(gt)}], [{"depth": torch.full((480, 640), 2.0)}])
    ev.process([{"depth": torch.from_numpy(gt)}], [{"depth": torch.full((480, 640), 4.0)}])
    ev.process([{"depth": torch.zeros(480, 640)}], [{"depth": torch.ones(480, 640)}])  # no valid pixel
    with caplog.at_level("INFO", logger="dpt"):
        res = ev.evaluate()["depth"]
    table = caplog.records[-1].getMessage()  # Detectron2's small table of every metric
    assert "Depth metrics on 2 images (1 without valid pixels)" in table
    header, _, values = table.splitlines()[1:4]
    assert [h.strip() for h in header.strip("|").split("|")][:3] == ["abs_rel", "sq_rel", "rmse"]
    assert values.strip("|").split("|")[0].strip() == "0.500"
    assert res["abs_rel"] == pytest.approx(0.5)  # (0 + 1) / 2 images
    assert res["d1"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match=r"Eigen crop is defined on 480x640 frames, got \(100, 100\)"):
        ev.process([{"depth": torch.ones(100, 100)}], [{"depth": torch.ones(100, 100)}])


@pytest.mark.parametrize("config", sorted(p.name for p in (
    __import__("pathlib").Path(__file__).resolve().parents[1] / "projects/DPT/configs").glob("dpt_*.yaml")))
def test_every_config_builds_the_official_model(config):
    from pathlib import Path

    cfg = get_cfg()
    add_dpt_config(cfg)
    cfg.merge_from_file(str(Path(__file__).resolve().parents[1] / "projects/DPT/configs" / config))
    with torch.device("meta"):
        model = DPTDepth(**DPTDepth.from_config(cfg))
    ref = "dpt_large_vitl16_384" if "large" in config else "dpt_hybrid_vitb_rn50_384"
    mapped = convert_dpt_state_dict({k: torch.empty(v, device="meta") for k, v in read_keys(ref).items()})
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in mapped.items()}
    assert (cfg.MODEL.BACKBONE.NAME == "TokenReductionBackbone") == ("expedit" in config)


def test_project_defaults_are_the_official_expedit_dpt_settings():
    cfg = get_cfg()
    add_dpt_config(cfg)
    assert cfg.MODEL.EXPEDIT.RECONSTRUCTION == "topk"  # the library's default, not overridden in Python
    cfg.merge_from_file(str(DPT_BASE_YAML))  # every DPT config inherits it
    e = cfg.MODEL.EXPEDIT
    assert (e.RECONSTRUCTION, e.ITERS, e.WINDOW, e.TEMPERATURE, e.RECON_K, e.RECON_TEMPERATURE) == \
        ("nearest", 5, 5, 1.0, 20, 1.0)
    assert e.CLUSTERING_LOCATION == -1 and list(e.NUM_CLUSTERS) == [16, 16]


def test_residual_units_sum_in_place_as_the_formula_bitwise():
    torch.manual_seed(0)
    block = FusionBlock(8).eval()
    x, skip = torch.randn(1, 8, 5, 7), torch.randn(1, 8, 5, 7)
    x0, skip0 = x.clone(), skip.clone()
    rcu1, rcu2 = block.resConfUnit1, block.resConfUnit2

    def unit(u, t):  # the official formula, out of place
        return t + u.conv2(torch.relu(u.conv1(torch.relu(t))))

    with torch.no_grad():
        assert torch.equal(rcu1(skip), unit(rcu1, skip))
        fused = unit(rcu2, x + unit(rcu1, skip))
        want = block.out_conv(torch.nn.functional.interpolate(fused, scale_factor=2, mode="bilinear",
                                                              align_corners=True))
        assert torch.equal(block(x, skip), want)
    assert torch.equal(x, x0) and torch.equal(skip, skip0)  # the inputs are not summed into


def test_fusion_head_runs_channels_last_in_cpu_inference_to_rounding():
    torch.manual_seed(0)
    scratch = DPTScratch([16, 24, 32, 32], 16).eval()
    maps = [torch.randn(1, c, 24 // s, 32 // s) for c, s in zip([16, 24, 32, 32], [1, 2, 4, 8])]
    kept = [m.clone() for m in maps]
    with torch.inference_mode():
        assert cpu_inference(maps[0], scratch)
        fast = scratch(maps)
    graded = [m.clone().requires_grad_() for m in maps]
    assert not cpu_inference(graded[0], scratch)  # training keeps the NCHW maps
    plain = scratch(graded)
    plain.sum().backward()
    assert all(g.grad is not None for g in graded)
    assert fast.shape == plain.shape == (1, 1, 96, 128)  # twice the stride-4 map, twice again
    assert_close_f32(fast, plain.detach())
    assert all(torch.equal(m, k) for m, k in zip(maps, kept))  # the caller's maps untouched
    with torch.inference_mode():
        assert not cpu_inference(maps[0].to("meta"), scratch)  # a CPU-only choice
