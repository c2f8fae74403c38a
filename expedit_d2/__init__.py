"""expedit-d2: expedite large vision transformers for dense prediction, without fine-tuning.

The method (Liang et al., NeurIPS 2022) in two parameter-free operators, see
:mod:`expedit_d2.ops`: token clustering after layer alpha, token reconstruction
before features leave the backbone.
"""
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
]
