"""How the evaluators collect the processes' per-item results (one home for the step)."""
from __future__ import annotations

import itertools

from detectron2.utils import comm

__all__ = ["gather_on_main"]


def gather_on_main(items: list, distributed: bool = True) -> list | None:
    """Every process's ``items`` concatenated in rank order on the main process, None on the
    others (after a barrier); ``items`` as they are when not ``distributed``. Detectron2's
    ``InferenceSampler`` gives each rank a contiguous share, so rank order is dataset order."""
    if not distributed:
        return items
    comm.synchronize()
    gathered = comm.gather(items, dst=0)
    return list(itertools.chain(*gathered)) if comm.is_main_process() else None
