"""expedit-d2: expedite large vision transformers for dense prediction, without fine-tuning.

The method (Liang et al., NeurIPS 2022) in two parameter-free operators, see
:mod:`expedit_d2.ops`: token clustering after layer alpha, token reconstruction
before features leave the backbone. Importing the package registers the backbones
(``ExpeditD2SwinTransformer``, ``D2ViT``, ``D2ViTHybrid``, ``D2TimmViT``, ``TokenReductionBackbone``)
in Detectron2's ``BACKBONE_REGISTRY``, no name that other Detectron2 projects register, and
the token-reduction methods (expedit, tome, evit, pool: :mod:`expedit_d2.methods`, patched
onto unmodified backbones by :mod:`expedit_d2.reduction`, the user's own Swin included);
:func:`add_expedit_config` adds the config keys.
"""
import warnings

# Detectron2 (box_regression, ...) and fvcore.nn (focal loss) script functions with
# torch.jit.script at import time, and torch warns on every start that torch.jit.script is
# deprecated. Import them here with that one warning silenced, before anything else does.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated",
                            category=FutureWarning)
    import fvcore.nn  # noqa: F401
    import detectron2.modeling  # noqa: F401

from .config import add_expedit_config  # noqa: E402
from .expedit_backbone import ExpeditSettings  # noqa: E402
from .reduction import apply_patch, register_method, register_patch, remove_patch  # noqa: E402
from .ops import (  # noqa: E402
    ClusteringState,
    TokenClustering,
    TokenReconstruction,
    token_clustering,
    token_reconstruction,
)

__version__ = "0.1.0"

__all__ = [
    "ClusteringState",
    "TokenClustering",
    "TokenReconstruction",
    "token_clustering",
    "token_reconstruction",
    "add_expedit_config",
    "ExpeditSettings",
    "apply_patch",
    "remove_patch",
    "register_method",
    "register_patch",
]
