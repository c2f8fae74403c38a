"""Load-time key map of the official DPT files onto :class:`dpt.DPTDepth`.

    pretrained.model.*          -> backbone.*
    pretrained.act_postprocess* -> reassemble.act_postprocess*
    scratch.*                   -> scratch.*
"""
from __future__ import annotations

from expedit_d2.checkpoint import DPT_BACKBONE_PREFIX

__all__ = ["convert_dpt_state_dict"]

_MAP = ((DPT_BACKBONE_PREFIX, "backbone."), ("pretrained.act_postprocess", "reassemble.act_postprocess"),
        ("scratch.", "scratch."))


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
