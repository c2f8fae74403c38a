"""expedit-d2: expedite large vision transformers for dense prediction, without fine-tuning.

The method (Liang et al., NeurIPS 2022) in two parameter-free operators, see
:mod:`expedit_d2.ops`: token clustering after layer alpha, token reconstruction
before features leave the backbone. Importing the package registers the backbones
(``D2SwinTransformer``, ``ExpeditBackbone``, ``D2HourglassSwinTransformer``) in
Detectron2's ``BACKBONE_REGISTRY``; :func:`add_expedit_config` adds the config keys.
"""
from .config import add_expedit_config
from .expedit_backbone import ExpeditSettings, expedite, register_adapter
from .ops import (
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
    "expedite",
    "register_adapter",
]
