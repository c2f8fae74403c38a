"""What the sweep needs to know about a project's task.

Optionally, a module-level ``SWEEP`` dict tells :mod:`expedit_d2.sweep` what it cannot
know about the project's task (read through :func:`sweep_protocol`; every key optional,
unknown keys are an error)::

    SWEEP = dict(
        # flattened metric names ("<evaluator key>/<metric>") in order of preference; the
        # first one the evaluation returns is the sweep's primary metric (--metric overrides)
        primary_metrics=["panoptic_seg/PQ", "segm/AP", "sem_seg/mIoU"],
        # metrics where lower is better: full names ("depth/rmse") or last parts ("rmse")
        lower_is_better=[],
        # config keys whose value the model pads its input to a multiple of (besides the
        # backbone's own size_divisibility); <= 0 values are ignored
        size_divisibility_keys=["MODEL.MASK_FORMER.SIZE_DIVISIBILITY"],
    )

Without ``SWEEP`` the defaults of :class:`SweepProtocol` hold: Detectron2's standard
evaluators' main metrics (PQ, mask AP, mIoU, box AP), higher is better, the backbone's
size divisibility only.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

from ..reduction.config import config_value

__all__ = ["SweepProtocol", "sweep_protocol"]


@dataclass(frozen=True)
class SweepProtocol:
    """What the sweep needs to know about a project's task (its ``train_net.py``'s ``SWEEP``
    dict; see the module docstring). Defaults: Detectron2's standard evaluators."""

    primary_metrics: tuple[str, ...] = ("panoptic_seg/PQ", "segm/AP", "sem_seg/mIoU", "bbox/AP")
    lower_is_better: tuple[str, ...] = ()
    size_divisibility_keys: tuple[str, ...] = ()

    def lower_is_better_for(self, metric: str) -> bool:
        """Whether ``metric`` (a flattened name, e.g. ``depth/rmse``) is lower-is-better."""
        return metric in self.lower_is_better or metric.rsplit("/", 1)[-1] in self.lower_is_better

    def size_divisibility(self, cfg) -> int:
        """The largest positive value among ``size_divisibility_keys`` in ``cfg`` (0 if none)."""
        return max([0] + [int(config_value(cfg, key, None) or 0) for key in self.size_divisibility_keys])


def sweep_protocol(project) -> SweepProtocol:
    """The :class:`SweepProtocol` a loaded project module declares in ``SWEEP`` (the
    defaults when it declares none); a malformed declaration raises naming the key."""
    declared = getattr(project, "SWEEP", None)
    if declared is None:
        return SweepProtocol()
    where = f"{getattr(project, '__file__', project)}: SWEEP"
    if not isinstance(declared, dict):
        raise TypeError(f"{where} must be a dict, got {type(declared).__name__}")
    known = {f.name for f in fields(SweepProtocol)}
    unknown = set(declared) - known
    if unknown:
        raise ValueError(f"{where} has unknown keys {sorted(unknown)} (known: {sorted(known)})")
    values = {}
    for key, value in declared.items():
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise TypeError(f"{where}[{key!r}] must be a list of strings, got {value!r}")
        values[key] = tuple(value)
    return SweepProtocol(**values)
