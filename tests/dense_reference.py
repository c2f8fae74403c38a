"""Dense, obviously-correct reference of the two operators (the tests' oracle).

Written straight from the paper's definitions (docs/methods.md, "The operators"): a full (B, N, M) distance matrix, an
explicit neighbourhood mask, no chunking, no centring, no tricks. It is also the
"dense" baseline of ``tools/benchmark_ops.py``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def neighbourhood_mask(grid_size, num_clusters, window: int, device=None) -> torch.Tensor:
    """(N, M) bool: token t may join cluster m (the clustering window)."""
    H, W = grid_size
    h, w = num_clusters
    r = window // 2
    # initial label map: the h x w cell indices resized to H x W by nearest-neighbour
    # interpolation (what the official code does), then split into row and column
    labels = torch.arange(h * w, dtype=torch.float32).view(1, 1, h, w)
    label = F.interpolate(labels, size=(H, W), mode="nearest").flatten().long().to(device)
    rows, cols = label // w, label % w
    m_rows = torch.tensor([m // w for m in range(h * w)], device=device)
    m_cols = torch.tensor([m % w for m in range(h * w)], device=device)
    return ((rows[:, None] - m_rows[None]).abs() <= r) & ((cols[:, None] - m_cols[None]).abs() <= r)


def sq_dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.cdist(a, b).pow(2)


def dense_clustering(tokens, grid_size, num_clusters, iters=5, temperature=0.05, window=5,
                     num_prefix_tokens=0, dtype=torch.float64):
    """Returns (clusters (B, P+M, C) in ``dtype``, X (B, N, C), S (B, M, C))."""
    H, W = grid_size
    h, w = num_clusters
    P = num_prefix_tokens
    x = tokens[:, P:].to(dtype)
    B, N, C = x.shape
    s = F.adaptive_avg_pool2d(x.transpose(1, 2).reshape(B, C, H, W), (h, w))
    s = s.flatten(2).transpose(1, 2)
    allowed = neighbourhood_mask((H, W), (h, w), window, x.device)
    for _ in range(iters):
        logits = (-temperature * sq_dist(x, s)).masked_fill(~allowed, float("-inf"))
        a = torch.softmax(logits, dim=-1)  # (B, N, M)
        s = a.transpose(1, 2) @ x / a.sum(1).clamp_min(1e-16).unsqueeze(-1)
    return torch.cat([tokens[:, :P].to(dtype), s], 1), x, s


def dense_reconstruction(clusters, x, s, k=20, temperature=1.0, num_prefix_tokens=0,
                         dtype=torch.float64, subtract_min=False):
    """The official top-k layer: W = exp(-tau max(D, 0)), entries below the k-th largest
    weight zeroed (ties with it kept), rows divided by max(||W||_2, 1e-12), mixed.
    ``subtract_min``: the per-token minimum of D is subtracted before the exponential."""
    P = num_prefix_tokens
    v = clusters[:, P:].to(dtype)
    d = sq_dist(x.to(dtype), s.to(dtype)).clamp_min(0)
    if subtract_min:
        d = d - d.amin(-1, keepdim=True)
    weight = torch.exp(-temperature * d)
    kth = weight.topk(k, dim=-1).values[..., -1:]
    weight = torch.where(weight >= kth, weight, torch.zeros_like(weight))
    weight = weight / weight.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return torch.cat([clusters[:, :P].to(dtype), weight @ v], 1)


def dense_nearest_reconstruction(clusters, x, s, num_prefix_tokens=0, dtype=torch.float64):
    """Each token copies the cluster token of its nearest final centre (all centres)."""
    P = num_prefix_tokens
    v = clusters[:, P:].to(dtype)
    nearest = sq_dist(x.to(dtype), s.to(dtype)).argmin(-1)  # (B, N)
    copied = torch.stack([v[b, nearest[b]] for b in range(v.shape[0])])
    return torch.cat([clusters[:, :P].to(dtype), copied], 1)
