"""Token reduction as patches on unmodified backbones: the registry, the family protocols
(abstract base classes in :mod:`expedit_d2.backbones.base`: "vit" and "swin", registered in
:mod:`.core`; "windowed" in :mod:`.windowed`), the config (see
:mod:`.config`), and the token groups a patched backbone formed in a pass (:mod:`.groups`).
The methods themselves,
one file each, are in :mod:`expedit_d2.methods` (importing ``expedit_d2`` registers them)."""
from .config import add_token_reduction_config, point_overrides, settings_from_config
from .groups import TokenGroups, record_token_groups, token_groups
from .core import (
    METHOD_KEY, ExampleTarget, SwinWindowReducer, example_settings, TokenReducer, apply_patch, cell_positions, check_vit_blocks, family_of,
    reduction_statistics, register_family, register_method, register_patch, register_prenorm_block,
    registered_methods, regrid_inputs, remove_patch, run_vit_block)
from .windowed import WindowedReducer

__all__ = [
    "METHOD_KEY", "ExampleTarget", "example_settings", "add_token_reduction_config", "apply_patch", "cell_positions", "check_vit_blocks",
    "family_of", "point_overrides", "reduction_statistics", "register_family", "register_prenorm_block", "register_method", "register_patch", "registered_methods",
    "regrid_inputs", "remove_patch", "run_vit_block",
    "settings_from_config", "SwinWindowReducer", "TokenReducer", "WindowedReducer", "TokenGroups",
    "record_token_groups", "token_groups",
]
