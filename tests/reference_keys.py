"""Parameter names and shapes of the official checkpoints (from the official releases' files)."""
from pathlib import Path

REFERENCE_DIR = Path(__file__).parent / "data" / "reference"
#: checkpoints whose model is another's class with the same names and shapes: DPT's KITTI
#: fine-tune (dpt_hybrid_kitti-cb926ef4.pt) is DPTDepthModel on vitb_rn50_384, as the NYUv2 one
SAME_KEYS = {"dpt_hybrid_kitti": "dpt_hybrid_vitb_rn50_384"}
#: checkpoints whose names are another's, with some shapes changed: the video Mask2Former Swin-L
#: (YouTube-VIS 2019 / 2021 model zoo) is the image model's module tree (the video decoder has the
#: image decoder's submodules; its 3D position embedding has no parameters) with 200 queries, as
#: COCO instance, and 40 classes + no-object (the criterion's class weights too)
DERIVED_KEYS = {"mask2former_swinL_ytvis_video": ("mask2former_swinL_coco_instance", {
    "sem_seg_head.predictor.class_embed.weight": (41, 256), "sem_seg_head.predictor.class_embed.bias": (41,),
    "criterion.empty_weight": (41,)})}


def read_keys(name: str) -> dict:
    """``name`` (file stem without .keys.tsv) -> {parameter name: shape tuple}."""
    if name in DERIVED_KEYS:
        source, shapes = DERIVED_KEYS[name]
        keys = read_keys(source)
        assert set(shapes) <= set(keys), sorted(set(shapes) - set(keys))
        return {**keys, **shapes}
    path = REFERENCE_DIR / f"{SAME_KEYS.get(name, name)}.keys.tsv"
    out = {}
    for line in path.read_text().splitlines():
        if line.strip():
            key, shape = line.split("\t")
            out[key] = tuple(int(d) for d in shape.strip("()").split(",") if d.strip())
    return out


def official_dpt_names(model) -> dict:
    """Our DPT model's state dict under the official DPT names (the DPT project's key map,
    read backwards)."""
    from dpt.checkpoint import official_dpt_state_dict

    return official_dpt_state_dict(model.state_dict())
