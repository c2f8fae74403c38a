"""Loading the official DPT files: a load-time key map onto :class:`dpt.DPTDepth`.

    pretrained.model.*          -> backbone.*
    pretrained.act_postprocess* -> reassemble.act_postprocess*
    scratch.*                   -> scratch.*

``DPTCheckpointer`` is Detectron2's checkpointer with that map applied when a file holds
official names, so ``MODEL.WEIGHTS dpt_hybrid_nyu-2ce69ec7.pt`` just works; our own
checkpoints (names already ours) load unchanged.
"""
from __future__ import annotations

from detectron2.checkpoint import DetectionCheckpointer

__all__ = ["DPT_BACKBONE_PREFIX", "convert_dpt_state_dict", "official_dpt_state_dict", "is_official_dpt",
           "DPTCheckpointer"]

#: where the official DPT files keep the backbone (timm's ViT / ViT-Hybrid names, which our
#: D2ViT / D2ViTHybrid parameters equal)
DPT_BACKBONE_PREFIX = "pretrained.model."

_MAP = ((DPT_BACKBONE_PREFIX, "backbone."), ("pretrained.act_postprocess", "reassemble.act_postprocess"),
        ("scratch.", "scratch."))


def is_official_dpt(state_dict: dict) -> bool:
    return any(k.startswith(DPT_BACKBONE_PREFIX) for k in state_dict)


def convert_dpt_state_dict(state_dict: dict) -> dict:
    """Rename an official DPT state dict to DPTDepth's names; unknown keys raise, naming them."""
    out, unknown = {}, []
    for key, value in state_dict.items():
        for old, new in _MAP:
            if key.startswith(old):
                out[new + key[len(old):]] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise KeyError(f"keys that are not part of a DPT checkpoint: {unknown[:5]}"
                       f"{' ...' if len(unknown) > 5 else ''}")
    return out


def official_dpt_state_dict(state_dict: dict) -> dict:
    """DPTDepth's names -> the official file's (the inverse of :func:`convert_dpt_state_dict`,
    the same map read backwards), e.g. to write a checkpoint in the official format."""
    out = {}
    for key, value in state_dict.items():
        for old, new in _MAP:
            if key.startswith(new):
                out[old + key[len(new):]] = value
                break
        else:
            raise KeyError(f"{key!r} is not a DPTDepth parameter name")
    return out


class DPTCheckpointer(DetectionCheckpointer):
    def _load_file(self, filename):
        loaded = super()._load_file(filename)
        if is_official_dpt(loaded["model"]):
            self.logger.info(f"{filename}: official DPT names, mapping them onto DPTDepth")
            loaded["model"] = convert_dpt_state_dict(loaded["model"])
        return loaded
