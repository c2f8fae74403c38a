"""The one home of token-reduction config: keys, translation of the official names, checks.

Keys::

    MODEL.TOKEN_REDUCTION.METHOD   "expedit" (default) | "tome" | "evit" | "pool" | "none"
    MODEL.TOKEN_REDUCTION.BASE     the backbone TokenReductionBackbone builds and patches
    MODEL.EXPEDIT.*                expedit's settings (and ENABLED; BASE: alias of TOKEN_REDUCTION.BASE);
                                   the official MODEL.SWIN.* Expedit keys map onto them
    MODEL.TOKEN_REDUCTION.TOME.*   MODEL.TOKEN_REDUCTION.EVIT.*   MODEL.TOKEN_REDUCTION.POOL.*

``METHOD: expedit`` keeps the meaning of ``MODEL.EXPEDIT`` unchanged (``ENABLED: False`` or
``CLUSTERING_LOCATION: -1``: not expedited), so every config written before methods existed
runs as it did. :func:`settings_from_config` turns a config into the settings of its method
(validated: errors name the key) or None; :func:`point_overrides` turns a few overrides
(a sweep point, a benchmark setting) into the full set of keys that realises them on a
base config, whatever backbone entry the base config names.
"""
from __future__ import annotations

import math

from detectron2.config import CfgNode as CN
from detectron2.modeling import BACKBONE_REGISTRY

from ..checks import (  # noqa: F401  (the config's checks, from their one home)
    check_bool, check_choice, check_int_at_least, check_odd, check_pair, check_positive_float, check_positive_int,
    check_rate)
from .core import METHOD_KEY, get_method, registered_methods

__all__ = [
    "add_token_reduction_config", "settings_from_config", "point_overrides", "canonical_key",
    "OFFICIAL_SWIN_ALIASES", "plain_backbones", "WRAPPER_BACKBONES", "BASE_KEYS", "base_backbone_name", "NOT_EXPEDITED",
    "check_pair", "check_positive_int", "check_int_at_least", "check_positive_float",
    "check_odd", "check_choice", "check_rate", "check_bool", "as_opts", "config_value",
]

#: CLUSTERING_LOCATION that means "not expedited" (the official default and meaning).
NOT_EXPEDITED = -1
#: official Expedit Swin keys -> ours (NUM_SPIXELS is clusters per window, a square)
OFFICIAL_SWIN_ALIASES = {
    "MODEL.SWIN.CLUSTERING_LOCATION": "MODEL.EXPEDIT.CLUSTERING_LOCATION",
    "MODEL.SWIN.TOKEN_CLUSTERING_BLOCK.NUM_SPIXELS": "MODEL.EXPEDIT.NUM_CLUSTERS",
    "MODEL.SWIN.TOKEN_CLUSTERING_BLOCK.N_ITERS": "MODEL.EXPEDIT.ITERS",
    "MODEL.SWIN.TOKEN_CLUSTERING_BLOCK.TEMPERATURE": "MODEL.EXPEDIT.TEMPERATURE",
    "MODEL.SWIN.TOKEN_CLUSTERING_BLOCK.WINDOW_SIZE": "MODEL.EXPEDIT.WINDOW",
    "MODEL.SWIN.TOKEN_RECONSTRUCTION_BLOCK.K": "MODEL.EXPEDIT.RECON_K",
    "MODEL.SWIN.TOKEN_RECONSTRUCTION_BLOCK.TEMPERATURE": "MODEL.EXPEDIT.RECON_TEMPERATURE",
}
#: the wrapper entries: build MODEL.TOKEN_REDUCTION.BASE, then patch it (the first is the
#: lead name; "ExpeditBackbone", the earlier name, stays an alias)
WRAPPER_BACKBONES = ("TokenReductionBackbone", "ExpeditBackbone")
#: where the wrapper's base backbone is named: the lead key, then its alias (the earlier
#: name, which configs written for it keep using)
BASE_KEYS = ("MODEL.TOKEN_REDUCTION.BASE", "MODEL.EXPEDIT.BASE")
#: MODEL.EXPEDIT.BASE's default (MODEL.TOKEN_REDUCTION.BASE's is "": take the alias)
DEFAULT_BASE = "ExpeditD2SwinTransformer"


def plain_backbones() -> tuple[str, ...]:
    """Our backbone entries a method can be put on by config, read from Detectron2's
    ``BACKBONE_REGISTRY`` (those registered by :mod:`expedit_d2.backbones`, bottom-up FPN
    entries aside); any other registered backbone of a family can be too, the user's
    ``D2SwinTransformer`` included."""
    return tuple(name for name, obj in BACKBONE_REGISTRY
                 if getattr(obj, "__module__", "").startswith("expedit_d2.backbones") and name not in BOTTOM_UP_FPNS)


def base_backbone_name(cfg) -> str:
    """The backbone the wrapper builds: ``MODEL.TOKEN_REDUCTION.BASE`` where set, else its
    alias ``MODEL.EXPEDIT.BASE``. Both set to different names is an error naming both."""
    lead = config_value(cfg, BASE_KEYS[0], "")
    alias = config_value(cfg, BASE_KEYS[1], DEFAULT_BASE)
    if not lead:
        return alias
    if alias not in (DEFAULT_BASE, lead):
        raise ValueError(f"{BASE_KEYS[0]}={lead!r} and its alias {BASE_KEYS[1]}={alias!r} name different "
                         "backbones: set one of them")
    return lead


# --------------------------------------------------------------------------------------
# keys and settings
# --------------------------------------------------------------------------------------
def add_token_reduction_config(cfg) -> None:
    """``MODEL.TOKEN_REDUCTION`` with every registered method's node (idempotent)."""
    if "TOKEN_REDUCTION" not in cfg.MODEL:
        cfg.MODEL.TOKEN_REDUCTION = CN()
    node = cfg.MODEL.TOKEN_REDUCTION
    if "METHOD" not in node:
        node.METHOD = "expedit"
    if "BASE" not in node:  # "": MODEL.EXPEDIT.BASE, its alias (base_backbone_name)
        node.BASE = ""
    for method in registered_methods().values():
        if method.config_node is None:
            continue
        if method.config_node not in node:
            node[method.config_node] = CN()
        for key, value in method.config_defaults.items():
            if key not in node[method.config_node]:
                node[method.config_node][key] = value


def settings_from_config(cfg):
    """The settings of the configured method, validated, or None (not reduced)."""
    name = cfg.MODEL.get("TOKEN_REDUCTION", {}).get("METHOD", "expedit")
    if name == "none":
        return None
    settings = get_method(name).from_config(cfg)
    return None if settings is None or settings.off else settings


def canonical_key(key: str, value):
    """Official Expedit Swin key/value -> ``MODEL.EXPEDIT`` key/value (others unchanged)."""
    if key not in OFFICIAL_SWIN_ALIASES:
        return key, value
    if key.endswith("NUM_SPIXELS"):
        side = math.isqrt(int(value)) if isinstance(value, int) and value > 0 else 0
        if side * side != value:
            raise ValueError(f"{key}={value!r}: clusters per window must be a positive square (64 = 8x8)")
        value = [side, side]
    return OFFICIAL_SWIN_ALIASES[key], value


_REQUIRED = object()


def config_value(cfg, key: str, default=_REQUIRED):
    """The value of a dotted key (``"MODEL.TOKEN_REDUCTION.BASE"``) in a config; ``default`` where a
    part is missing, else a KeyError naming the key."""
    node = cfg
    for part in key.split("."):
        if not hasattr(node, "get") or part not in node:
            if default is _REQUIRED:
                raise KeyError(f"config key {key} is missing (no {part!r})")
            return default
        node = node[part]
    return node


def official_swin_values(cfg) -> dict:
    """The official ``MODEL.SWIN`` Expedit keys of ``cfg`` as ``MODEL.EXPEDIT`` key -> value."""
    return dict(canonical_key(official, config_value(cfg, official)) for official in OFFICIAL_SWIN_ALIASES)


#: FPN entries whose bottom-up backbone is named by MODEL.FPN.BOTTOM_UP
BOTTOM_UP_FPNS = ("build_bottom_up_fpn_backbone", "build_bottom_up_retinanet_fpn_backbone")


def _backbone_key(cfg) -> str:
    return "MODEL.FPN.BOTTOM_UP" if cfg.MODEL.BACKBONE.NAME in BOTTOM_UP_FPNS else "MODEL.BACKBONE.NAME"


def as_opts(values: dict) -> list[str]:
    """``{key: value}`` -> ``[KEY, VALUE, ...]`` as the command line (``merge_from_list``)
    takes them: strings as they are, other values as Python literals."""
    return [item for k, v in values.items() for item in (k, v if isinstance(v, str) else repr(v))]


def point_overrides(base_cfg, overrides: dict, baseline: bool = False) -> dict:
    """Config key -> value that turn ``base_cfg`` into the setting ``overrides`` (canonical
    keys, see :func:`canonical_key`), or into the un-reduced baseline (``baseline``).

    Reduction keys (``MODEL.EXPEDIT.*``, ``MODEL.TOKEN_REDUCTION.*``) put the wrapper entry in
    place of a plain backbone (or of ``D2HourglassSwinTransformer``, whose official keys are
    carried over first) and switch the method on; the baseline switches it off.
    """
    key = _backbone_key(base_cfg)
    name = config_value(base_cfg, key)
    out: dict = {}
    if baseline:
        if name in WRAPPER_BACKBONES:
            out["MODEL.EXPEDIT.ENABLED"] = False
            out[METHOD_KEY] = "none"
        elif name == "D2HourglassSwinTransformer":
            out[key] = "D2SwinTransformer"
        return out
    reduced = any(k.startswith(("MODEL.EXPEDIT.", "MODEL.TOKEN_REDUCTION.")) for k in overrides)
    if reduced and overrides.get(key, WRAPPER_BACKBONES[0]) not in WRAPPER_BACKBONES:
        # the wrapper reads the method keys; another backbone here would drop them silently
        raise ValueError(f"{key}={overrides[key]!r} beside token-reduction keys: a reduced point runs through "
                         f"{WRAPPER_BACKBONES[0]}, put in place for it; give the backbone to reduce in the base "
                         f"config (or {BASE_KEYS[0]})")
    if reduced:
        if name == "D2HourglassSwinTransformer":  # carry the official keys over, then override
            out.update(official_swin_values(base_cfg))
            out.update({key: WRAPPER_BACKBONES[0], BASE_KEYS[0]: "D2SwinTransformer"})
        elif name not in WRAPPER_BACKBONES and name not in BOTTOM_UP_FPNS and name in BACKBONE_REGISTRY:
            out.update({key: WRAPPER_BACKBONES[0], BASE_KEYS[0]: name})
        elif name not in WRAPPER_BACKBONES:
            raise ValueError(f"{key}={name!r}: token-reduction keys need one of {WRAPPER_BACKBONES}, "
                             f"D2HourglassSwinTransformer or a registered backbone such as {plain_backbones()}")
        method = overrides.get(METHOD_KEY, "expedit")
        out[METHOD_KEY] = method
        if method == "expedit":
            out["MODEL.EXPEDIT.ENABLED"] = True
    out.update(overrides)
    return out
