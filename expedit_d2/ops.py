"""The two parameter-free operators of the method (docs/methods.md, "The operators").

``token_clustering`` shrinks a grid of H x W tokens to an h x w grid of cluster
tokens by a few iterations of local soft k-means; ``token_reconstruction`` rebuilds
the H x W tokens from the (later-processed) cluster tokens. Whatever reconstruction
needs is returned by clustering as a :class:`ClusteringState` and passed back in
explicitly; nothing is kept anywhere else.

Shapes (B batch, P prefix tokens such as cls, N = H*W, M = h*w)::

    tokens (B, P + N, C) --token_clustering--> clusters (B, P + M, C), state
    clusters' (B, P + M, C') , state --token_reconstruction--> tokens' (B, P + N, C')

Arithmetic follows the official implementation (the published numbers came from it):
squared Euclidean distances, ``softmax(-tau * D)`` over the clusters in each token's
(2r+1) x (2r+1) neighbourhood, centres ``sum_t A X / max(sum_t A, 1e-16)`` (an empty
cluster becomes the zero vector, as there); reconstruction either mixes the top-k
``exp(-tau_r * D)`` weights normalised by their L2 norm (``mode="topk"``, the paper's
layer and the official Swin release) or copies the nearest final centre's cluster
(``mode="nearest"``, what the official DPT release runs). Everything runs in float32,
whatever the input dtype or autocast state, and masking never uses large finite
constants.

Implementation: one batched matmul per iteration, restricted to the band of cluster
rows that a block of token rows can reach. When ``batch * tokens * band`` would need
more than ``memory_limit`` bytes of temporaries, the work is split into chunks of
token rows (and samples); results do not depend on the split beyond float rounding.
"""
from __future__ import annotations


import math
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .checks import check_odd, check_pair, check_positive_float, check_positive_int
from .layers import gather_rows, no_autocast

__all__ = [
    "ClusteringState",
    "TokenClustering",
    "TokenReconstruction",
    "token_clustering",
    "token_reconstruction",
    "DEFAULT_MEMORY_LIMIT",
    "DEFAULT_ITERS",
    "DEFAULT_TEMPERATURE",
    "DEFAULT_WINDOW",
    "DEFAULT_RECON_K",
    "DEFAULT_RECON_TEMPERATURE",
    "gather_rows",
    "RECONSTRUCTION_MODES",
    "initial_cells",
    "nearest_clusters",
]

#: Default cap, in bytes, on the temporaries (distance/assignment matrices) of one chunk.
DEFAULT_MEMORY_LIMIT = 256 * 2**20
#: The operators' default settings, which are also those of ``MODEL.EXPEDIT`` and of
#: :class:`~expedit_d2.methods.expedit.ExpeditSettings`: the official Expedit-Mask2Former
#: config defaults (``TOKEN_CLUSTERING_BLOCK``: N_ITERS 5, TEMPERATURE 0.05, WINDOW_SIZE 7;
#: ``TOKEN_RECONSTRUCTION_BLOCK``: K 10, TEMPERATURE 0.05).
DEFAULT_ITERS = 5
DEFAULT_TEMPERATURE = 0.05
DEFAULT_WINDOW = 7
DEFAULT_RECON_K = 10
DEFAULT_RECON_TEMPERATURE = 0.05
# float32 matrices of one chunk alive at once (distances/assignments, softmax output,
# plus a bool mask counted as a quarter): used to size chunks.
_LIVE_MATRICES = 3.25
# Reconstruction chunks are capped at this size too: larger ones are no faster.
_LARGE_CHUNK = 32 * 2**20


@dataclass(frozen=True)
class ClusteringState:
    """What token reconstruction needs from the clustering layer.

    Attributes:
        tokens: (B, N, C) the grid tokens X_a that were clustered (input dtype).
        centers: (B, M, C) float32 cluster centres S_a after the last iteration.
        grid_size: (H, W) of the token grid, N = H * W.
        num_clusters: (h, w) of the cluster grid, M = h * w.
        num_prefix_tokens: P, tokens in front of the grid passed through untouched.
    """

    tokens: torch.Tensor
    centers: torch.Tensor
    grid_size: tuple[int, int]
    num_clusters: tuple[int, int]
    num_prefix_tokens: int = 0


# --------------------------------------------------------------------------------------
# validation helpers: every error names the offending value
# --------------------------------------------------------------------------------------
def _window(value, name: str = "clustering window (lambda)") -> int:
    return check_odd(value, name)


def _split_tokens(tokens: torch.Tensor, grid_size: tuple[int, int], num_prefix: int, what: str):
    if tokens.dim() != 3:
        raise ValueError(f"{what} must have shape (B, P + H*W, C), got {tuple(tokens.shape)}")
    if not tokens.is_floating_point():
        raise TypeError(f"{what} must be a floating-point tensor, got {tokens.dtype}")
    H, W = grid_size
    if tokens.shape[1] != num_prefix + H * W:
        raise ValueError(
            f"{what} has {tokens.shape[1]} tokens, but grid_size {grid_size} with "
            f"num_prefix_tokens={num_prefix} needs {num_prefix} + {H}*{W} = {num_prefix + H * W}"
        )
    return tokens[:, :num_prefix], tokens[:, num_prefix:]


# --------------------------------------------------------------------------------------
# chunking
# --------------------------------------------------------------------------------------
# Per-chunk fixed cost of the clustering loop body (a handful of kernel launches and
# Python), expressed in multiply-adds so it can be weighed against matmul work.
_CHUNK_OVERHEAD_MACS = 4e6


def _chunks(batch: int, rows: int, bytes_per_sample, memory_limit: int, macs_per_sample=None) -> Iterator:
    """Yield (batch slice, row start, row end) covering ``batch`` x ``rows``.

    ``bytes_per_sample(r)`` is the temporary memory of a block of r token rows of one
    sample, ``macs_per_sample(r)`` (optional) the total matmul work over all blocks of r
    rows. The block height is the one with the least work (plus a fixed cost per chunk)
    among those that fit in ``memory_limit``; without a work model, the tallest that
    fits. Samples are then grouped as many per chunk as the limit allows (at least one
    row of one sample per chunk, whatever the limit).
    """
    fitting = [r for r in range(1, rows + 1) if bytes_per_sample(r) <= memory_limit] or [1]
    if macs_per_sample is None:
        rows_per_chunk = fitting[-1]
    else:
        def cost(r: int) -> float:
            return batch * macs_per_sample(r) + math.ceil(rows / r) * _CHUNK_OVERHEAD_MACS

        rows_per_chunk = min(reversed(fitting), key=cost)  # ties: the taller block
    per_sample = bytes_per_sample(rows_per_chunk)
    samples_per_chunk = max(1, min(batch, int(memory_limit // max(per_sample, 1))))
    for b0 in range(0, batch, samples_per_chunk):
        bs = slice(b0, min(batch, b0 + samples_per_chunk))
        for r0 in range(0, rows, rows_per_chunk):
            yield bs, r0, min(rows, r0 + rows_per_chunk)


class _Centred:
    """Float32, mean-centred token blocks ``(x[bs, t0:t1] - mean, squared norms)``.

    Materialised once when the whole centred copy takes at most an eighth of
    ``memory_limit`` (the fast path for small grids, e.g. Swin windows); otherwise built
    block by block on demand, so large grids never hold a second full copy of the tokens.
    """

    def __init__(self, tokens: torch.Tensor, mean: torch.Tensor, memory_limit: int):
        self.tokens, self.mean = tokens, mean
        self.full = None
        if 4 * tokens.numel() <= memory_limit / 8:
            self.full = self._make(slice(None), 0, tokens.shape[1])

    def _make(self, bs, t0: int, t1: int):
        x = self.tokens[bs, t0:t1].float() - self.mean[bs]
        return x, (x * x).sum(-1)

    def __call__(self, bs, t0: int, t1: int):
        if self.full is None:
            return self._make(bs, t0, t1)
        x, x_sq = self.full
        return x[bs, t0:t1], x_sq[bs, t0:t1]


def _round_f32(num: int, den: int) -> tuple[int, int]:
    """The float32 nearest to num / den (positive ints; ties to even) as (mantissa, exponent),
    value = mantissa * 2**exponent, in exact integer arithmetic."""
    e = num.bit_length() - den.bit_length()  # 2**e <= num/den < 2**(e+1) after the fix-up
    if (num << max(-e, 0)) < (den << max(e, 0)):
        e -= 1
    shift = 23 - e  # 24 significant bits
    n, d = num << max(shift, 0), den << max(-shift, 0)
    m, r = divmod(n, d)
    if 2 * r > d or (2 * r == d and m % 2):
        m += 1
    return m, -shift


def initial_cells(size: int, cells: int) -> list[int]:
    """The cluster cell of each of ``size`` token rows (or columns) at initialisation.

    Nearest-neighbour resizing of the ``cells`` cell indices to ``size`` positions exactly as
    ``F.interpolate(mode="nearest")`` computes it on the CPU, which is what the official code
    runs: position i takes cell min(floor(f32(i * f32(cells / size))), cells - 1) with
    float32 rounding (identity and i >> 1 for the sizes it special-cases). It equals
    ``i * cells // size`` except where float32 rounding differs. Plain Python integers:
    no tensor, no device, nothing for ``torch.compile`` to break on.
    """
    if size == cells:
        return list(range(size))
    if size == 2 * cells:
        return [i >> 1 for i in range(size)]
    sm, se = _round_f32(cells, size)  # the float32 scale, sm * 2**se
    out = [0]  # position 0 takes cell 0
    for i in range(1, size):
        pm, pe = _round_f32((i * sm) << max(se, 0), 1 << max(-se, 0))  # f32(i * scale), exactly
        floor = (pm << pe) if pe >= 0 else (pm >> -pe)
        out.append(min(floor, cells - 1))
    return out


def _sq_dist(x: torch.Tensor, x_sq: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """||x_t - s_m||^2 for all pairs: (B, n, C), (B, n), (B, m, C) -> (B, n, m)."""
    s_sq = (s * s).sum(-1)
    # in place on the broadcast sum: one (B, n, m) buffer, not two
    return (x_sq.unsqueeze(2) + s_sq.unsqueeze(1)).baddbmm_(x, s.transpose(1, 2), alpha=-2.0)


# --------------------------------------------------------------------------------------
# token clustering
# --------------------------------------------------------------------------------------
def token_clustering(
    tokens: torch.Tensor,
    grid_size: tuple[int, int],
    num_clusters,
    iters: int = DEFAULT_ITERS,
    temperature: float = DEFAULT_TEMPERATURE,
    window: int = DEFAULT_WINDOW,
    num_prefix_tokens: int = 0,
    memory_limit: int = DEFAULT_MEMORY_LIMIT,
) -> tuple[torch.Tensor, ClusteringState]:
    """Cluster an H x W token grid into h x w cluster tokens (docs/methods.md, "The operators").

    Args:
        tokens: (B, P + H*W, C) tokens, the grid tokens in row-major order after P
            prefix tokens (cls/register tokens), any float dtype.
        grid_size: (H, W) of the token grid.
        num_clusters: (h, w) of the cluster grid (or an int for h = w); h > H or w > W is
            allowed, as in the official code.
        iters: number of assignment/update iterations n >= 1.
        temperature: tau > 0; assignments are softmax(-tau * squared distance).
        window: lambda, odd; a token may join clusters within lambda // 2 cluster rows
            and columns of its initial cluster.
        num_prefix_tokens: P, passed through unchanged in front of the clusters.
        memory_limit: bytes allowed for one chunk's temporaries.

    Returns:
        clusters: (B, P + h*w, C) in the input dtype, cluster tokens in row-major order.
        state: :class:`ClusteringState` for :func:`token_reconstruction`.
    """
    H, W = check_pair(grid_size, "grid_size")
    h, w = check_pair(num_clusters, "num_clusters")
    # A cluster axis longer than the token axis is allowed, as in the official code (the
    # Expedit-DPT KITTI row clusters 22 x 76 tokens to 28 x 28): the pooling repeats token
    # rows, the nearest resizing skips cluster rows, and a cluster no token may join ends
    # as the zero vector (the 1e-16 floor of the update).
    iters = check_positive_int(iters, "iters")
    tau = check_positive_float(temperature, "clustering temperature")
    radius = _window(window) // 2
    if isinstance(num_prefix_tokens, bool) or not isinstance(num_prefix_tokens, int) or num_prefix_tokens < 0:
        raise ValueError(f"num_prefix_tokens must be an int >= 0, got {num_prefix_tokens!r}")
    prefix, grid = _split_tokens(tokens, (H, W), num_prefix_tokens, "tokens")
    B, N, C = grid.shape
    M = h * w
    device = tokens.device

    with no_autocast(device):
        # Distances are translation invariant: centring each sample keeps the expanded
        # form ||x||^2 + ||s||^2 - 2 x.s accurate for features with a large common offset.
        mean = grid.mean(dim=1, keepdim=True, dtype=torch.float32)  # (B, 1, C)
        centred = _Centred(grid, mean, memory_limit)
        # 1. initial centres: adaptive average pooling of the grid to (h, w); the
        # channels-last view needs no copy, and pooling commutes with the centring.
        grid_nchw = grid.view(B, H, W, C).permute(0, 3, 1, 2)
        centers = F.adaptive_avg_pool2d(grid_nchw.float(), (h, w))
        centers = centers.flatten(2).transpose(1, 2) - mean  # (B, M, C)

        # 2./3. initial cluster cell of each token row/column, and reachable neighbourhood
        rows = initial_cells(H, h)  # python ints: the same on any device, meta included
        row_of = torch.tensor(rows, device=device)  # (H,)
        col_of = torch.tensor(initial_cells(W, w), device=device)  # (W,)
        m_col = torch.arange(w, device=device)

        def band(r0: int, r1: int) -> tuple[int, int]:
            return max(0, rows[r0] - radius), min(h, rows[r1 - 1] + radius + 1)

        def band_rows(rows: int) -> int:  # upper bound on the cluster rows a block reaches
            return min(h, math.ceil(rows * h / H) + 1 + 2 * radius)

        def chunk_bytes(rows: int) -> float:
            return _LIVE_MATRICES * 4.0 * rows * W * band_rows(rows) * w

        def chunk_macs(rows: int) -> float:  # two matmuls per block, all blocks of a sample
            return 2.0 * H * W * band_rows(rows) * w * C

        plan = []
        for bs, r0, r1 in _chunks(B, H, chunk_bytes, memory_limit, chunk_macs):
            c0, c1 = band(r0, r1)
            t_row = row_of[r0:r1].repeat_interleave(W)  # (n,)
            t_col = col_of.repeat(r1 - r0)
            m_row = torch.arange(c0, c1, device=device).repeat_interleave(w)
            m_c = m_col.repeat(c1 - c0)
            allowed = ((t_row[:, None] - m_row[None, :]).abs() <= radius) & (
                (t_col[:, None] - m_c[None, :]).abs() <= radius
            )
            plan.append((bs, r0 * W, r1 * W, c0 * w, c1 * w, ~allowed))

        # 4. n iterations of masked soft assignment + centre update
        for _ in range(iters):
            numer = torch.zeros_like(centers)
            denom = centers.new_zeros(B, M)
            for bs, t0, t1, m0, m1, blocked in plan:
                xc, xc_sq = centred(bs, t0, t1)
                dist = _sq_dist(xc, xc_sq, centers[bs, m0:m1])
                logits = dist.mul_(-tau).masked_fill_(blocked, float("-inf"))
                assign = torch.softmax(logits, dim=-1)  # (b, n, m), every row has a finite entry
                numer[bs, m0:m1] += torch.bmm(assign.transpose(1, 2), xc)
                denom[bs, m0:m1] += assign.sum(1)
            # Official update S = sum_t A X / max(sum_t A, 1e-16) in absolute coordinates: a
            # cluster whose total affinity is (close to) 0 becomes (close to) the zero vector,
            # i.e. -mean here. ``scale`` is exactly 1 for every other cluster.
            denom = denom.unsqueeze(-1)
            safe = denom.clamp_min(1e-16)
            centers = numer / safe + mean * (denom / safe - 1.0)

        centers = centers + mean
        clusters = torch.cat([prefix, centers.to(tokens.dtype)], dim=1)
    state = ClusteringState(grid, centers, (H, W), (h, w), num_prefix_tokens)
    return clusters, state


# --------------------------------------------------------------------------------------
# token reconstruction
# --------------------------------------------------------------------------------------
RECONSTRUCTION_MODES = ("topk", "nearest")


def token_reconstruction(
    clusters: torch.Tensor,
    state: ClusteringState,
    k: int = DEFAULT_RECON_K,
    temperature: float = DEFAULT_RECON_TEMPERATURE,
    memory_limit: int = DEFAULT_MEMORY_LIMIT,
    mode: str = "topk",
    subtract_min_distance: bool = False,
) -> torch.Tensor:
    """Rebuild the full token grid from processed cluster tokens (docs/methods.md, "The operators").

    Args:
        clusters: (B, P + M, C') cluster tokens after the later layers (any C').
        state: what :func:`token_clustering` returned at the clustering layer.
        k: number of nearest cluster centres mixed per token, 1 <= k <= M ("topk").
        temperature: tau_r > 0, weights exp(-tau_r * squared distance) ("topk").
        memory_limit: bytes allowed for one chunk's temporaries.
        mode: ``"topk"`` -- the paper's layer, as the official Swin release computes it:
            W = exp(-tau_r * max(D, 0)) over all M centres, entries below the k-th largest
            weight zeroed (ties with it kept), rows divided by max(||W||_2, 1e-12);
            ``"nearest"`` -- what the official DPT release runs: token t copies the
            cluster whose final centre is nearest, argmin_m D[t, m] over all M.
        subtract_min_distance: "topk" only, off by default (official): subtract each
            token's smallest distance before the exponential. The official weights
            underflow for tokens far from every centre (all below 1e-12: the row is then
            scaled towards zero instead of normalised); this option keeps the largest
            weight at 1, which equals the official result wherever no underflow happens.

    Returns:
        (B, P + H*W, C') tokens in the dtype of ``clusters``; the P prefix tokens of
        ``clusters`` are passed through.
    """
    if not isinstance(state, ClusteringState):
        raise TypeError(f"state must be the ClusteringState returned by token_clustering, got {type(state)}")
    if mode not in RECONSTRUCTION_MODES:
        raise ValueError(f"reconstruction mode must be one of {RECONSTRUCTION_MODES}, got {mode!r}")
    H, W = state.grid_size
    h, w = state.num_clusters
    M = h * w
    k = check_positive_int(k, "reconstruction k")
    if mode == "topk" and k > M:
        raise ValueError(f"reconstruction k={k} exceeds the number of clusters {M} ({h}x{w})")
    tau = check_positive_float(temperature, "reconstruction temperature")
    prefix, merged = _split_tokens(clusters, (h, w), state.num_prefix_tokens, "clusters")
    B, N, _ = state.tokens.shape
    if merged.shape[0] != B or state.centers.shape[:2] != (B, M):
        raise ValueError(
            f"clusters {tuple(clusters.shape)} do not match the clustering state "
            f"(tokens {tuple(state.tokens.shape)}, centers {tuple(state.centers.shape)})"
        )
    device = clusters.device

    with no_autocast(device):
        mean = state.tokens.mean(dim=1, keepdim=True, dtype=torch.float32)
        centred = _Centred(state.tokens, mean, memory_limit)
        centers = state.centers - mean
        values = merged.float()
        P = state.num_prefix_tokens
        out = clusters.new_empty(B, P + N, values.shape[-1])
        out[:, :P] = prefix

        def chunk_bytes(rows: int) -> float:  # distances/weights and the mixed tokens
            return 4.0 * rows * W * (M + values.shape[-1])

        # Blocks beyond a few tens of MB buy no speed (the matmuls are already large).
        for bs, r0, r1 in _chunks(B, H, chunk_bytes, min(memory_limit, _LARGE_CHUNK)):
            t0, t1 = r0 * W, r1 * W
            dist = _sq_dist(*centred(bs, t0, t1), centers[bs]).clamp_min_(0)  # (b, n, M)
            if mode == "nearest":
                mixed = gather_rows(values[bs], dist.argmin(dim=-1))  # first index on ties, as argmin
            else:
                if subtract_min_distance:
                    dist = dist - dist.amin(dim=-1, keepdim=True)
                weight = torch.exp(dist * -tau)  # out of place: gradients flow in training
                kth = torch.topk(weight, k, dim=-1, sorted=False).values.amin(-1, keepdim=True)
                weight = weight.masked_fill(weight < kth, 0.0)
                weight = F.normalize(weight, p=2.0, dim=-1, eps=1e-12)
                mixed = torch.bmm(weight, values[bs])
            out[bs, P + t0 : P + t1] = mixed
    return out


def nearest_clusters(state: ClusteringState) -> torch.Tensor:
    """(B, H*W) long: for each grid token, the cluster (0 .. h*w - 1, row-major) whose final
    centre is nearest -- the cluster that nearest-centre reconstruction copies to it and the
    heaviest of its top-k mix. Computed by :func:`token_reconstruction` itself
    (``mode="nearest"``) on one-hot cluster tokens, so it is the operator's own choice,
    ties included (the first cluster)."""
    if not isinstance(state, ClusteringState):
        raise TypeError(f"state must be the ClusteringState returned by token_clustering, got {type(state)}")
    B, M = state.centers.shape[:2]
    P = state.num_prefix_tokens
    with no_autocast(state.centers.device):
        onehot = torch.eye(M, device=state.centers.device).expand(B, M, M)
        clusters = torch.cat([onehot.new_zeros(B, P, M), onehot], dim=1)
        copied = token_reconstruction(clusters, state, mode="nearest")
    return copied[:, P:].argmax(dim=-1)


# --------------------------------------------------------------------------------------
# module wrappers (hold the settings; no parameters, no buffers)
# --------------------------------------------------------------------------------------
class TokenClustering(nn.Module):
    """Module form of :func:`token_clustering` holding its settings (no parameters)."""

    def __init__(self, num_clusters, iters: int = DEFAULT_ITERS, temperature: float = DEFAULT_TEMPERATURE,
                 window: int = DEFAULT_WINDOW, memory_limit: int = DEFAULT_MEMORY_LIMIT):
        super().__init__()
        self.num_clusters = check_pair(num_clusters, "num_clusters")
        self.iters = check_positive_int(iters, "iters")
        self.temperature = check_positive_float(temperature, "clustering temperature")
        self.window = _window(window)
        self.memory_limit = check_positive_int(memory_limit, "memory_limit")

    def forward(self, tokens: torch.Tensor, grid_size, num_prefix_tokens: int = 0):
        return token_clustering(tokens, grid_size, self.num_clusters, self.iters,
                                self.temperature, self.window, num_prefix_tokens,
                                self.memory_limit)

    def extra_repr(self) -> str:
        return (f"num_clusters={self.num_clusters}, iters={self.iters}, "
                f"temperature={self.temperature}, window={self.window}")


class TokenReconstruction(nn.Module):
    """Module form of :func:`token_reconstruction` holding its settings (no parameters)."""

    def __init__(self, k: int = DEFAULT_RECON_K, temperature: float = DEFAULT_RECON_TEMPERATURE,
                 memory_limit: int = DEFAULT_MEMORY_LIMIT, mode: str = "topk",
                 subtract_min_distance: bool = False):
        super().__init__()
        self.k = check_positive_int(k, "reconstruction k")
        self.temperature = check_positive_float(temperature, "reconstruction temperature")
        self.memory_limit = check_positive_int(memory_limit, "memory_limit")
        if mode not in RECONSTRUCTION_MODES:
            raise ValueError(f"reconstruction mode must be one of {RECONSTRUCTION_MODES}, got {mode!r}")
        self.mode = mode
        self.subtract_min_distance = bool(subtract_min_distance)

    def forward(self, clusters: torch.Tensor, state: ClusteringState) -> torch.Tensor:
        return token_reconstruction(clusters, state, self.k, self.temperature, self.memory_limit,
                                    self.mode, self.subtract_min_distance)

    def extra_repr(self) -> str:
        if self.mode == "nearest":
            return "mode=nearest"
        return (f"mode=topk, k={self.k}, temperature={self.temperature}, "
                f"subtract_min_distance={self.subtract_min_distance}")
