"""Dataset registrations that follow the dataset root.

The projects register their datasets lazily under ``$DETECTRON2_DATASETS`` (or a root
given to their ``register_*`` function). Detectron2's catalogs are process-wide, so a
plain "skip if registered" would keep the first root for the rest of the process even
after the root changes (a second ``register_*(root)`` call, another
``$DETECTRON2_DATASETS``). :func:`register_from_root` records the root in the dataset's
metadata (``dataset_root``) and registers the dataset again when the root changes.
Datasets registered by someone else (no ``dataset_root``) are left as they are.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

from detectron2.data import DatasetCatalog, MetadataCatalog

__all__ = ["register_from_root"]


def register_from_root(name: str, root, register: Callable[[], None]) -> bool:
    """Register ``name`` by calling ``register()`` unless it is registered from ``root``.

    Returns True when ``register()`` ran. A dataset registered from another root is removed
    from both catalogs first; one registered without a ``dataset_root`` (by the user or a
    test, under the same name) is kept and ``register()`` does not run.
    """
    root = str(Path(root))
    if name in DatasetCatalog.list():
        registered = MetadataCatalog.get(name).get("dataset_root", None)
        if registered is None or registered == root:
            return False
        logging.getLogger(__name__).info(
            "dataset %s: root %s -> %s, registering it again", name, registered, root)
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    register()
    MetadataCatalog.get(name).set(dataset_root=root)
    return True
