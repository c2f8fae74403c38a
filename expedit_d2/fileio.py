"""Atomic file writes: the one way expedit-d2 writes results, datasets and reports."""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Callable, Union

__all__ = ["atomic_write"]


def atomic_write(path, content: Union[str, bytes, Callable[[Path], object]]) -> None:
    """Write ``content`` to ``path`` under a unique temporary name in the same folder, then
    rename: a reader never sees half a file, a kill leaves the previous file (or none), and
    concurrent writers never trip over each other's temporary files (the last rename wins).

    ``content``: text, bytes, or a function that writes the temporary path it is given
    (name it with an explicit format, e.g. ``image.save(p, format="PNG")``)."""
    path = Path(path)
    # a temporary name of its own: concurrent writers of the same file never share one
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        if isinstance(content, str):
            tmp.write_text(content)
        elif isinstance(content, bytes):
            tmp.write_bytes(content)
        else:
            content(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
