"""Evaluation in batches, with each image's output independent of its batch mates.

Detectron2 pads a batch to its largest image (``ImageList.from_tensors``, rounded up to the
model's size divisibility), so in a batch of mixed sizes every smaller image would carry
padding it does not have alone, and expedit's clustering (and any token reduction) would
see it. The rule here: **images of equal padded size run together**.
:func:`run_by_image_size` splits a batch into groups whose images pad to the same (H, W),
runs each group as its own batch (padded exactly as each of its images would be alone) and
returns the outputs in input order. Both projects' meta-architectures call it in inference.
The official releases evaluate one image at a time (Detectron2's test loader in
Expedit-Mask2Former; a loop over images in Expedit-DPT's ``run_monodepth.py``), so a batch
of 1 is the official arithmetic and a larger one gives the same outputs up to float
rounding.

:func:`build_batched_test_loader` is Detectron2's test loader (``InferenceSampler``: each
rank a contiguous share of the images, in order) with ``TEST.IMS_PER_BATCH`` images per
batch (default 1, Detectron2 0.6's fixed value).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch.utils.data as torchdata
from detectron2.config import configurable
from detectron2.data.build import _test_loader_from_config, trivial_batch_collator
from detectron2.data.common import DatasetFromList, MapDataset
from detectron2.data.samplers import InferenceSampler

from .checks import check_int_at_least, check_positive_int

__all__ = ["padded_size", "groups_by_padded_size", "run_by_image_size", "build_batched_test_loader"]


def padded_size(size: Sequence[int], size_divisibility: int) -> tuple[int, int]:
    """(H, W) rounded up to multiples of ``size_divisibility`` (unchanged for 0 or 1), as
    ``ImageList.from_tensors`` pads a batch of one image of that size."""
    d = check_int_at_least(size_divisibility, "size_divisibility", 0)
    h, w = (int(s) for s in size[-2:])
    if d <= 1:
        return h, w
    return -(-h // d) * d, -(-w // d) * d


def groups_by_padded_size(sizes: Sequence[Sequence[int]], size_divisibility: int) -> list[list[int]]:
    """Indices of ``sizes`` grouped by padded size, groups in order of first appearance,
    indices ascending within a group."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, size in enumerate(sizes):
        groups.setdefault(padded_size(size, size_divisibility), []).append(i)
    return list(groups.values())


def run_by_image_size(batched_inputs: list[dict], fn: Callable[[list[dict]], list], size_divisibility: int) -> list:
    """``fn`` (a batch of Detectron2 input dicts -> one output per input) on each group of
    ``batched_inputs`` whose ``"image"`` tensors pad to the same size; the outputs in input
    order. One group (the usual case, and always with one image) is a single call of ``fn``
    on ``batched_inputs`` itself."""
    groups = groups_by_padded_size([x["image"].shape[-2:] for x in batched_inputs], size_divisibility)
    if len(groups) == 1:
        return fn(batched_inputs)
    outputs: list = [None] * len(batched_inputs)
    for group in groups:
        results = fn([batched_inputs[i] for i in group])
        if len(results) != len(group):
            raise ValueError(f"{getattr(fn, '__qualname__', fn)} returned {len(results)} outputs for "
                             f"{len(group)} inputs")
        for i, r in zip(group, results):
            outputs[i] = r
    return outputs


def _batched_test_loader_from_config(cfg, dataset_name, mapper=None):
    args = _test_loader_from_config(cfg, dataset_name, mapper)  # Detectron2's: dataset, mapper, workers
    args["batch_size"] = check_positive_int(cfg.TEST.IMS_PER_BATCH, "TEST.IMS_PER_BATCH")
    return args


@configurable(from_config=_batched_test_loader_from_config)
def build_batched_test_loader(dataset, *, mapper, batch_size: int = 1, sampler=None, num_workers: int = 0):
    """Detectron2's ``build_detection_test_loader`` with ``batch_size`` images per batch
    (``cfg, dataset_name[, mapper]``: ``TEST.IMS_PER_BATCH``). The sampler defaults to
    ``InferenceSampler``; each batch is a list of the mapper's dicts; the last batch of a
    rank may be shorter."""
    batch_size = check_positive_int(batch_size, "batch_size")
    if isinstance(dataset, list):
        dataset = DatasetFromList(dataset, copy=False)
    if mapper is not None:
        dataset = MapDataset(dataset, mapper)
    if isinstance(dataset, torchdata.IterableDataset):
        if sampler is not None:
            raise ValueError("an iterable dataset takes no sampler")
    elif sampler is None:
        sampler = InferenceSampler(len(dataset))
    return torchdata.DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                                collate_fn=trivial_batch_collator, drop_last=False)
