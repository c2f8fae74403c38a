"""ToMe / EViT / pooling operators against loop oracles written from each definition."""
import math

import pytest
import torch
import torch.nn.functional as F

from expedit_d2.methods import (
    bipartite_soft_matching,
    evit_keep,
    evit_restore,
    merge_wavg,
    pool_tokens,
    unmerge,
    unmerge_with_source,
    unpool_tokens,
    update_source,
)
from tests.method_oracles import tome_oracle
from tests.numerics import assert_close_f32

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _randn(*shape, seed=0, device="cpu"):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(device)


# ======================================================================================
# ToMe
# ======================================================================================
# (B, N, C, r, P): odd/even counts after cls, no cls, two protected, clamped r
TOME_CASES = [(2, 17, 8, 5, 1), (3, 16, 4, 3, 0), (1, 11, 6, 100, 1), (2, 12, 5, 4, 2), (2, 9, 3, 1, 1)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", TOME_CASES, ids=lambda c: "B{}_N{}_C{}_r{}_P{}".format(*c))
def test_tome_matches_oracle(case, device):
    B, N, C, r, P = case
    metric = _randn(B, N, C, seed=1, device=device)
    x = _randn(B, N, C + 3, seed=2, device=device)
    size = 1 + _randn(B, N, 1, seed=3, device=device).abs().mul(3).round()  # sizes 1, 2, ...
    info = bipartite_soft_matching(metric, r, num_protected=P)
    out, out_size = merge_wavg(info, x, size)
    back = unmerge(info, out)
    r_eff = min(r, (N - P + 1) // 2)
    assert info.r == r_eff and out.shape == (B, N - r_eff, C + 3) and out_size.shape == (B, N - r_eff, 1)
    for b in range(B):
        ref, ref_size, dest, _ = tome_oracle(metric[b].cpu(), x[b].cpu(), size[b, :, 0].cpu(), r, P)
        assert info.dest[b].tolist() == dest
        torch.testing.assert_close(out[b].cpu().double(), ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out_size[b, :, 0].cpu().double(), ref_size)
        for t in range(N):  # every token gets the value of the token it went into
            assert torch.equal(back[b, t], out[b, dest[t]])
    torch.testing.assert_close(out_size.sum(1), size.sum(1))  # total size preserved
    assert torch.equal(out[:, :P], x[:, :P])  # protected tokens untouched, in front


def test_tome_hand_made():
    # cls, a0, b0, a1, b1: cos(a0, b0) = 1/sqrt(1.01) > cos(a1, b1) = 1/sqrt(1.25)
    metric = torch.tensor([[[1.0, 0.05], [1.0, 0.1], [1.0, 0.0], [0.0, 1.0], [0.5, 1.0]]])
    x = torch.tensor([[10.0, 1.0, 3.0, 5.0, 7.0]]).unsqueeze(-1)
    info = bipartite_soft_matching(metric, 1)
    assert info.dest.tolist() == [[0, 2, 2, 1, 3]]  # a0 joins b0; order cls, a1, b0, b1
    out, size = merge_wavg(info, x)
    assert out[0, :, 0].tolist() == [10.0, 5.0, 2.0, 7.0]
    assert size[0, :, 0].tolist() == [1.0, 1.0, 2.0, 1.0]
    assert unmerge(info, out)[0, :, 0].tolist() == [10.0, 2.0, 2.0, 5.0, 7.0]
    # with sizes, the average is weighted: (3 * 1 + 1 * 3) / 4
    out, size = merge_wavg(info, x, torch.tensor([[[1.0], [3.0], [1.0], [1.0], [2.0]]]))
    assert out[0, 2, 0].item() == 1.5 and size[0, :, 0].tolist() == [1.0, 1.0, 4.0, 2.0]
    # unprotected, the cls row is an A token (A = cls, b0, b1; B = a0, a1) and merges:
    # best cosines cls~a0 0.9988, b0~a0 0.9950, b1~a1 0.8944 -> cls, b0 join a0
    info0 = bipartite_soft_matching(metric, 2, num_protected=0)
    assert info0.dest.tolist() == [[1, 1, 1, 2, 0]]  # order: b1 (unmerged A), a0, a1


def test_tome_r_zero_is_identity():
    x = _randn(2, 9, 4)
    info = bipartite_soft_matching(_randn(2, 9, 3, seed=1), 0)
    assert info.r == 0 and info.dest.tolist() == [list(range(9))] * 2
    out, size = merge_wavg(info, x)
    assert torch.equal(out, x) and torch.equal(size, torch.ones(2, 9, 1))
    assert torch.equal(unmerge(info, out), x)


def test_tome_r_clamped():
    metric = _randn(2, 8, 4)  # cls + 7: |A| = 4, |B| = 3
    info = bipartite_soft_matching(metric, 50)
    assert info.r == 4 and info.num_out == 4
    out, size = merge_wavg(info, _randn(2, 8, 5, seed=1))
    assert out.shape == (2, 4, 5) and size.sum(1).tolist() == [[8.0], [8.0]]
    # every A token merged: the output is cls then the three B tokens
    assert info.dest[:, 2::2].tolist() == [[1, 2, 3]] * 2
    # nothing to merge into: one patch token (empty B) or only protected tokens
    assert bipartite_soft_matching(_randn(1, 2, 4), 3).r == 0
    assert bipartite_soft_matching(_randn(1, 3, 4), 3, num_protected=3).r == 0


def test_tome_chained_merges_unmerge():
    B, N0, C, P = 2, 21, 6, 1
    x0 = _randn(B, N0, C, seed=5)
    x, size, source = x0, None, None
    groups = [[[t] for t in range(N0)] for _ in range(B)]  # original tokens in each current token
    for step, r in enumerate([4, 5, 3]):
        metric = _randn(B, x.shape[1], 4, seed=10 + step)
        info = bipartite_soft_matching(metric, r, P)
        x, size = merge_wavg(info, x, size)
        source = update_source(source, info)
        for b in range(B):
            s = torch.tensor([float(len(g)) for g in groups[b]])
            _, _, _, merged = tome_oracle(metric[b], x0[b, : len(groups[b])], s, r, P)
            groups[b] = [sum((groups[b][t] for t in g), []) for g in merged]
        assert torch.equal(size.sum(1), torch.full((B, 1), float(N0)))
    full = unmerge_with_source(x, source)
    assert full.shape == (B, N0, C) and x.shape[1] == N0 - 12
    for b in range(B):
        for k, g in enumerate(groups[b]):
            assert size[b, k, 0].item() == len(g)
            # merged values are plain means of the original tokens they contain
            torch.testing.assert_close(x[b, k], x0[b, g].mean(0), atol=1e-5, rtol=1e-5)
            for t in g:
                assert source[b, t].item() == k and torch.equal(full[b, t], x[b, k])
    assert torch.equal(full[:, 0], x0[:, 0])  # cls never merged


def test_tome_dtypes():
    # half-precision inputs: matching in float32, outputs in the input dtype
    x = _randn(2, 9, 4).bfloat16()
    info = bipartite_soft_matching(x, 3)
    assert torch.equal(info.dest, bipartite_soft_matching(x.float(), 3).dest)
    out, size = merge_wavg(info, x)
    assert out.dtype == torch.bfloat16 and size.dtype == torch.float32
    assert unmerge(info, out).dtype == torch.bfloat16


def test_tome_bad_arguments():
    metric = _randn(1, 6, 3)
    with pytest.raises(ValueError, match="r must be an int >= 0, got -1"):
        bipartite_soft_matching(metric, -1)
    with pytest.raises(ValueError, match="r must be an int >= 0, got 1.5"):
        bipartite_soft_matching(metric, 1.5)
    with pytest.raises(ValueError, match="num_protected must be an int >= 0, got -2"):
        bipartite_soft_matching(metric, 1, -2)
    with pytest.raises(ValueError, match="num_protected=7 exceeds"):
        bipartite_soft_matching(metric, 1, 7)
    with pytest.raises(ValueError, match=r"metric must have shape \(B, N, C\), got \(6, 3\)"):
        bipartite_soft_matching(metric[0], 1)
    info = bipartite_soft_matching(metric, 2)
    with pytest.raises(ValueError, match=r"x has shape \(1, 5, 3\)"):
        merge_wavg(info, metric[:, :5])
    with pytest.raises(ValueError, match=r"size must have shape .* got \(1, 6\)"):
        merge_wavg(info, metric, torch.ones(1, 6))
    with pytest.raises(ValueError, match=r"x_merged has shape \(1, 6, 3\)"):
        unmerge(info, metric)
    with pytest.raises(ValueError, match=r"source must be a \(B, N0\) long tensor, got \(1, 6\) torch.float32"):
        unmerge_with_source(metric, torch.zeros(1, 6))
    with pytest.raises(ValueError, match=r"source must have shape \(B, N0\) with B = 1, got \(2, 6\)"):
        update_source(torch.zeros(2, 6, dtype=torch.long), info)


# ======================================================================================
# EViT
# ======================================================================================
def evit_oracle(x, attn, keep_rate, fuse):
    """One sample: x (1 + N, C), attn (N,) -> (new x, kept positions, dropped positions)."""
    N = attn.shape[0]
    K = math.ceil(keep_rate * N)
    if K >= N:
        return x, list(range(N)), []
    ranked = sorted(range(N), key=lambda i: (-float(attn[i]), i))
    kept, dropped = sorted(ranked[:K]), sorted(ranked[K:])
    rows = [x[0]] + [x[1 + i] for i in kept]
    if fuse:
        total = sum(float(attn[j]) for j in dropped)
        rows.append(sum(float(attn[j]) / total * x[1 + j].double() for j in dropped).to(x.dtype))
    return torch.stack(rows), kept, dropped


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "keep_rate, fuse", [(0.5, True), (0.7, False), (0.3, True), (0.95, True), (1.0, True)]
)
def test_evit_keep_matches_oracle(keep_rate, fuse, device):
    B, N, C = 3, 13, 5
    x = _randn(B, 1 + N, C, seed=1, device=device)
    attn = torch.softmax(_randn(B, N, seed=2, device=device), dim=1)
    out, info = evit_keep(x, attn, keep_rate, fuse)
    K = math.ceil(keep_rate * N)
    assert info.kept.shape == (B, K) and info.dropped.shape == (B, N - K)
    for b in range(B):
        ref, kept, dropped = evit_oracle(x[b].cpu(), attn[b].cpu(), keep_rate, fuse)
        assert info.kept[b].tolist() == kept and info.dropped[b].tolist() == dropped
        assert_close_f32(out[b].cpu(), ref)
        for k, j in enumerate(dropped):
            assert torch.equal(info.dropped_values[b, k], x[b, 1 + j])


def test_evit_keep_all_is_identity():
    x = _randn(2, 11, 4)
    attn = torch.softmax(_randn(2, 10, seed=1), dim=1)
    for rate in (1.0, 1, 0.95):  # ceil(0.95 * 10) = 10 keeps all too
        out, info = evit_keep(x, attn, rate)
        assert out is x and not info.fused and info.dropped.shape == (2, 0) and info.num_out == 10
        assert torch.equal(evit_restore([info], out), x)


def test_evit_hand_made():
    x = torch.tensor([[9.0, 1.0, 2.0, 3.0, 4.0]]).unsqueeze(-1)  # cls, then 4 patches
    attn = torch.tensor([[0.1, 0.4, 0.2, 0.3]])
    out, info = evit_keep(x, attn, 0.5)
    # keep 2: positions 1 and 3 (original order); fuse 0 and 2 with weights 1/3, 2/3
    assert info.kept.tolist() == [[1, 3]] and info.dropped.tolist() == [[0, 2]]
    torch.testing.assert_close(out[0, :, 0], torch.tensor([9.0, 2.0, 4.0, 7.0 / 3.0]))
    out, _ = evit_keep(x, attn, 0.5, fuse=False)
    assert out[0, :, 0].tolist() == [9.0, 2.0, 4.0]
    # restore at a tap: processed values for kept tokens, step values for the dropped
    tap = torch.tensor([[[90.0], [20.0], [40.0], [-1.0]]])
    assert evit_restore([info], tap)[0, :, 0].tolist() == [90.0, 1.0, 20.0, 3.0, 40.0]


@pytest.mark.parametrize("fuse", [True, False])
def test_evit_chained_restore(fuse):
    B, N0, C = 2, 16, 3
    x = _randn(B, 1 + N0, C, seed=3)
    infos = []
    labels = [list(range(N0)) for _ in range(B)]  # grid position of each patch token, None: fused
    last = [dict() for _ in range(B)]  # grid position -> value when it was dropped
    for step, rate in enumerate([0.75, 0.5, 0.6]):
        x = x * 2 + step  # stands for the blocks between keep steps
        attn = torch.softmax(_randn(B, x.shape[1] - 1, seed=20 + step), dim=1)
        new_x, info = evit_keep(x, attn, rate, fuse)
        for b in range(B):
            _, kept, dropped = evit_oracle(x[b], attn[b], rate, fuse)
            for j in dropped:
                if labels[b][j] is not None:
                    last[b][labels[b][j]] = x[b, 1 + j].clone()
            labels[b] = [labels[b][i] for i in kept] + ([None] if fuse else [])
        x = new_x
        infos.append(info)
        tap = x - 100  # a tap after more blocks
        full = evit_restore(infos, tap)
        assert full.shape == (B, 1 + N0, C)
        for b in range(B):
            assert torch.equal(full[b, 0], tap[b, 0])
            expect = dict(last[b])
            expect.update({g: tap[b, 1 + i] for i, g in enumerate(labels[b]) if g is not None})
            assert sorted(expect) == list(range(N0))
            for g in range(N0):
                assert torch.equal(full[b, 1 + g], expect[g]), (step, b, g)
    # patch tokens 16 -> 12 (+1 fused) -> 7 (+1) -> 5 (+1); unfused 16 -> 12 -> 6 -> 4
    assert x.shape[1] == 1 + (6 if fuse else 4)


def test_evit_bad_arguments():
    x = _randn(1, 5, 2)
    attn = torch.full((1, 4), 0.25)
    for rate in (0, 0.0, 1.5, -0.2, float("nan"), "0.5", True):
        with pytest.raises(ValueError, match=f"keep_rate must be a number in \\(0, 1\\], got {rate!r}"):
            evit_keep(x, attn, rate)
    with pytest.raises(ValueError, match=r"cls_attn must have shape \(B, N\) = \(1, 4\).*got \(1, 5\)"):
        evit_keep(x, torch.ones(1, 5), 0.5)
    with pytest.raises(ValueError, match=r"x must have shape \(B, 1 \+ N, C\) with N >= 1, got \(1, 1, 2\)"):
        evit_keep(x[:, :1], attn[:, :0], 0.5)
    out, a = evit_keep(x, attn, 0.5)  # 4 -> 2 + fused
    _, b = evit_keep(x, attn, 0.5)  # takes 4 tokens, but a put out 3
    with pytest.raises(ValueError, match=r"infos\[1\] takes 4 patch tokens, but infos\[0\] put out 3"):
        evit_restore([a, b], out)
    with pytest.raises(ValueError, match=r"current must have shape .* = \(1, 4, C\), got \(1, 5, 2\)"):
        evit_restore([a], x)


# ======================================================================================
# pooling
# ======================================================================================
def pool_oracle(grid, h, w):
    """grid (H, W, C) -> (h, w, C), adaptive average pooling bins by hand."""
    H, W, _ = grid.shape
    rows = []
    for i in range(h):
        r0, r1 = (i * H) // h, -((-(i + 1) * H) // h)
        row = []
        for j in range(w):
            c0, c1 = (j * W) // w, -((-(j + 1) * W) // w)
            cell = [grid[a, c].double() for a in range(r0, r1) for c in range(c0, c1)]
            row.append(sum(cell) / len(cell))
        rows.append(torch.stack(row))
    return torch.stack(rows)


def bilinear_oracle(grid, H, W):
    """grid (h, w, C) -> (H, W, C), bilinear with half-pixel centres (align_corners=False)."""
    h, w, _ = grid.shape

    def taps(out, size_in, size_out):
        src = max((out + 0.5) * size_in / size_out - 0.5, 0.0)
        i0 = min(int(math.floor(src)), size_in - 1)
        return i0, min(i0 + 1, size_in - 1), src - i0

    out = torch.empty(H, W, grid.shape[2], dtype=torch.float64)
    for y in range(H):
        y0, y1, ly = taps(y, h, H)
        for x in range(W):
            x0, x1, lx = taps(x, w, W)
            g = grid.double()
            top = (1 - lx) * g[y0, x0] + lx * g[y0, x1]
            bottom = (1 - lx) * g[y1, x0] + lx * g[y1, x1]
            out[y, x] = (1 - ly) * top + ly * bottom
    return out


POOL_CASES = [(2, 6, 8, 3, 4, 1), (1, 7, 5, 3, 2, 0), (2, 9, 9, 4, 7, 2), (1, 5, 6, 1, 1, 1)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", POOL_CASES, ids=lambda c: "B{}_{}x{}_to_{}x{}_P{}".format(*c))
def test_pool_unpool_match_oracles(case, device):
    B, H, W, h, w, P = case
    C = 3
    x = _randn(B, P + H * W, C, seed=1, device=device)
    pooled = pool_tokens(x, (H, W), (h, w), P)
    assert pooled.shape == (B, P + h * w, C) and pooled.dtype == x.dtype
    assert torch.equal(pooled[:, :P], x[:, :P])
    small = _randn(B, P + h * w, C, seed=2, device=device)
    up = unpool_tokens(small, (H, W), (h, w), P)
    assert up.shape == (B, P + H * W, C) and torch.equal(up[:, :P], small[:, :P])
    ref_up = F.interpolate(
        small[:, P:].transpose(1, 2).reshape(B, C, h, w), size=(H, W), mode="bilinear", align_corners=False
    )
    torch.testing.assert_close(up[:, P:], ref_up.flatten(2).transpose(1, 2))
    for b in range(B):
        ref = pool_oracle(x[b, P:].cpu().view(H, W, C), h, w)
        assert_close_f32(pooled[b, P:].cpu().double(), ref.reshape(h * w, C))
        ref = bilinear_oracle(small[b, P:].cpu().view(h, w, C), H, W)
        assert_close_f32(up[b, P:].cpu().double(), ref.reshape(H * W, C))


def test_pool_identity_and_constants():
    x = _randn(2, 1 + 12, 4)
    assert torch.equal(pool_tokens(x, (3, 4), (3, 4), 1), x)
    assert torch.equal(unpool_tokens(x, (3, 4), (3, 4), 1), x)
    # hand-made: 2x4 grid pooled to 1x2 averages 2x2 blocks; unpool of constants is constant
    grid = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]]).view(1, 8, 1)
    assert pool_tokens(grid, (2, 4), (1, 2))[0, :, 0].tolist() == [3.5, 5.5]
    up = unpool_tokens(torch.full((1, 2, 3), 2.5), (5, 7), (1, 2))
    torch.testing.assert_close(up, torch.full((1, 35, 3), 2.5))
    half = pool_tokens(x.bfloat16(), (3, 4), (2, 2), 1)
    assert half.dtype == torch.bfloat16
    assert unpool_tokens(half, (3, 4), (2, 2), 1).dtype == torch.bfloat16


def test_pool_bad_arguments():
    x = _randn(1, 13, 2)
    bad = r"x must have shape \(B, 1 \+ 3\*4, C\) = \(B, 13, C\), got \(1, 12, 2\)"
    with pytest.raises(ValueError, match=bad):
        pool_tokens(x[:, 1:], (3, 4), (2, 2), 1)
    with pytest.raises(ValueError, match=r"size \(4, 2\) must not exceed grid_size \(3, 4\)"):
        pool_tokens(x, (3, 4), (4, 2), 1)
    with pytest.raises(ValueError, match=r"size must be a positive int or a pair \[h, w\] of positive ints, got \(0, 2\)"):
        pool_tokens(x, (3, 4), (0, 2), 1)
    with pytest.raises(ValueError, match=r"grid_size must be a positive int or a pair .* got \(3,\)"):
        unpool_tokens(x, (3,), (2, 2), 1)
    with pytest.raises(ValueError, match="num_prefix_tokens must be an int >= 0, got -1"):
        unpool_tokens(x, (3, 4), (2, 2), -1)
    bad = r"x must have shape \(B, 1 \+ 2\*2, C\) = \(B, 5, C\), got \(1, 13, 2\)"
    with pytest.raises(ValueError, match=bad):
        unpool_tokens(x, (3, 4), (2, 2), 1)
