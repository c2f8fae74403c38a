"""DPT-style depth estimation on expedit-d2's ViT / ViT-Hybrid backbones."""
from .checkpoint import convert_dpt_state_dict
from .config import add_dpt_config
from .evaluation import DepthEvaluator, depth_metrics
from .meta_arch import DPTDepth, silog_loss

__all__ = [
    "DPTDepth", "DepthEvaluator", "add_dpt_config", "convert_dpt_state_dict", "depth_metrics",
    "silog_loss",
]
