"""Evaluation shared by the projects."""
from .panoptic import PanopticQualityEvaluator, pq_compute
from .ytvis import YTVISEvaluator, ytvis_evaluate

__all__ = ["PanopticQualityEvaluator", "pq_compute", "YTVISEvaluator", "ytvis_evaluate"]
