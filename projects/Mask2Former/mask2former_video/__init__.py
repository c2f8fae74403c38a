"""Video instance segmentation (YouTube-VIS 2019 / 2021) for the Mask2Former project, beside the
image package ``mask2former``: so far the data side (categories, loader, registration of the
official dataset names, inference mapper); see :mod:`mask2former_video.data`."""
from .data import YTVISDatasetMapper, load_ytvis_json, register_ytvis

__all__ = ["YTVISDatasetMapper", "load_ytvis_json", "register_ytvis"]
