"""Atomic file writes: the one way expedit-d2 writes results, datasets and reports."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Union

__all__ = ["atomic_write"]


def atomic_write(path, content: Union[str, bytes, Callable[[Path], object]]) -> None:
    """Write ``content`` to ``path`` under a temporary name in the same folder, then rename:
    a reader never sees half a file and a kill leaves the previous file (or none).

    ``content``: text, bytes, or a function that writes the temporary path it is given
    (name it with an explicit format, e.g. ``image.save(p, format="PNG")``)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if isinstance(content, str):
        tmp.write_text(content)
    elif isinstance(content, bytes):
        tmp.write_bytes(content)
    else:
        content(tmp)
    os.replace(tmp, path)
