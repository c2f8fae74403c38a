"""Training-free token-reduction methods other than expedit (see ``expedit_d2.ops``).

Pure torch operators, each from its paper's definition; every reduced token sequence
can be restored to the full grid for dense prediction:

* :mod:`.tome` -- Token Merging (bipartite soft matching, size-weighted merging, unmerge);
* :mod:`.evit` -- EViT (keep the tokens the cls token attends to, fuse the rest, restore);
* :mod:`.pool` -- average pooling of the token grid and bilinear unpooling.
"""
from .evit import KeepInfo, evit_keep, evit_restore
from .pool import pool_tokens, unpool_tokens
from .tome import (
    MergeInfo,
    bipartite_soft_matching,
    merge_wavg,
    proportional_attention_bias,
    unmerge,
    unmerge_with_source,
    update_source,
)

__all__ = [
    "MergeInfo",
    "bipartite_soft_matching",
    "merge_wavg",
    "unmerge",
    "update_source",
    "unmerge_with_source",
    "proportional_attention_bias",
    "KeepInfo",
    "evit_keep",
    "evit_restore",
    "pool_tokens",
    "unpool_tokens",
]
