"""Which tokens a token-reduction method put together, read off a patched backbone's passes.

For pictures (``tools/visualize.py``) and checks. Nothing here changes what a pass computes:
:func:`record_token_groups` observes the reducers of a patched backbone for the duration of a
``with`` block (wrappers on the reducer instances and forward pre-hooks, all removed on
leaving) and, when the block ends, asks each reducer which tokens it put together
(:meth:`~expedit_d2.reduction.core.TokenReducer.groups`,
:meth:`~expedit_d2.reduction.core.SwinWindowReducer.window_groups`)::

    with record_token_groups(model.backbone) as passes:
        outputs = model(inputs)          # any number of backbone passes
    passes[-1].labels                    # (B, h, w) group of each token of the grid

What a group is, per method: expedit -- a cluster (each token in the cluster of its nearest
final centre, :func:`expedit_d2.ops.nearest_clusters`; on Swin, per attention window);
ToMe -- the merged token a token ended in; EViT -- a token kept to the end is a group of its
own, the tokens dropped (fused) at each keep step form one group per step; pooling -- the
pooled cell. A pass that did not reduce (e.g. an input smaller than the cluster grid) gives
every token its own group.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from .core import SwinWindowReducer

__all__ = ["TokenGroups", "record_token_groups", "token_groups"]


@dataclass(frozen=True)
class TokenGroups:
    """The groups of one pass of a patched module.

    Attributes:
        labels: (B, h, w) long, the group of each token of the token grid the method reduced
            (a ViT's patch grid; the grid of the patched Swin stage), numbered 0 .. G - 1 per
            image in row-major order of first appearance.
        input_size: (H, W) of the backbone's input image tensor (as padded by the model),
            which the token grid spans; None where it was not seen.
        module: the patched module's name inside the recorded module ("" for itself).
        reducer: the reducer's class name (e.g. ``ExpeditTokens``, ``PoolSwinWindows``).
    """

    labels: torch.Tensor
    input_size: tuple[int, int] | None
    module: str
    reducer: str

    @property
    def grid_size(self) -> tuple[int, int]:
        return int(self.labels.shape[1]), int(self.labels.shape[2])

    def num_groups(self) -> list[int]:
        """Groups per image."""
        return [int(lab.max()) + 1 for lab in self.labels]


def _renumber(labels: torch.Tensor) -> torch.Tensor:
    """(B, N) any ints -> (B, N) 0 .. G - 1 per image, in order of first appearance."""
    out = torch.empty_like(labels)
    for b, lab in enumerate(labels):
        uniq, inverse = torch.unique(lab, return_inverse=True)
        first = torch.full((len(uniq),), lab.numel(), dtype=torch.long, device=lab.device)
        first.scatter_reduce_(0, inverse, torch.arange(lab.numel(), device=lab.device), "amin")
        rank = torch.empty_like(first)
        rank[first.argsort()] = torch.arange(len(uniq), device=lab.device)
        out[b] = rank[inverse]
    return out


def _per_image(labels: torch.Tensor | None, batch: int, tokens: int, device) -> torch.Tensor:
    """A reducer's answer ((B, N), (N,) or None) -> (B, N) long."""
    if labels is None:
        labels = torch.arange(tokens, device=device)
    if labels.dim() == 1:
        labels = labels.expand(batch, tokens)
    if tuple(labels.shape) != (batch, tokens):
        raise ValueError(f"token groups of shape {tuple(labels.shape)}, expected ({batch}, {tokens})")
    return labels.long()


def _swin_grid(labels: torch.Tensor, batch: int, H: int, W: int, ws: int) -> torch.Tensor:
    """Per-window labels (B*nW, ws*ws) -> (B, H, W): labels made distinct across windows
    (window i's labels offset by i times the groups per window), windows put back in place
    (the inverse of ``window_partition`` on the map padded to multiples of ws), cropped."""
    Hp, Wp = H + (-H) % ws, W + (-W) % ws
    nh, nw = Hp // ws, Wp // ws
    per_window = int(labels.max()) + 1
    windows = labels.view(batch, nh, nw, ws, ws)
    offset = torch.arange(nh * nw, device=labels.device).view(1, nh, nw, 1, 1) * per_window
    grid = (windows + offset).permute(0, 1, 3, 2, 4).reshape(batch, Hp, Wp)
    return grid[:, :H, :W]


def _swin_backbone(root: nn.Module, stage: str) -> nn.Module:
    """The Swin backbone (it takes the image) of the stage named ``<backbone>.layers.<i>``."""
    return root.get_submodule(stage.rsplit(".", 2)[0] if stage.count(".") >= 2 else "")


@contextlib.contextmanager
def record_token_groups(module: nn.Module):
    """Within the block, record every pass of the token-reduction patch inside ``module`` (a
    backbone patched by :func:`~expedit_d2.reduction.apply_patch`, or any module holding
    one, e.g. a whole Detectron2 model); yields a list that, when the block ends, holds one
    :class:`TokenGroups` per pass, in order. ``module`` without a patch is an error naming it.
    The observation is removed on leaving, also on an exception; the passes compute what
    they compute without it."""
    patched = [(name, m) for name, m in module.named_modules() if getattr(m, "token_reduction", None) is not None]
    if not patched:
        raise ValueError(f"{type(module).__name__} has no token-reduction patch (a backbone built with "
                         "MODEL.BACKBONE.NAME TokenReductionBackbone and a MODEL.TOKEN_REDUCTION.METHOD, or "
                         "expedit_d2.reduction.apply_patch): there are no token groups to record")
    pending = []  # (module name, reducer, image size box, labels thunk), in pass order
    passes: list[TokenGroups] = []
    missing = object()
    wrapped, handles = [], []

    def wrap(obj, attr, make):
        wrapped.append((obj, attr, vars(obj).get(attr, missing)))
        setattr(obj, attr, make(getattr(obj, attr)))

    try:
        for name, m in patched:
            reducer = m.token_reduction
            size = {"hw": None}  # the image size of the current pass, seen where the image enters

            def seen(hw, size=size):
                size["hw"] = (int(hw[-2]), int(hw[-1]))

            if not isinstance(reducer, SwinWindowReducer):  # the "vit" family: the reducer is driven by hand
                wrap(m, "embed_tokens", lambda fn, seen=seen: _observed_embed(fn, seen))
                wrap(reducer, "start", lambda fn, name=name, reducer=reducer, size=size:
                     _observed_start(fn, name, reducer, size, pending))
            else:
                # a Swin stage is called as a module: hooks see the image and the stage's grid
                handles.append(_swin_backbone(module, name).register_forward_pre_hook(
                    lambda mod, args, seen=seen: seen(args[0].shape)
                    if args and torch.is_tensor(args[0]) and args[0].dim() == 4 else None))
                geometry = {}
                handles.append(reducer.register_forward_pre_hook(
                    lambda mod, args, geometry=geometry: geometry.update(H=int(args[2]), W=int(args[3]),
                                                                          batch=int(args[1].shape[0]))))
                wrap(reducer, "reduce", lambda fn, name=name, reducer=reducer, size=size, geometry=geometry:
                     _observed_reduce(fn, name, reducer, size, geometry, pending))
        yield passes
    finally:
        for h in handles:
            h.remove()
        for obj, attr, before in reversed(wrapped):
            if before is missing:
                delattr(obj, attr)  # the class's method again
            else:
                setattr(obj, attr, before)
    # the block ran: the states are final now (a pass fills them in as it goes)
    for name, reducer, hw, labels in pending:
        passes.append(TokenGroups(labels(), hw, name, type(reducer).__name__))


def _observed_embed(fn, seen):
    def embed_tokens(images, *args, **kwargs):
        seen(images.shape)
        return fn(images, *args, **kwargs)
    return embed_tokens


def _observed_start(fn, name, reducer, size, pending):
    def start(x, grid, *args, **kwargs):
        state = fn(x, grid, *args, **kwargs)
        h, w = int(grid[0]), int(grid[1])

        def labels(state=state, batch=x.shape[0], device=x.device):
            lab = _per_image(reducer.groups(state), batch, h * w, device)
            return _renumber(lab).view(batch, h, w)

        pending.append((name, reducer, size["hw"], labels))
        return state
    return start


def _observed_reduce(fn, name, reducer, size, geometry, pending):
    def reduce(windows, ws, *args, **kwargs):
        small, state = fn(windows, ws, *args, **kwargs)
        g = dict(geometry)

        def labels(state=state, count=windows.shape[0], tokens=windows.shape[1], device=windows.device):
            per_window = _per_image(reducer.window_groups(state, ws), count, tokens, device)
            grid = _swin_grid(per_window, g["batch"], g["H"], g["W"], ws)
            return _renumber(grid.reshape(g["batch"], -1)).view_as(grid)

        pending.append((name, reducer, size["hw"], labels))
        return small, state
    return reduce


def token_groups(backbone: nn.Module, images: torch.Tensor) -> TokenGroups:
    """The token groups of one pass ``backbone(images)`` (no gradients) of a patched backbone;
    ``images``: (B, C, H, W) as the backbone takes them (normalised, padded)."""
    with torch.no_grad(), record_token_groups(backbone) as passes:
        backbone(images)
    if not passes:
        raise ValueError(f"{type(backbone).__name__}(images) ran no token-reduction pass")
    return passes[-1]
