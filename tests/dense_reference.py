"""Dense, obviously-correct reference of the two operators (the tests' oracle).

Written straight from SPEC sections 2-3: a full (B, N, M) distance matrix, an
explicit neighbourhood mask, no chunking, no centring, no tricks. It is also the
"dense" baseline of ``tools/benchmark_ops.py``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def neighbourhood_mask(grid_size, num_clusters, window: int, device=None) -> torch.Tensor:
    """(N, M) bool: token t may join cluster m (SPEC 2, steps 2-3)."""
    H, W = grid_size
    h, w = num_clusters
    r = window // 2
    rows = torch.tensor([i * h // H for i in range(H) for _ in range(W)], device=device)
    cols = torch.tensor([j * w // W for _ in range(H) for j in range(W)], device=device)
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
                         dtype=torch.float64):
    """Top-k of exp(-tau D), L2-normalised rows, mixed (SPEC 3, with the per-token
    minimum of D subtracted before the exponential, as the SPEC asks)."""
    P = num_prefix_tokens
    v = clusters[:, P:].to(dtype)
    d = sq_dist(x.to(dtype), s.to(dtype)).clamp_min(0)
    weight = torch.exp(-temperature * (d - d.amin(-1, keepdim=True)))
    top, idx = weight.topk(k, dim=-1)
    weight = torch.zeros_like(weight).scatter(-1, idx, top)
    weight = F.normalize(weight, p=2, dim=-1)
    return torch.cat([clusters[:, :P].to(dtype), weight @ v], 1)
