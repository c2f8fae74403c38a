"""Video instance segmentation (YouTube-VIS 2019 / 2021) for the Mask2Former project, beside the
image package ``mask2former`` (as the official ``mask2former_video``): the config keys, the
video decoder, the ``VideoMaskFormer`` meta-architecture (evaluation), YouTube-VIS data.

Importing it registers the upstream names ``VideoMaskFormer`` (meta-architecture) and
``VideoMultiScaleMaskedTransformerDecoder`` (in this project's decoder registry); like
``mask2former``, it stands in for the upstream package: import one of the two.
"""
import mask2former  # noqa: F401  (the image package: MaskFormerHead, the official backbone names)

from .config import add_maskformer2_video_config
from .data import YTVISDatasetMapper, load_ytvis_json, register_ytvis
from .modeling.video_decoder import VideoMultiScaleMaskedTransformerDecoder
from .video_maskformer_model import VideoMaskFormer

__all__ = ["VideoMaskFormer", "VideoMultiScaleMaskedTransformerDecoder", "YTVISDatasetMapper",
           "add_maskformer2_video_config", "load_ytvis_json", "register_ytvis"]
