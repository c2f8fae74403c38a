"""Video Mask2Former (YouTube-VIS): the 3D position embedding, the video decoder and the
video inference against the official definitions written out here, the official video YAMLs
(merged unchanged, the model-zoo key list, the Expedit settings), strict loading of a
model-zoo ``.pkl``, and ``train_net_video.py --eval-only`` on a synthetic YouTube-VIS in the
real formats."""
import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import default_argument_parser
from expedit_d2.checkpoint import WeightsError, load_weights
from expedit_d2.engine import load_project
from expedit_d2.synthetic import write_ytvis
from tests.mask2former_settings import installed_settings, settings_in_config
from tests.numerics import assert_close_f32
from tests.reference_keys import read_keys

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "projects/Mask2Former/configs"
TINY = CONFIGS / "demo/tiny_swin_ytvis_2019.yaml"
CHAINS = sorted(str(p.relative_to(CONFIGS)) for p in CONFIGS.glob("youtubevis_20*/**/video_maskformer2_*.yaml"))
# the Expedit-Mask2Former video files (2019: 4 iterations, 2021: 5)
PUBLISHED = {"2019": dict(alpha=14, clusters=(8, 8), iters=4, tau=0.01, lam=7, k=49, tau_r=0.01),
             "2021": dict(alpha=14, clusters=(8, 8), iters=5, tau=0.01, lam=7, k=49, tau_r=0.01)}


@pytest.fixture(scope="module")
def video():
    return load_project(ROOT / "projects/Mask2Former/train_net_video.py")


def _cfg(video, path, *opts):
    return video.build_config(default_argument_parser().parse_args(["--config-file", str(path), *opts]))


def _tiny_model(video, *opts, seed=0):
    cfg = _cfg(video, TINY, "MODEL.DEVICE", "cpu", *opts)
    torch.manual_seed(seed)
    return cfg, video.Trainer.build_model(cfg).eval()


# --------------------------------------------------------------------------------------
# the official definitions, written out (the oracles)
# --------------------------------------------------------------------------------------
def official_pe3d(x, num_pos_feats, temperature=10000, scale=2 * math.pi):
    """The official PositionEmbeddingSine3D (normalize=True, no mask) on (B, T, C, H, W)."""
    not_mask = torch.ones(x.shape[0], x.shape[1], x.shape[3], x.shape[4], dtype=torch.bool)
    z, y, xx = (not_mask.cumsum(d, dtype=torch.float32) for d in (1, 2, 3))
    z = z / (z[:, -1:] + 1e-6) * scale
    y = y / (y[:, :, -1:] + 1e-6) * scale
    xx = xx / (xx[:, :, :, -1:] + 1e-6) * scale
    d = torch.arange(num_pos_feats, dtype=torch.float32)
    d = temperature ** (2 * (d // 2) / num_pos_feats)
    dz = torch.arange(2 * num_pos_feats, dtype=torch.float32)
    dz = temperature ** (2 * (dz // 2) / (2 * num_pos_feats))

    def sc(p):
        return torch.stack((p[..., 0::2].sin(), p[..., 1::2].cos()), dim=5).flatten(4)

    pos = torch.cat((sc(y[..., None] / d), sc(xx[..., None] / d)), dim=4) + sc(z[..., None] / dz)
    return pos.permute(0, 1, 4, 2, 3)


def official_decoder(dec, x, mask_features, T):
    """The official VideoMultiScaleMaskedTransformerDecoder forward (one video, eval), with
    nn.MultiheadAttention and the per-head attention masks, on ``dec``'s own parameters."""
    heads = dec.num_heads
    mf = mask_features.view(1, T, *mask_features.shape[1:])
    src, pos, sizes = [], [], []
    for i in range(3):
        h, w = x[i].shape[-2:]
        sizes.append((h, w))
        p = official_pe3d(x[i].view(1, T, -1, h, w), dec.pe_layer.num_pos_feats).flatten(3)
        s = dec.input_proj[i](x[i]).flatten(2) + dec.level_embed.weight[i][None, :, None]
        c = s.shape[1]
        pos.append(p.view(1, T, c, h * w).permute(1, 3, 0, 2).flatten(0, 1))
        src.append(s.view(1, T, c, h * w).permute(1, 3, 0, 2).flatten(0, 1))
    qpos = dec.query_embed.weight.unsqueeze(1)
    out = dec.query_feat.weight.unsqueeze(1)

    def predict(out, size):
        d = dec.decoder_norm(out).transpose(0, 1)
        masks = torch.einsum("bqc,btchw->bqthw", dec.mask_embed(d), mf)
        b, q, t = masks.shape[:3]
        attn = F.interpolate(masks.flatten(0, 1), size=size, mode="bilinear", align_corners=False).view(b, q, t, *size)
        attn = attn.sigmoid().flatten(2).unsqueeze(1).repeat(1, heads, 1, 1).flatten(0, 1) < 0.5
        return dec.class_embed(d), masks, attn

    cls, masks, attn = predict(out, sizes[0])
    for i in range(dec.num_layers):
        lvl = i % 3
        attn[torch.where(attn.sum(-1) == attn.shape[-1])] = False
        ca, sa, ff = (dec.transformer_cross_attention_layers[i], dec.transformer_self_attention_layers[i],
                      dec.transformer_ffn_layers[i])
        out = ca.norm(out + ca.multihead_attn(out + qpos, src[lvl] + pos[lvl], src[lvl], attn_mask=attn)[0])
        q = out + qpos
        out = sa.norm(out + sa.self_attn(q, q, out)[0])
        out = ff.norm(out + ff.linear2(F.relu(ff.linear1(out))))
        cls, masks, attn = predict(out, sizes[(i + 1) % 3])
    return cls, masks


def official_inference_video(model, pred_cls, pred_masks, padded, size, height, width):
    """The official inference_video order: every query's tube upsampled, then the top 10."""
    K = pred_cls.shape[-1] - 1
    scores = F.softmax(pred_cls, dim=-1)[:, :-1]
    labels = torch.arange(K).unsqueeze(0).repeat(model.num_queries, 1).flatten(0, 1)
    up = F.interpolate(pred_masks, size=padded, mode="bilinear", align_corners=False)
    top_scores, top = scores.flatten(0, 1).topk(10, sorted=False)
    masks = up[top // K][:, :, :size[0], :size[1]]
    masks = F.interpolate(masks, size=(height, width), mode="bilinear", align_corners=False) > 0.0
    return top_scores.tolist(), labels[top].tolist(), list(masks)


# --------------------------------------------------------------------------------------
# the parts against the official definitions
# --------------------------------------------------------------------------------------
def test_3d_position_embedding_is_the_official_one():
    from mask2former_video.modeling.position_encoding import PositionEmbeddingSine3D

    x = torch.zeros(2, 5, 3, 6, 9)
    ours = PositionEmbeddingSine3D(16, normalize=True)(x)
    assert ours.shape == (2, 5, 32, 6, 9)
    # the same elementwise sin/cos, but on differently shaped tensors (vectorised kernels may
    # round a last bit apart): to the scale of the values, which lie in [-2, 2]
    assert_close_f32(ours, official_pe3d(x, 16))
    with pytest.raises(ValueError, match=r"expects \(B, T, C, H, W\), got shape \(5, 3, 6, 9\)"):
        PositionEmbeddingSine3D(16, normalize=True)(x[0])


@pytest.mark.parametrize("frames", [1, 3])
def test_video_decoder_is_the_official_one(video, frames):
    """One video of ``frames`` frames through the tiny model's pixel decoder, then our
    decoder and the official forward on the same parameters: class logits and mask tubes."""
    _, model = _tiny_model(video)
    head = model.sem_seg_head
    images = torch.randn(frames, 3, 64, 96)
    with torch.no_grad():
        mask_features, _, multi_scale = head.pixel_decoder.forward_features(model.backbone(images))
        ours = head.predictor(multi_scale, mask_features)
        ref_cls, ref_masks = official_decoder(head.predictor, multi_scale, mask_features, frames)
    assert ours["pred_masks"].shape == (1, 16, frames, 16, 24) and ours["pred_logits"].shape == (1, 16, 41)
    assert_close_f32(ours["pred_logits"], ref_cls)
    assert_close_f32(ours["pred_masks"], ref_masks)


def test_video_inference_is_the_official_one(video):
    """Top 10 (query, class) pairs, tubes upsampled, cropped and resized: the official order
    (all tubes upsampled first) gives the same scores, labels and masks."""
    _, model = _tiny_model(video)
    g = torch.Generator().manual_seed(3)
    pred_cls, pred_masks = torch.randn(16, 41, generator=g), torch.randn(16, 4, 16, 24, generator=g) * 3
    ours = model.inference_video(pred_cls, pred_masks, (64, 96), (60, 90), 45, 67)
    scores, labels, masks = official_inference_video(model, pred_cls, pred_masks, (64, 96), (60, 90), 45, 67)
    assert ours["image_size"] == (45, 67)
    assert ours["pred_scores"] == scores and ours["pred_labels"] == labels
    assert all(torch.equal(a, b) for a, b in zip(ours["pred_masks"], masks))
    assert ours["pred_masks"][0].shape == (4, 45, 67) and ours["pred_masks"][0].dtype == torch.bool


def test_one_video_per_forward_and_no_training(video):
    _, model = _tiny_model(video)
    frame = [torch.rand(3, 64, 64) * 255]
    with pytest.raises(ValueError, match="VideoMaskFormer takes one video per forward .*got 2"):
        model([{"image": frame}, {"image": frame}])
    model.train()
    with pytest.raises(NotImplementedError, match="training VideoMaskFormer is not implemented"):
        model([{"image": frame}])


# --------------------------------------------------------------------------------------
# the official YAMLs and checkpoints
# --------------------------------------------------------------------------------------
def test_the_official_video_chains_are_shipped():
    assert CHAINS == [f"youtubevis_{y}/{f}" for y in (2019, 2021) for f in (
        "swin/video_maskformer2_hourglass_swin_large_IN21k_384_bs16_8ep.yaml",
        "swin/video_maskformer2_swin_large_IN21k_384_bs16_8ep.yaml", "video_maskformer2_R50_bs16_8ep.yaml")]


@pytest.mark.parametrize("rel", CHAINS)
def test_official_video_chain_merges_and_builds(video, rel):
    from mask2former_video import VideoMaskFormer

    cfg = _cfg(video, CONFIGS / rel)
    assert cfg.MODEL.META_ARCHITECTURE == "VideoMaskFormer" and cfg.DATASETS.TEST == (f"ytvis_{rel[11:15]}_val",)
    with torch.device("meta"):
        model = VideoMaskFormer(cfg)
    keys = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if "/swin/" not in rel:
        assert keys["sem_seg_head.predictor.class_embed.weight"] == (41, 256)
        return
    assert keys == read_keys("mask2former_swinL_ytvis_video")  # the model-zoo .pkl's names and shapes
    if "hourglass" in rel:
        assert settings_in_config(cfg) == PUBLISHED[rel[11:15]]
        assert installed_settings(model.backbone) == PUBLISHED[rel[11:15]]
    else:
        assert installed_settings(model.backbone) is None
    assert cfg.INPUT.MIN_SIZE_TEST == (480 if "2019" in rel else 360)


def test_a_model_zoo_pkl_loads_strictly(video, tmp_path):
    _, src = _tiny_model(video, seed=1)
    path = tmp_path / "model_final_video.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": {k: v.numpy() for k, v in src.state_dict().items()}, "__author__": "test"}, f)
    _, model = _tiny_model(video, seed=2)
    load_weights(DetectionCheckpointer(model), str(path))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), src.state_dict().values()))
    with open(path, "wb") as f:  # one parameter missing: named, nothing half-loaded
        state = {k: v.numpy() for k, v in src.state_dict().items() if "class_embed.bias" not in k}
        pickle.dump({"model": state, "__author__": "test"}, f)
    with pytest.raises(WeightsError, match="sem_seg_head.predictor.class_embed.bias"):
        load_weights(DetectionCheckpointer(_tiny_model(video, seed=2)[1]), str(path))


# --------------------------------------------------------------------------------------
# train_net_video.py --eval-only
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ytvis(tmp_path_factory, video):
    from mask2former_video.data.ytvis import YTVIS_CATEGORIES_2019

    root = tmp_path_factory.mktemp("ytvis_datasets")
    json_path, truth = write_ytvis(root, YTVIS_CATEGORIES_2019, 2019, "valid", n_videos=2, n_frames=4)
    _, model = _tiny_model(video, seed=0)
    weights = root / "tiny_video.pth"
    torch.save({"model": model.state_dict()}, weights)
    return root, json_path, weights


def test_eval_only_writes_the_submission_and_video_ap(video, ytvis, tmp_path, monkeypatch):
    """Baseline and expedited (the official hourglass keys on the tiny Swin: 4x4 clusters per
    7x7 window after block 3): results.json in the submission format, 10 predictions per
    video with a mask per frame, and video AP from our YouTube-VIS evaluator."""
    import pycocotools.mask as mask_util

    root, json_path, weights = ytvis
    monkeypatch.setenv("DETECTRON2_DATASETS", str(root))
    common = ["--config-file", str(TINY), "--eval-only", "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", str(weights)]
    expedit = ["MODEL.BACKBONE.NAME", "D2HourglassSwinTransformer", "MODEL.SWIN.CLUSTERING_LOCATION", "3",
               "MODEL.SWIN.TOKEN_CLUSTERING_BLOCK.NUM_SPIXELS", "16"]
    runs = {}
    for name, opts in (("base", []), ("expedit", expedit)):
        args = default_argument_parser().parse_args([*common, "OUTPUT_DIR", str(tmp_path / name), *opts])
        runs[name] = video.main(args)
        assert set(runs[name]["segm"]) >= {"AP", "AP50", "AP75", "AR1", "AR10"}
    gt = json.loads(json_path.read_text())
    submissions = {}
    for name in runs:
        results = json.loads((tmp_path / name / "inference" / "results.json").read_text())
        assert len(results) == 10 * len(gt["videos"])
        lengths = {v["id"]: v["length"] for v in gt["videos"]}
        for r in results:
            assert len(r["segmentations"]) == lengths[r["video_id"]] and 0 <= r["score"] <= 1
            assert 1 <= r["category_id"] <= 40
            frame = r["segmentations"][0]
            assert isinstance(frame["counts"], str) and mask_util.decode(frame).shape == (48, 64)
        submissions[name] = results
    assert submissions["base"] != submissions["expedit"]  # the backbone was expedited
    with pytest.raises(SystemExit, match="add --eval-only"):
        video.main(default_argument_parser().parse_args(["--config-file", str(TINY), "OUTPUT_DIR", str(tmp_path)]))


def test_analyze_model_counts_a_clip_per_clip_and_per_frame(capsys):
    """tools/analyze_model.py --frames T on the video model: the backbone's count per clip is T
    times its count per frame (each frame runs on its own); the decoder's is not."""
    from expedit_d2.flops import gmacs
    from tools import analyze_model

    def run(frames):
        analyze_model.main(["--project", str(ROOT / "projects/Mask2Former/train_net_video.py"), "--config-file",
                            str(TINY), "--input-size", "64", "96", "--frames", str(frames)])
        return dict(line.split("\t") for line in capsys.readouterr().out.splitlines() if "\t" in line)

    one, three = run(1), run(3)
    assert float(three["backbone_gmacs"]) == pytest.approx(3 * float(one["backbone_gmacs"]), rel=1e-2)
    assert float(three["backbone_gmacs_per_frame"]) == pytest.approx(float(one["backbone_gmacs"]), rel=1e-2)
    assert float(one["backbone_gmacs"]) < float(one["model_gmacs"]) and float(three["model_gmacs"]) > float(one["model_gmacs"])
    with pytest.raises(ValueError, match="frames must be an int >= 1 .*got 0"):
        gmacs(torch.nn.Identity(), torch.zeros(3, 8, 8), frames=0)


def test_a_video_sweep_counts_and_times_clips(video, ytvis, tmp_path, monkeypatch):
    """The sweep on the video project (its script named as the project): every point
    evaluated by train_net_video.py (video AP), GMACs per clip of ``frames`` frames (the
    backbone's: frames x one frame's), timing and memory on that clip; the report says so."""
    from expedit_d2.sweep import SweepSpec, run_sweep
    from expedit_d2.sweep.spec import SweepError

    root, _, weights = ytvis
    monkeypatch.setenv("DETECTRON2_DATASETS", str(root))
    # 128 x 192: stage 3's 8 x 12 map fills 7 x 7 windows (a map smaller than a window shrinks
    # the window to it, and 4 x 4 clusters of a 4 x 4 window would reduce nothing)
    spec = SweepSpec(config_file=str(TINY), input_size=(128, 192), frames=3,
                     project=str(ROOT / "projects/Mask2Former/train_net_video.py"),
                     points=[{"MODEL.SWIN.CLUSTERING_LOCATION": 3, "MODEL.SWIN.TOKEN_CLUSTERING_BLOCK.NUM_SPIXELS": 16}],
                     opts=["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", str(weights)], repeats=1, warmup=0, memory=False)
    rows = run_sweep(spec, tmp_path / "sweep", show_progress=False)
    assert [r.baseline for r in rows] == [True, False] and all(r.frames == 3 for r in rows)
    assert all(r.metric == "segm/AP" and r.latency_ms > 0 for r in rows)
    with torch.inference_mode():
        _, model = _tiny_model(video)
        from expedit_d2.flops import backbone_flops

        one_frame = backbone_flops(model.backbone, torch.zeros(1, 3, 128, 192)).total() / 1e9
    assert rows[0].backbone_gmacs == pytest.approx(3 * one_frame, rel=1e-6)
    assert rows[1].backbone_gmacs < rows[0].backbone_gmacs
    report = (tmp_path / "sweep" / "table.md").read_text()
    assert "clips of 3 frames" in report and "one clip of 3 frames (per clip)" in report
    # a point that names another backbone beside the method keys would drop them: refused
    bad = SweepSpec(**{**spec.__dict__, "points": [{"MODEL.BACKBONE.NAME": "D2HourglassSwinTransformer",
                                                    "MODEL.SWIN.CLUSTERING_LOCATION": 3}]})
    with pytest.raises(SweepError, match="MODEL.BACKBONE.NAME='D2HourglassSwinTransformer' beside token-reduction keys"):
        run_sweep(bad, tmp_path / "bad", show_progress=False)
    with pytest.raises(SweepError, match="frames must be an int >= 1 .*got 0"):
        SweepSpec(config_file=str(TINY), input_size=(64, 96), frames=0)


def test_benchmark_model_times_a_clip(tmp_path, capsys):
    """tools/benchmark_model.py --frames T on the video project: whole model and its parts on a
    clip, GMACs per clip; --batch (several videos per forward) is refused with --frames."""
    from tools import benchmark_model

    out = tmp_path / "video_bench"
    common = ["--project", str(ROOT / "projects/Mask2Former/train_net_video.py"), "--config-file", str(TINY),
              "--input-size", "128", "192", "--frames", "2", "--repeats", "1", "--warmup", "0", "--threads", "1"]
    assert benchmark_model.main([*common, "--output", str(out),
                                 "--point", "MODEL.EXPEDIT.CLUSTERING_LOCATION=3;MODEL.EXPEDIT.NUM_CLUSTERS=[4, 4]"]) == 0
    rows = json.loads(out.with_suffix(".json").read_text())
    rows = rows["rows"] if isinstance(rows, dict) else rows
    assert [r["frames"] for r in rows] == [2, 2] and rows[1]["backbone_gmacs_ratio"] < 1
    assert set(rows[0]["parts_ms"]) >= {"backbone", "pixel_decoder", "transformer_decoder"}
    assert rows[0]["outputs"] == {"predictions": 10}
    assert "clips of 2 frames (GMACs per clip)" in out.with_suffix(".md").read_text()
    from expedit_d2.sweep import SweepError

    with pytest.raises(SweepError, match="--batch and --frames: a video model takes one video"):
        benchmark_model.main([*common, "--batch", "2"])
