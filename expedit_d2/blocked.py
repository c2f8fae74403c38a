"""Inference in blocks of rows on a CPU, for the layers that see a high-resolution map.

A layer applied to every token of a large map at once (Swin's first stages, the pixel
decoder's encoder) writes its whole (tokens, hidden) activations through memory; on a CPU,
a buffer above glibc's mmap threshold (at most 32 MB) is also mapped fresh, and its pages
faulted in, on every call. Applied to a block of rows at a time, the activations stay in
cache and the small buffers are reused. Each row is computed from the same inputs by the
same layers, so the result equals the one call up to float rounding (bitwise on the CPU
machine).

Blocks are used only on a CPU (on a GPU the extra launches cost more than the traffic they
save), in eval mode (a per-sample op such as drop path would see rows as samples) and
without autograd (a recorded graph would keep every block's activations anyway);
otherwise :func:`map_rows` is the one call.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

__all__ = ["cpu_inference", "runs_in_blocks", "map_rows", "stack_blocks"]


def cpu_inference(x: torch.Tensor, module: nn.Module) -> bool:
    """Whether ``module`` applied to x runs on a CPU, in eval mode, with nothing recorded for
    autograd: where a CPU-only way of computing the same numbers may be chosen."""
    if x.device.type != "cpu" or module.training:
        return False
    return not (torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in module.parameters())))


def runs_in_blocks(x: torch.Tensor, module: nn.Module, total: int, block: int) -> bool:
    """Whether ``total`` rows of x go through ``module`` in blocks of ``block`` rows: in
    :func:`cpu_inference`, and more rows than one block."""
    return total > block and cpu_inference(x, module)


def stack_blocks(blocks: Iterable[tuple[int, torch.Tensor]], total: int) -> torch.Tensor:
    """(start row, (rows, ...) result) pairs covering ``total`` rows -> one (total, ...)
    tensor, allocated with the first block's dtype (so autocast's output dtype is kept)."""
    out = None
    for start, y in blocks:
        if out is None:
            out = y.new_empty((total,) + tuple(y.shape[1:]))
        out[start:start + y.shape[0]] = y
    return out


def map_rows(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, block: int, module: nn.Module,
             residual: bool = False) -> torch.Tensor:
    """``fn(x)``, or ``x + fn(x)`` with ``residual``, for a row-wise ``fn`` over x (..., C).

    Where :func:`runs_in_blocks` allows, ``fn`` sees blocks of ``block`` rows of x viewed as
    (rows, C); with ``residual`` the sums are then written into x itself when x is contiguous
    (the caller's own intermediate, never an input it was given), else into a new tensor."""
    rows = x.numel() // x.shape[-1] if x.numel() else 0
    if not runs_in_blocks(x, module, rows, block):
        return x + fn(x) if residual else fn(x)
    flat = x.reshape(rows, x.shape[-1])  # a view of x when x is contiguous
    if residual:
        for i in range(0, rows, block):
            flat[i:i + block] += fn(flat[i:i + block])
        return flat.view(x.shape)
    out = stack_blocks(((i, fn(flat[i:i + block])) for i in range(0, rows, block)), rows)
    return out.view(*x.shape[:-1], out.shape[-1])
