"""Point configs and their validation before anything is evaluated.

:func:`point_opts` turns a point into the ``KEY VALUE`` overrides of the base config
(translation by :func:`expedit_d2.reduction.config.point_overrides`: the wrapper backbone
for reduced points, the method switched off for the baseline); :func:`validate_points`
builds every point's config and backbone on the meta device and runs it on a shape-only
image of the stated size, padded as the model pads it (the project's ``SWEEP``
``size_divisibility_keys`` and the backbone's own).
"""
from __future__ import annotations

import torch
from detectron2.engine import default_argument_parser

from ..reduction.config import as_opts, point_overrides
from .spec import Point, SweepError, SweepSpec

__all__ = ["point_opts", "build_point_cfg", "validate_points", "check_test_datasets", "point_args"]


def point_opts(base_cfg, point: Point) -> list[str]:
    """Config overrides (``KEY VALUE ...``, values as the command line takes them) that turn
    the base config into ``point``; a point the base config cannot take raises
    :class:`SweepError` naming the point."""
    try:
        opts = point_overrides(base_cfg, dict(point.overrides), baseline=point.baseline)
    except ValueError as e:
        raise SweepError(f"point {point.label} ({dict(point.overrides)}): {e}") from e
    return as_opts(opts)


def point_args(spec: SweepSpec, opts: list[str], extra: list[str] = (), num_gpus: int = 1):
    """Detectron2's ``args`` for the base config + the spec's opts + ``opts``."""
    return default_argument_parser().parse_args(
        ["--config-file", spec.config_file, "--num-gpus", str(num_gpus), *extra, *spec.opts, *opts])


def _base_cfg(project, spec: SweepSpec):
    try:
        return project.build_config(point_args(spec, []))
    except (KeyError, ValueError, AssertionError, TypeError) as e:
        raise SweepError(f"base config {spec.config_file} with opts {spec.opts}: {e}") from e


def build_point_cfg(project, spec: SweepSpec, point: Point, base_cfg):
    """The point's frozen config and its opts; bad keys/values raise :class:`SweepError`
    naming them."""
    opts = point_opts(base_cfg, point)
    try:
        return project.build_config(point_args(spec, opts)), opts
    except (KeyError, ValueError, AssertionError, TypeError) as e:
        raise SweepError(f"point {point.label} ({dict(point.overrides)}): {e}") from e


def validate_points(project, spec: SweepSpec, points: list[Point]) -> dict:
    """Build every point's config and backbone (on the meta device) and run the backbone on a
    meta image of the stated size (padded as the model pads it); returns
    {point id: (cfg, opts)}."""
    from detectron2.modeling import build_backbone

    from .protocol import sweep_protocol

    protocol = sweep_protocol(project)
    base_cfg = _base_cfg(project, spec)
    cfgs = {}
    for point in points:
        cfg, opts = build_point_cfg(project, spec, point, base_cfg)
        vcfg = cfg
        if "EXPEDIT" in cfg.MODEL:  # a stated input smaller than the cluster grid is an error here
            vcfg = cfg.clone()
            vcfg.defrost()
            vcfg.MODEL.EXPEDIT.SMALL_INPUT = "error"
        try:
            with torch.device("meta"):
                backbone = build_backbone(vcfg)
                div = max(int(getattr(backbone, "size_divisibility", 0) or 0), protocol.size_divisibility(cfg), 1)
                H, W = (-(-s // div) * div for s in spec.input_size)
                backbone(torch.empty(1, len(cfg.MODEL.PIXEL_MEAN), H, W))
        except (KeyError, ValueError, AssertionError) as e:
            raise SweepError(f"point {point.label} ({dict(point.overrides)}) at input "
                             f"{spec.input_size[0]}x{spec.input_size[1]}: {e}") from e
        cfgs[point.id] = (cfg, opts)
    return cfgs


def check_test_datasets(cfg) -> None:
    """The evaluation needs DATASETS.TEST, registered: say what is missing before any work."""
    from detectron2.data import DatasetCatalog

    if not cfg.DATASETS.TEST:
        raise SweepError("the config has no DATASETS.TEST: the sweep evaluates every point on it; "
                         "set DATASETS.TEST (e.g. DATASETS.TEST \"('coco_2017_val_panoptic',)\")")
    missing = [d for d in cfg.DATASETS.TEST if d not in DatasetCatalog.list()]
    if missing:
        raise SweepError(f"DATASETS.TEST names {missing}, not registered by the project "
                         f"(registered: {sorted(DatasetCatalog.list())[:12]} ...)")
