"""Evaluation shared by the projects."""
from .panoptic import PanopticQualityEvaluator, pq_compute

__all__ = ["PanopticQualityEvaluator", "pq_compute"]
