"""DPT-style depth estimation on expedit-d2's ViT / ViT-Hybrid backbones."""
from .checkpoint import DPTCheckpointer, convert_dpt_state_dict
from .config import add_dpt_config
from .data import DepthDatasetMapper, load_kitti, load_nyuv2, register_kitti, register_nyuv2
from .evaluation import DepthEvaluator, depth_metrics
from .meta_arch import DPTDepth, silog_loss

__all__ = [
    "DPTCheckpointer", "DPTDepth", "DepthDatasetMapper", "DepthEvaluator", "load_kitti", "load_nyuv2",
    "register_kitti", "register_nyuv2", "add_dpt_config", "convert_dpt_state_dict", "depth_metrics",
    "silog_loss",
]
