"""Training-free token-reduction methods, one file each (operators, settings, patches):

* :mod:`.expedit` -- the paper's clustering/reconstruction (operators in :mod:`expedit_d2.ops`);
* :mod:`.tome` -- Token Merging (bipartite soft matching, size-weighted merging, unmerge);
* :mod:`.evit` -- EViT (keep the tokens the cls token attends to, fuse the rest, restore);
* :mod:`.pool` -- average pooling of the token grid and bilinear unpooling.

Importing this package registers them with :mod:`expedit_d2.reduction`.
"""
from .evit import EViTSettings, KeepInfo, evit_keep, evit_restore
from .expedit import ExpeditSettings, unexpedited_images
from .pool import PoolSettings, pool_tokens, unpool_tokens
from .tome import (
    MergeInfo,
    ToMeSettings,
    bipartite_soft_matching,
    merge_wavg,
    unmerge,
    unmerge_with_source,
    update_source,
)

__all__ = [
    "ExpeditSettings",
    "unexpedited_images",
    "ToMeSettings",
    "MergeInfo",
    "bipartite_soft_matching",
    "merge_wavg",
    "unmerge",
    "update_source",
    "unmerge_with_source",
    "EViTSettings",
    "KeepInfo",
    "evit_keep",
    "evit_restore",
    "PoolSettings",
    "pool_tokens",
    "unpool_tokens",
]
