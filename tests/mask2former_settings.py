"""The published Expedit-Mask2Former settings, and how the tests read them from a config and
from a built Swin backbone."""
from pathlib import Path

#: our Mask2Former configs
CONFIGS = Path(__file__).resolve().parents[1] / "projects/Mask2Former/configs"
#: the official key lists (tests/data/reference/mask2former_swinL_*) of each task's configs
REFERENCE = {"coco/panoptic": "coco_panoptic", "coco/instance": "coco_instance", "ade20k/panoptic": "ade20k_panoptic"}
# The official Expedit-Mask2Former configs (maskformer2_hourglass_swin_large_IN21k_384_bs16_
# {100ep,100ep,160k,160k_res640}.yaml; docs/fidelity.md): alpha = MODEL.SWIN.CLUSTERING_LOCATION, 8x8
# clusters per window = NUM_SPIXELS 64, lambda = TOKEN_CLUSTERING_BLOCK.WINDOW_SIZE.
PUBLISHED = {
    "coco/panoptic-segmentation": dict(alpha=10, clusters=(8, 8), iters=5, tau=0.05, lam=7, k=10, tau_r=0.05),
    "coco/instance-segmentation": dict(alpha=12, clusters=(8, 8), iters=5, tau=0.01, lam=11, k=60, tau_r=0.01),
    "ade20k/panoptic-segmentation": dict(alpha=14, clusters=(8, 8), iters=4, tau=0.01, lam=7, k=49, tau_r=0.01),
    "ade20k/semantic-segmentation": dict(alpha=7, clusters=(8, 8), iters=5, tau=0.01, lam=5, k=10, tau_r=0.01),
}


def installed_settings(backbone):
    """What the expedit hook installed in a Swin backbone actually uses (None: no hook)."""
    first = 0
    for stage, depth in zip(backbone.layers, backbone.depths):
        hook = getattr(stage, "token_reduction", None)
        if hook is not None:
            c, r = hook.clustering, hook.reconstruction
            return dict(alpha=first + hook.block_index, clusters=tuple(c.num_clusters), iters=c.iters,
                        tau=c.temperature, lam=c.window, k=r.k, tau_r=r.temperature)
        first += depth
    return None


def settings_in_config(cfg):
    s = cfg.MODEL.SWIN
    c, r = s.TOKEN_CLUSTERING_BLOCK, s.TOKEN_RECONSTRUCTION_BLOCK
    side = round(c.NUM_SPIXELS ** 0.5)
    return dict(alpha=s.CLUSTERING_LOCATION, clusters=(side, side) if side * side == c.NUM_SPIXELS else None,
                iters=c.N_ITERS, tau=c.TEMPERATURE, lam=c.WINDOW_SIZE, k=r.K, tau_r=r.TEMPERATURE)


def flat(node, prefix=""):
    """A config as {dotted key: value}."""
    out = {}
    for k, v in node.items():
        out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out
