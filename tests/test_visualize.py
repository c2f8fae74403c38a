"""Pictures of what a token-reduction setting does (tools/visualize.py) and the token groups
they draw (expedit_d2.reduction.record_token_groups), on tiny models with random weights."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from expedit_d2.ops import initial_cells, nearest_clusters, token_clustering
from expedit_d2.reduction import record_token_groups, token_groups
from expedit_d2.synthetic import draw_scene
from tests.project_opts import ROOT
from tools import visualize

#: the settings whose groups the tests below count
POOL_4x5 = {"MODEL.TOKEN_REDUCTION.POOL.LOCATION": 2, "MODEL.TOKEN_REDUCTION.POOL.SIZE": [4, 5]}
TOME_R6 = {"MODEL.TOKEN_REDUCTION.TOME.R": 6, "MODEL.TOKEN_REDUCTION.TOME.START_BLOCK": 1}
EVIT_06 = {"MODEL.TOKEN_REDUCTION.EVIT.LOCATIONS": [1, 3], "MODEL.TOKEN_REDUCTION.EVIT.KEEP_RATE": 0.6}
EXPEDIT_4x4 = {"MODEL.EXPEDIT.CLUSTERING_LOCATION": 2, "MODEL.EXPEDIT.NUM_CLUSTERS": [4, 4]}
SWIN_8x8 = {"MODEL.EXPEDIT.CLUSTERING_LOCATION": 5, "MODEL.EXPEDIT.NUM_CLUSTERS": [8, 8]}

DPT_TINY = str(ROOT / "projects/DPT/configs/demo/tiny_vit_nyuv2.yaml")
M2F_TINY = str(ROOT / "projects/Mask2Former/configs/demo/tiny_swin_coco_panoptic.yaml")
EXPEDIT = ["MODEL.EXPEDIT.CLUSTERING_LOCATION", "1", "MODEL.EXPEDIT.NUM_CLUSTERS"]
POOL = "MODEL.TOKEN_REDUCTION.METHOD=pool;MODEL.TOKEN_REDUCTION.POOL.LOCATION=1;MODEL.TOKEN_REDUCTION.POOL.SIZE=[3, 4]"


def same_partition(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two labellings of the same tokens group them alike (whatever the numbers)."""
    a, b = a.reshape(-1).tolist(), b.reshape(-1).tolist()
    return len(set(a)) == len(set(b)) == len(set(zip(a, b)))


# --------------------------------------------------------------------------------------
# token groups
# --------------------------------------------------------------------------------------
def test_expedit_groups_are_the_clusters_of_the_nearest_final_centres(tiny_reduction_cfg, seeded_backbone):
    """Against the operator called by hand on the tokens after block alpha: the groups are the
    clusters of :func:`nearest_clusters`, and each token's is a nearest final centre (brute
    force, float64, up to float32 rounding). Temperature 1 (the official DPT value): random
    weights then still give distinct centres."""
    values = {**EXPEDIT_4x4, "MODEL.EXPEDIT.TEMPERATURE": 1.0}  # alpha 2, 4x4 clusters
    cfg = tiny_reduction_cfg("D2ViT", "expedit", **values)
    bb = seeded_backbone(cfg)
    x = torch.randn(2, 3, 112, 128)
    groups = token_groups(bb, x)
    assert groups.labels.shape == (2, 7, 8) and groups.input_size == (112, 128) and groups.reducer == "ExpeditTokens"
    with torch.no_grad():
        tokens, grid, _ = bb.embed_tokens(x)
        for blk in bb.blocks[: values["MODEL.EXPEDIT.CLUSTERING_LOCATION"] + 1]:
            tokens = blk(tokens)
        e = cfg.MODEL.EXPEDIT
        _, state = token_clustering(tokens, grid, (4, 4), e.ITERS, e.TEMPERATURE, e.WINDOW, num_prefix_tokens=1)
        chosen = nearest_clusters(state)
        distances = torch.cdist(state.tokens.double(), state.centers.double()) ** 2
    gap = distances.gather(-1, chosen[..., None])[..., 0] - distances.amin(dim=-1)
    assert (gap <= 1e-5 * distances.amin(dim=-1)).all()
    for b in range(2):
        assert same_partition(groups.labels[b], chosen[b])
        assert 8 <= groups.num_groups()[b] == len(chosen[b].unique()) <= 16


def test_pool_groups_are_the_cells_of_the_pooled_grid(tiny_reduction_cfg, seeded_backbone):
    bb = seeded_backbone(tiny_reduction_cfg("D2ViT", "pool", **POOL_4x5))  # 7x8 tokens pooled to 4x5
    groups = token_groups(bb, torch.randn(1, 3, 112, 128))
    rows = torch.tensor([i * 4 // 7 for i in range(7)])
    cols = torch.tensor([j * 5 // 8 for j in range(8)])
    assert [i * 4 // 7 for i in range(7)] == initial_cells(7, 4)
    assert torch.equal(groups.labels[0], rows[:, None] * 5 + cols[None, :])  # numbered as first seen, row-major
    assert groups.num_groups() == [20]


def test_tome_and_evit_groups_count_what_the_methods_keep(tiny_reduction_cfg, seeded_backbone):
    x = torch.randn(2, 3, 112, 128)  # 56 grid tokens
    tome = token_groups(seeded_backbone(tiny_reduction_cfg("D2ViT", "tome", **TOME_R6)), x)
    assert tome.num_groups() == [56 - 5 * 6] * 2  # r = 6 merged away in each of blocks 1..5
    evit = token_groups(seeded_backbone(tiny_reduction_cfg("D2ViT", "evit", **EVIT_06)), x)
    for labels, n in zip(evit.labels, evit.num_groups()):
        sizes = torch.bincount(labels.reshape(-1))
        # keep 0.6 at blocks 1 and 3: 34 of 56 kept (+ the fused token), then 21 of those 35; the
        # dropped tokens of each step form one group, a kept grid token is a group of its own
        assert sizes.sum() == 56 and (sizes > 1).sum() == 2 and sizes.max() >= 56 - 34
        assert n - 2 in (20, 21)  # 21 kept at the end, one of them perhaps step 1's fused token


def test_swin_groups_stay_inside_their_window_and_the_observation_leaves_no_trace(tiny_reduction_cfg, seeded_backbone):
    # windows of 12, 8x8 clusters
    bb = seeded_backbone(tiny_reduction_cfg("ExpeditD2SwinTransformer", "expedit", **SWIN_8x8))
    x = torch.randn(1, 3, 224, 224)  # stage 3: 14x14 tokens, 2x2 windows after padding to 24x24
    with torch.no_grad():
        before = bb(x)
    stage = bb.layers[2]
    hooks = (len(stage.token_reduction._forward_pre_hooks), len(bb._forward_pre_hooks))
    with torch.no_grad(), record_token_groups(bb) as passes:
        during = bb(x)
        bb(x)
    assert len(passes) == 2 and passes[0].module == "layers.2" and passes[0].grid_size == (14, 14)
    assert all(torch.equal(before[k], during[k]) for k in before)
    assert "reduce" not in vars(stage.token_reduction)
    assert (len(stage.token_reduction._forward_pre_hooks), len(bb._forward_pre_hooks)) == hooks
    labels = passes[0].labels[0]
    window = (torch.arange(14)[:, None] // 12) * 2 + torch.arange(14)[None, :] // 12
    for g in labels.unique():
        assert len(window[labels == g].unique()) == 1  # a cluster never spans two windows
    for w in range(4):
        assert len(labels[window == w].unique()) <= 64


def test_an_unpatched_backbone_has_no_groups(tiny_reduction_cfg, seeded_backbone):
    with pytest.raises(ValueError, match="D2ViT has no token-reduction patch"):
        token_groups(seeded_backbone(tiny_reduction_cfg("D2ViT", "none")), torch.randn(1, 3, 64, 64))


# --------------------------------------------------------------------------------------
# the pictures
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    """A synthetic scene (sky, ground, objects) as a PNG, 96 x 128."""
    rgb, _, _ = draw_scene(np.random.default_rng(0), 96, 128)
    path = tmp_path_factory.mktemp("images") / "scene.png"
    Image.fromarray(rgb).save(path)
    return path


def pixels(path):
    with Image.open(path) as im:
        return im.size, np.asarray(im.convert("RGB"))


def panel(array, i, image_width, scale):
    w = round(image_width * scale)
    return array[visualize.TITLE_HEIGHT:, i * (w + visualize.GAP): i * (w + visualize.GAP) + w]


def test_dpt_pictures_differ_between_settings(scene, tmp_path):
    """Expedit at two cluster grids (given as overrides, then as a point) and pooling: one
    picture each, of the stated size; the token panels and the predictions differ between
    settings, the baseline's panel does not."""
    out = tmp_path / "pictures"
    visualize.main(["--config-file", DPT_TINY, "--input", str(scene), "--output", str(out), "--scale", "2",
                    "--point", "MODEL.EXPEDIT.CLUSTERING_LOCATION=1;MODEL.EXPEDIT.NUM_CLUSTERS=[2, 2]",
                    "--point", POOL, "MODEL.DEVICE", "cpu", *EXPEDIT, "[3, 4]"])
    names = ["scene_a1_3x4.png", "scene_a1_2x2.png", "scene_pool_a1_3x4.png"]
    assert sorted(p.name for p in out.iterdir()) == sorted(names)  # nothing else (no temporary files)
    size = visualize.picture_size((96, 128), scale=2)
    assert size == (4 * 256 + 3 * visualize.GAP, visualize.TITLE_HEIGHT + 192)
    pictures = {}
    for name in names:
        shape, array = pixels(out / name)
        assert shape == size
        pictures[name] = array
    a, b, pool = (pictures[n] for n in names)
    for i, what in enumerate(("groups", "baseline", "setting", "difference")):
        differs = [not np.array_equal(panel(x, i, 128, 2), panel(y, i, 128, 2)) for x, y in ((a, b), (a, pool))]
        assert differs == ([False, False] if what == "baseline" else [True, True]), what


def test_mask2former_panoptic_picture(scene, tmp_path):
    pictures = visualize.visualize(M2F_TINY, [scene], tmp_path, task="panoptic", opts=[
        "MODEL.DEVICE", "cpu", "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "128",
        "MODEL.MASK_FORMER.TEST.OBJECT_MASK_THRESHOLD", "0.0",
        "MODEL.EXPEDIT.CLUSTERING_LOCATION", "4", "MODEL.EXPEDIT.NUM_CLUSTERS", "[4, 4]"])
    (p,) = pictures
    assert (p.path.name, p.setting, p.task) == ("scene_a4_4x4.png", "a4_4x4", "panoptic")
    # 96 x 128 resized to 64 x 85, padded to 64 x 96: stage 3 holds 4 x 6 tokens in one 7 x 7 window
    assert p.tokens == 24 and 1 <= p.groups <= 16 and "% of pixels" in p.difference
    shape, array = pixels(p.path)
    assert shape == visualize.picture_size((96, 128))
    assert not np.array_equal(panel(array, 1, 128, 1), panel(array, 0, 128, 1))


def test_bad_input_is_named(scene, tmp_path):
    with pytest.raises(FileNotFoundError, match="input image not found: .*nope.png"):
        visualize.main(["--config-file", DPT_TINY, "--input", str(tmp_path / "nope.png"), "--output", str(tmp_path)])
    with pytest.raises(FileNotFoundError, match="config file not found: .*nope.yaml"):
        visualize.main(["--config-file", str(tmp_path / "nope.yaml"), "--input", str(scene), "--output", str(tmp_path)])
    with pytest.raises(ValueError, match="Non-existent key: MODEL.NOPE"):
        visualize.main(["--config-file", DPT_TINY, "--input", str(scene), "--output", str(tmp_path),
                        "MODEL.NOPE", "1"])
    with pytest.raises(ValueError, match="runs no token reduction; give a setting"):
        visualize.main(["--config-file", DPT_TINY, "--input", str(scene), "--output", str(tmp_path),
                        "MODEL.DEVICE", "cpu"])
    with pytest.raises(ValueError, match=r"NUM_CLUSTERS=\[12, 12\] makes more clusters \(144\) than this input's token grid \[6, 8\]"):
        visualize.main(["--config-file", DPT_TINY, "--input", str(scene), "--output", str(tmp_path),
                        "MODEL.DEVICE", "cpu", *EXPEDIT, "[12, 12]"])
    assert not list(tmp_path.glob("*.png"))
    # the command line says what was wrong, with exit status 2
    proc = subprocess.run([sys.executable, str(ROOT / "tools/visualize.py"), "--config-file", DPT_TINY, "--input",
                           str(tmp_path / "nope.png"), "--output", str(tmp_path)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})  # this checkout's expedit_d2
    assert proc.returncode == 2 and "visualize: error: input image not found:" in proc.stderr


def test_overrides_after_the_images_are_overrides():
    assert visualize._split_inputs(["a.png", "b.png", "MODEL.WEIGHTS", "w.pth"]) == (
        ["a.png", "b.png"], ["MODEL.WEIGHTS", "w.pth"])
    assert visualize.split_setting(["MODEL.WEIGHTS", "w.pth", "MODEL.EXPEDIT.NUM_CLUSTERS", "[3, 4]",
                                    "MODEL.SWIN.CLUSTERING_LOCATION", "4"]) == (
        ["MODEL.WEIGHTS", "w.pth"], {"MODEL.EXPEDIT.NUM_CLUSTERS": [3, 4], "MODEL.SWIN.CLUSTERING_LOCATION": 4})
