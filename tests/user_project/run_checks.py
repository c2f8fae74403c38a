"""Import a user's project next to expedit_d2 in one order, expedite its own Swin by config
and by ``apply_patch``, and print (as JSON) what tests/test_drop_in.py asserts on.

    python tests/user_project/run_checks.py --order expedit-first|project-first [--snippet DOC.md]
"""
import argparse
import json
import re
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1]))  # the repository: expedit_d2 from this checkout


def parse_args():
    p = argparse.ArgumentParser()
    p.add_argument("--order", choices=["expedit-first", "project-first"], required=True)
    p.add_argument("--snippet", help="a doc whose ```python and ```yaml blocks are the user's additions")
    return p.parse_args()


ARGS = parse_args()
if ARGS.order == "expedit-first":
    import expedit_d2
    import user_mask2former
else:
    import user_mask2former
    import expedit_d2

import torch  # noqa: E402
from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.config import get_cfg  # noqa: E402
from detectron2.modeling import BACKBONE_REGISTRY, build_backbone, build_model  # noqa: E402

from expedit_d2.expedit_backbone import register_official_backbone_names  # noqa: E402
from expedit_d2.methods.pool import PoolSettings  # noqa: E402

SETTINGS = dict(clustering_location=6, num_clusters=(8, 8), iters=5, temperature=0.05, window=7, recon_k=10,
                recon_temperature=0.05)
EXPEDIT_KEYS = ["MODEL.EXPEDIT.CLUSTERING_LOCATION", 6, "MODEL.EXPEDIT.NUM_CLUSTERS", [8, 8],
                "MODEL.EXPEDIT.ITERS", 5, "MODEL.EXPEDIT.TEMPERATURE", 0.05, "MODEL.EXPEDIT.WINDOW", 7,
                "MODEL.EXPEDIT.RECON_K", 10, "MODEL.EXPEDIT.RECON_TEMPERATURE", 0.05]


def tiny_cfg(*opts):
    cfg = get_cfg()
    user_mask2former.add_maskformer2_config(cfg)
    expedit_d2.add_expedit_config(cfg)  # after the project's keys
    s = cfg.MODEL.SWIN
    s.EMBED_DIM, s.DEPTHS, s.NUM_HEADS, s.WINDOW_SIZE = 16, [2, 2, 4, 2], [1, 2, 2, 4], 12
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.BACKBONE.NAME = "D2SwinTransformer"
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 5
    cfg.merge_from_list([str(o) if not isinstance(o, str) else o for o in opts])
    return cfg


def rel(a: dict, b: dict) -> float:
    """Largest difference over the outputs, relative to each output's largest value."""
    return max(((a[k] - b[k]).abs().max() / b[k].abs().max()).item() for k in b)


def run(backbone, x):
    with torch.no_grad():
        return backbone(x)


def main():
    out = {"order": ARGS.order}
    user_cls = user_mask2former.D2SwinTransformer
    out["registered_is_users"] = BACKBONE_REGISTRY.get("D2SwinTransformer") is user_cls
    out["official_names_registered"] = register_official_backbone_names()  # the free one only

    torch.manual_seed(0)
    plain = build_backbone(tiny_cfg()).eval()
    state = plain.state_dict()
    ours_cfg = tiny_cfg("MODEL.BACKBONE.NAME", "ExpeditBackbone", "MODEL.EXPEDIT.BASE", "ExpeditD2SwinTransformer",
                        *EXPEDIT_KEYS)
    ours = build_backbone(ours_cfg).eval()
    ours.load_state_dict(state)

    results = {}
    for size in [(200, 296), (192, 384)]:  # padded and unpadded windows where clustering happens
        x = torch.randn(2, 3, *size)
        base_out = run(plain, x)
        want = run(ours, x)

        by_config = build_backbone(tiny_cfg("MODEL.BACKBONE.NAME", "ExpeditBackbone",
                                            "MODEL.EXPEDIT.BASE", "D2SwinTransformer", *EXPEDIT_KEYS)).eval()
        missing = by_config.load_state_dict(state, strict=True)
        got_config = run(by_config, x)

        patched = build_backbone(tiny_cfg()).eval()
        patched.load_state_dict(state)
        expedit_d2.apply_patch(patched, expedit_d2.ExpeditSettings(**SETTINGS))
        got_patch = run(patched, x)
        stage_types = [type(s).__name__ for s in patched.layers]
        subclass = all(isinstance(s, user_mask2former.swin.BasicLayer) for s in patched.layers)
        keys_same = list(patched.state_dict()) == list(state)
        expedit_d2.remove_patch(patched)
        restored = run(patched, x)

        pool_theirs = build_backbone(tiny_cfg()).eval()
        pool_theirs.load_state_dict(state)
        pool_ours = build_backbone(tiny_cfg("MODEL.BACKBONE.NAME", "ExpeditD2SwinTransformer")).eval()
        pool_ours.load_state_dict(state)
        for m in (pool_theirs, pool_ours):
            expedit_d2.apply_patch(m, PoolSettings(location=4, size=(6, 6)))

        consistent = dict(SETTINGS, swin_shift_mask="consistent")
        cons_theirs = expedit_d2.apply_patch(build_backbone(tiny_cfg()).eval(), expedit_d2.ExpeditSettings(**consistent))
        cons_theirs.load_state_dict(state)
        cons_ours = build_backbone(tiny_cfg("MODEL.BACKBONE.NAME", "ExpeditD2SwinTransformer")).eval()
        cons_ours.load_state_dict(state)
        expedit_d2.apply_patch(cons_ours, expedit_d2.ExpeditSettings(**consistent))

        results["x".join(map(str, size))] = {
            "config_is_users_class": isinstance(by_config, user_cls),
            "config_load_missing": list(missing.missing_keys), "config_load_unexpected": list(missing.unexpected_keys),
            "config_vs_ours": rel(got_config, want),
            "patch_vs_ours": rel(got_patch, want),
            "expedited_vs_plain": rel(want, base_out),
            "res2_res3_equal_plain": all(torch.equal(got_patch[k], base_out[k]) for k in ("res2", "res3")),
            "patched_stage_types": stage_types, "patched_stages_are_users_subclasses": subclass,
            "patched_state_dict_keys_unchanged": keys_same,
            "removed_bitwise_plain": all(torch.equal(restored[k], base_out[k]) for k in base_out),
            "pool_vs_ours": rel(run(pool_theirs, x), run(pool_ours, x)),
            "consistent_mask_vs_ours": rel(run(cons_theirs, x), run(cons_ours, x)),
        }
    out["backbone"] = results

    # our run of a user's block with windows of any size, at its own size, against its forward
    from expedit_d2.backbones.swin import shifted_window_mask
    from expedit_d2.reduction.upstream_swin import block_at_window

    diffs = []
    for shift in (0, 3):
        blk = user_mask2former.swin.SwinTransformerBlock(16, 2, window_size=6, shift_size=shift).eval()
        H, W = 9, 14  # padded to 12 x 18
        x = torch.randn(2, H * W, 16)
        mask = shifted_window_mask(12, 18, 6, 3, "cpu")
        blk.H, blk.W = H, W
        with torch.no_grad():
            diffs.append(rel({"x": block_at_window(blk, x, H, W, 6, mask)}, {"x": blk(x, mask)}))
    out["block_at_own_window_vs_forward"] = max(diffs)

    # the official Expedit config keys (D2HourglassSwinTransformer) on the user's Swin
    hourglass = tiny_cfg("MODEL.BACKBONE.NAME", "D2HourglassSwinTransformer", "MODEL.SWIN.CLUSTERING_LOCATION", 6,
                         "MODEL.SWIN.TOKEN_CLUSTERING_BLOCK.NUM_SPIXELS", 64)
    hg = build_backbone(hourglass).eval()
    hg.load_state_dict(state)
    x = torch.randn(1, 3, 200, 296)
    out["hourglass_is_users_class"] = isinstance(hg, user_cls)
    out["hourglass_vs_ours"] = rel(run(hg, x), run(ours, x))

    # the user's meta-architecture, end to end, from a whole-model checkpoint of the plain model
    torch.manual_seed(0)
    base_model = build_model(tiny_cfg("MODEL.META_ARCHITECTURE", "MaskFormer")).eval()
    with tempfile.TemporaryDirectory() as tmp:
        DetectionCheckpointer(base_model, tmp).save("model_final")
        weights = str(Path(tmp) / "model_final.pth")
        cfg = tiny_cfg("MODEL.META_ARCHITECTURE", "MaskFormer", "MODEL.BACKBONE.NAME", "ExpeditBackbone",
                       "MODEL.EXPEDIT.BASE", "D2SwinTransformer", *EXPEDIT_KEYS)
        model = build_model(cfg).eval()
        loaded = DetectionCheckpointer(model).resume_or_load(weights, resume=False)
        incompatible = DetectionCheckpointer(model)._load_model(
            DetectionCheckpointer(model)._load_file(weights))
    image = torch.randint(0, 256, (3, 200, 296), dtype=torch.uint8)
    with torch.no_grad():
        got = model([{"image": image, "height": 100, "width": 148}])[0]["sem_seg"]
        base = base_model([{"image": image, "height": 100, "width": 148}])[0]["sem_seg"]
    out["model"] = {
        "loaded": loaded is not None,
        "missing": list(incompatible.missing_keys), "unexpected": list(incompatible.unexpected_keys),
        "backbone_is_users_class": isinstance(model.backbone, user_cls),
        "sem_seg_shape": list(got.shape), "finite": bool(torch.isfinite(got).all()),
        "vs_base": ((got - base).abs().max() / base.abs().max()).item(),
    }

    if ARGS.snippet:
        out["snippet"] = run_snippet(Path(ARGS.snippet), weights=None)
    print("RESULT " + json.dumps(out))


def run_snippet(doc: Path, weights):
    """The doc's ```python block (the lines a user adds to train_net.py's setup) and ```yaml
    block (the config keys) applied to the user's project: the model must build expedited."""
    text = doc.read_text()
    python = re.findall(r"```python\n(.*?)```", text, re.S)
    yaml = re.findall(r"```yaml\n(.*?)```", text, re.S)
    setup = [b for b in python if "def setup(" in b]
    call = [b for b in python if "apply_patch(model.backbone" in b]
    if not setup or not call or not yaml:
        raise SystemExit(f"{doc}: needs a ```python block with setup(args), one with apply_patch(model.backbone, "
                         "...) and a ```yaml block")
    from detectron2.projects.deeplab import add_deeplab_config

    namespace = {"get_cfg": get_cfg, "add_deeplab_config": add_deeplab_config,
                 "add_maskformer2_config": user_mask2former.add_maskformer2_config}
    exec(compile(setup[0], str(doc), "exec"), namespace)  # the user's setup(args), with the added lines
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "expedited.yaml"
        path.write_text(yaml[0])
        cfg = namespace["setup"](argparse.Namespace(config_file=str(path), opts=[]))
    cfg.defrost()
    s = cfg.MODEL.SWIN  # a small Swin-L: the same stages and windows, 10 blocks before stage 4
    s.EMBED_DIM, s.DEPTHS, s.NUM_HEADS, s.WINDOW_SIZE = 16, [2, 2, 8, 2], [1, 2, 2, 4], 12
    cfg.MODEL.DEVICE = "cpu"
    backbone = build_backbone(cfg).eval()
    reducers = [type(getattr(st, "token_reduction", None)).__name__ for st in backbone.layers]
    with torch.no_grad():
        y = backbone(torch.randn(1, 3, 200, 296))
    # the one-call block, on a model built the user's way (plain backbone)
    cfg.MODEL.BACKBONE.NAME = "D2SwinTransformer"
    cfg.MODEL.META_ARCHITECTURE = "MaskFormer"
    model = build_model(cfg).eval()
    plain = model.backbone(torch.zeros(1, 3, 64, 64))
    namespace = {"model": model}
    exec(compile(call[0], str(doc), "exec"), namespace)
    again = model.backbone(torch.zeros(1, 3, 64, 64))
    return {"backbone_is_users_class": isinstance(backbone, user_mask2former.D2SwinTransformer),
            "reducers": reducers, "outputs": sorted(y),
            "one_call_removed_bitwise": all(torch.equal(plain[k], again[k]) for k in plain)}


if __name__ == "__main__":
    main()
