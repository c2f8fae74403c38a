"""Loop oracles of the token-reduction methods' operators, written from each definition."""
import torch


def tome_oracle(metric, x, size, r, P):
    """One sample: bipartite soft matching + size-weighted merge, token by token.

    metric (N, C'), x (N, C), size (N,) -> merged x (M, C), sizes (M,), dest [N],
    groups [M] (the input tokens merged into each output token).
    """
    N = metric.shape[0]
    A = list(range(P, N, 2))
    Bset = list(range(P + 1, N, 2))
    r = min(r, len(A)) if Bset else 0
    if r == 0:
        groups = [[t] for t in range(N)]
    else:
        # F.normalize's rule: a zero vector (a padded token) stays zero, cosine 0 with all
        unit = [metric[t].double() / metric[t].double().norm().clamp_min(1e-12) for t in range(N)]
        best, match = [], []
        for a in A:
            sims = [float(unit[a] @ unit[b]) for b in Bset]
            j = max(range(len(Bset)), key=lambda k: (sims[k], -k))  # first maximum
            best.append(sims[j])
            match.append(j)
        ranked = sorted(range(len(A)), key=lambda i: (-best[i], i))
        merged = set(ranked[:r])
        groups = [[p] for p in range(P)]
        groups += [[A[i]] for i in range(len(A)) if i not in merged]
        for j, b in enumerate(Bset):
            groups.append([b] + [A[i] for i in range(len(A)) if i in merged and match[i] == j])
    dest = [None] * N
    for g, members in enumerate(groups):
        for t in members:
            dest[t] = g
    sizes = torch.tensor([sum(float(size[t]) for t in g) for g in groups], dtype=torch.float64)
    out = torch.stack(
        [sum(float(size[t]) * x[t].double() for t in g) / sizes[k] for k, g in enumerate(groups)]
    )
    return out, sizes, dest, groups
