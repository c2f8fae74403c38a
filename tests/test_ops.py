"""Token clustering / reconstruction against the dense oracle and the method's invariants."""
import pytest
import torch
import torch.nn.functional as F

from expedit_d2.ops import (
    ClusteringState,
    TokenClustering,
    TokenReconstruction,
    token_clustering,
    token_reconstruction,
)
from expedit_d2.ops import DEFAULT_MEMORY_LIMIT, gather_rows, initial_cells
from tests.dense_reference import (
    dense_clustering,
    dense_nearest_reconstruction,
    dense_reconstruction,
)
from tests.numerics import assert_close_f32

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# (B, H, W, h, w, C, prefix, window, tau, k): divisible and non-divisible grids,
# non-square grids, batch > 1, cls tokens, windows 1..7 and the published settings.
CASES = [
    (1, 12, 12, 8, 8, 16, 0, 7, 0.05, 10),  # one Swin window, 12x12 -> 8x8, lambda 7
    (3, 12, 12, 8, 8, 16, 0, 7, 0.05, 10),
    (2, 30, 40, 16, 16, 16, 1, 5, 0.2, 20),  # DPT-like 40x30 tokens + cls
    (2, 30, 40, 24, 24, 8, 1, 5, 0.3, 20),
    (2, 13, 11, 5, 4, 8, 1, 3, 0.5, 3),  # nothing divides
    (1, 7, 19, 3, 6, 12, 2, 5, 0.1, 6),  # two prefix tokens, wide grid
    (4, 9, 9, 9, 9, 4, 0, 1, 0.3, 1),  # as many clusters as tokens, window 1
    (2, 16, 10, 1, 1, 8, 0, 3, 0.1, 1),  # a single cluster
    (2, 11, 38, 14, 14, 8, 1, 5, 0.3, 20),  # more cluster rows than token rows (KITTI's 22x76 -> 28x28, halved)
    (1, 4, 5, 6, 6, 8, 0, 3, 0.3, 5),  # more clusters than tokens: some no token may join (the zero vector)
]


def _inputs(case, seed=0, device="cpu"):
    B, H, W, h, w, C, P, *_ = case
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(B, P + H * W, C, generator=g).to(device)
    later = torch.randn(B, P + h * w, C + 5, generator=g).to(device)
    return tokens, later


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}_{}x{}_to_{}x{}_C{}_P{}_win{}".format(*c[:8]))
def test_matches_dense_oracle(case, device):
    B, H, W, h, w, C, P, window, tau, k = case
    tokens, later = _inputs(case, device=device)
    clusters, state = token_clustering(tokens, (H, W), (h, w), 5, tau, window, P)
    ref, ref_x, ref_s = dense_clustering(tokens.cpu(), (H, W), (h, w), 5, tau, window, P)
    assert clusters.shape == (B, P + h * w, C) and clusters.dtype == tokens.dtype
    torch.testing.assert_close(clusters.cpu().double(), ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(clusters[:, :P], tokens[:, :P])

    # Reconstruction on the same clustering state as the oracle (top-k selection is
    # discontinuous, so both must see identical centres).
    out = token_reconstruction(later, state, k, tau)
    expect = dense_reconstruction(later.cpu(), state.tokens.cpu(), state.centers.cpu(), k, tau, P)
    assert out.shape == (B, P + H * W, C + 5)
    torch.testing.assert_close(out.cpu().double(), expect, atol=1e-5, rtol=1e-5)
    assert torch.equal(out[:, :P], later[:, :P])
    near = token_reconstruction(later, state, k, tau, mode="nearest")
    expect = dense_nearest_reconstruction(later.cpu(), state.tokens.cpu(), state.centers.cpu(), P)
    torch.testing.assert_close(near.cpu().double(), expect, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("case", CASES[:6], ids=str)
def test_chunking_gives_same_results(case):
    B, H, W, h, w, C, P, window, tau, k = case
    tokens, later = _inputs(case, seed=1)
    whole, state = token_clustering(tokens, (H, W), (h, w), 5, tau, window, P)
    # a limit far below one row forces one token row of one sample per chunk
    chunked, cstate = token_clustering(tokens, (H, W), (h, w), 5, tau, window, P, memory_limit=64)
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-5)
    rec_whole = token_reconstruction(later, state, k, tau)
    rec_chunked = token_reconstruction(later, state, k, tau, memory_limit=64)
    assert_close_f32(rec_chunked, rec_whole)


def test_samples_are_independent():
    case = CASES[2]
    B, H, W, h, w, C, P, window, tau, k = case
    tokens, later = _inputs(case, seed=2)
    batched, state = token_clustering(tokens, (H, W), (h, w), 5, tau, window, P)
    rec = token_reconstruction(later, state, k, tau)
    for b in range(B):
        one, s1 = token_clustering(tokens[b : b + 1], (H, W), (h, w), 5, tau, window, P)
        torch.testing.assert_close(one, batched[b : b + 1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(token_reconstruction(later[b : b + 1], s1, k, tau),
                                   rec[b : b + 1], atol=1e-5, rtol=1e-5)


def test_clusters_are_convex_combinations_of_tokens():
    torch.manual_seed(3)
    H, W, h, w, C = 20, 14, 6, 5, 6
    x = torch.rand(2, H * W, C) * 10 - 3
    clusters, _ = token_clustering(x, (H, W), (h, w), iters=5, temperature=0.5, window=3)
    # necessary condition: inside the per-channel bounding box of the tokens ...
    assert (clusters >= x.amin(1, keepdim=True) - 1e-5).all()
    assert (clusters <= x.amax(1, keepdim=True) + 1e-5).all()
    # ... and affine equivariance, which holds exactly for convex combinations
    shift, scale = torch.randn(1, 1, C) * 100, 3.0
    moved, _ = token_clustering(x * scale + shift, (H, W), (h, w), iters=5,
                                temperature=0.5 / scale**2, window=3)
    torch.testing.assert_close(moved, clusters * scale + shift, atol=1e-3, rtol=1e-4)


def test_one_cluster_per_token_with_hard_temperature_returns_the_tokens():
    torch.manual_seed(4)
    H, W = 7, 9
    x = torch.randn(3, 1 + H * W, 16)
    clusters, state = token_clustering(x, (H, W), (H, W), iters=5, temperature=1e4, window=3,
                                       num_prefix_tokens=1)
    torch.testing.assert_close(clusters, x, atol=1e-5, rtol=0)
    # and reconstruction with k = 1 maps each token back to its own cluster
    rec = token_reconstruction(clusters, state, k=1, temperature=1.0)
    torch.testing.assert_close(rec, x, atol=1e-5, rtol=0)


def test_reconstruction_rows_have_unit_l2_norm():
    torch.manual_seed(5)
    H, W, h, w, k = 15, 12, 5, 4, 7
    x = torch.randn(2, H * W, 8)
    _, state = token_clustering(x, (H, W), (h, w), temperature=0.2, window=3)
    # cluster tokens = identity rows, so each output token *is* its weight row W[t, :]
    eye = torch.eye(h * w).expand(2, -1, -1)
    rows = token_reconstruction(eye, state, k=k, temperature=0.3)
    torch.testing.assert_close(rows.norm(dim=-1), torch.ones(2, H * W))
    assert ((rows > 0).sum(-1) <= k).all() and (rows >= 0).all()
    # the weights decrease with distance: the nearest centre gets the largest weight
    d = torch.cdist(x, state.centers)
    assert torch.equal(rows.argmax(-1), d.argmin(-1))


def test_underflowing_weights_follow_the_official_formula_unless_asked():
    torch.manual_seed(6)
    H, W, h, w = 16, 16, 4, 4
    x = torch.randn(1, H * W, 32) * 1e3 + 5e3  # large magnitude, large common offset
    clusters, state = token_clustering(x, (H, W), (h, w), iters=5, temperature=1.0, window=3)
    assert torch.isfinite(clusters).all()
    # exp(-tau * D) underflows to 0 for every cluster here: the official layer then
    # normalises an all-zero row and outputs all-zero tokens -- the default, as published
    d = torch.cdist(state.tokens.float(), state.centers).pow(2)
    assert (torch.exp(-1.0 * d) == 0).all()
    rec = token_reconstruction(clusters, state, k=4, temperature=1.0)
    assert torch.isfinite(rec).all() and (rec == 0).all()
    # subtract_min_distance keeps the largest weight at 1: unit-norm rows everywhere
    stable = token_reconstruction(clusters, state, k=4, temperature=1.0, subtract_min_distance=True)
    assert torch.isfinite(stable).all() and (stable.abs().amax(-1) > 0).all()
    eye = torch.eye(h * w)[None]
    torch.testing.assert_close(
        token_reconstruction(eye, state, 4, 1.0, subtract_min_distance=True).norm(dim=-1),
        torch.ones(1, H * W))
    expect = dense_reconstruction(clusters, state.tokens, state.centers, 4, 1.0, subtract_min=True)
    torch.testing.assert_close(stable.double(), expect, atol=1e-3, rtol=1e-5)


def test_small_weights_are_scaled_by_the_normalisation_eps_as_officially():
    # all weights of a token below 1e-12 (but not 0): F.normalize divides by 1e-12, not by
    # the row norm, so the token shrinks towards 0 -- reproduced, and the oracle agrees
    x = torch.tensor([[[0.0], [0.0], [6.0], [6.0]]])
    state = ClusteringState(x, torch.tensor([[[3.0], [3.0]]]), (2, 2), (1, 2))
    values = torch.tensor([[[1.0], [1.0]]])
    out = token_reconstruction(values, state, k=2, temperature=4.0)  # D = 9, w = e^-36
    w = torch.exp(torch.tensor(-36.0))
    torch.testing.assert_close(out, torch.full((1, 4, 1), 2 * w.item() / 1e-12))
    assert (out < 1e-3).all()


def test_reconstruction_keeps_every_weight_tied_with_the_kth():
    # identical centres tie: the official mask `weight >= k-th largest` keeps all of them
    torch.manual_seed(9)
    x = torch.randn(1, 6, 3)
    centers = torch.zeros(1, 4, 3)
    centers[0, 1:] = 5.0  # clusters 1, 2, 3 identical; cluster 0 nearest to every token
    state = ClusteringState(x, centers, (2, 3), (2, 2))
    eye = torch.eye(4)[None]
    rows = token_reconstruction(eye, state, k=2, temperature=0.01)
    assert ((rows > 0).sum(-1) == 4).all()  # k = 2, but the three tied clusters all stay
    expect = dense_reconstruction(eye, x, centers, 2, 0.01)
    assert_close_f32(rows.double(), expect)


def test_gather_rows_equals_gather_over_the_expanded_index():
    """The one batched row gather (nearest reconstruction, EViT, ToMe): x[b, index[b]] bitwise,
    on a non-contiguous view, with repeated rows, and its gradient the copy counts."""
    torch.manual_seed(12)
    base = torch.randn(3, 9, 5)
    x = base[:, 1:].detach().requires_grad_()  # (3, 8, 5), a view like the grid behind a cls token
    index = torch.randint(0, 8, (3, 11))
    got = gather_rows(x, index)
    assert torch.equal(got, x.gather(1, index.unsqueeze(-1).expand(-1, -1, 5)))
    got.sum().backward()
    counts = torch.stack([torch.bincount(i, minlength=8) for i in index]).float()
    assert torch.equal(x.grad, counts.unsqueeze(-1).expand(-1, -1, 5))


def test_nearest_mode_gradient_counts_the_copies_of_each_cluster():
    """Each cluster's gradient is the sum over the tokens that copied it (batch of 3, a
    prefix token, a batch slice taken by the chunking too)."""
    torch.manual_seed(11)
    H, W, h, w = 12, 10, 4, 5
    x = torch.randn(3, 1 + H * W, 8)
    _, state = token_clustering(x, (H, W), (h, w), 3, 1.0, 3, num_prefix_tokens=1)
    for limit in (DEFAULT_MEMORY_LIMIT, 64):
        later = torch.randn(3, 1 + h * w, 6, requires_grad=True)
        out = token_reconstruction(later, state, mode="nearest", memory_limit=limit)
        out.sum().backward()
        nearest = torch.cdist(x[:, 1:].double(), state.centers.double()).argmin(-1)
        counts = torch.stack([torch.bincount(n, minlength=h * w) for n in nearest]).float()
        assert torch.equal(later.grad[:, 1:], counts.unsqueeze(-1).expand(-1, -1, 6))
        assert torch.equal(later.grad[:, :1], torch.ones(3, 1, 6))


def test_nearest_mode_copies_the_cluster_of_the_nearest_final_centre():
    torch.manual_seed(10)
    H, W, h, w = 30, 40, 16, 16
    x = torch.randn(2, 1 + H * W, 24)
    clusters, state = token_clustering(x, (H, W), (h, w), 5, 1.0, 5, num_prefix_tokens=1)
    later = torch.randn(2, 1 + h * w, 7)
    out = token_reconstruction(later, state, mode="nearest")
    # from the definition: argmin over ALL centres (no neighbourhood restriction)
    nearest = torch.cdist(x[:, 1:].double(), state.centers.double()).argmin(-1)
    for b in range(2):
        torch.testing.assert_close(out[b, 1:], later[b, 1 + nearest[b]])
    assert torch.equal(out[:, :1], later[:, :1])
    # no neighbourhood restriction: with window 1 every token was clustered within its own
    # cell only, yet copies the nearest centre wherever it lies
    _, state1 = token_clustering(x, (H, W), (h, w), 5, 1.0, 1, num_prefix_tokens=1)
    nearest1 = torch.cdist(x[:, 1:].double(), state1.centers.double()).argmin(-1)
    own = (torch.tensor(initial_cells(H, h))[:, None] * w + torch.tensor(initial_cells(W, w))[None, :]).flatten()
    assert (nearest1 != own).any()
    out1 = token_reconstruction(later, state1, mode="nearest")
    for b in range(2):
        torch.testing.assert_close(out1[b, 1:], later[b, 1 + nearest1[b]])
    with pytest.raises(ValueError, match=r"reconstruction mode must be one of .*got 'mean'"):
        token_reconstruction(later, state, mode="mean")


def test_an_empty_cluster_becomes_the_zero_vector_as_officially():
    # 4x4 tokens, 2x2 clusters, all reachable. The top-left quadrant averages to 10 while
    # every token sits at 0 or 20, exactly on another centre: with tau = 10 the top-left
    # cluster's total affinity is exactly 0 in float32, and the official update
    # 0 / clamp(0, 1e-16) makes it the zero vector (not the tokens' mean, 12.5).
    v = torch.tensor([[20, 20, 20, 20],
                      [0, 0, 20, 20],
                      [0, 0, 20, 20],
                      [0, 0, 20, 20]], dtype=torch.float32)
    x = v.reshape(1, 16, 1).repeat(1, 1, 3)
    clusters, state = token_clustering(x, (4, 4), (2, 2), iters=3, temperature=10.0, window=3)
    assert torch.equal(clusters[0, 0], torch.zeros(3))
    ref, _, _ = dense_clustering(x, (4, 4), (2, 2), 3, 10.0, 3)
    torch.testing.assert_close(clusters.double(), ref, atol=1e-5, rtol=0)
    # nearly empty (affinities ~1e-44, their sum below 1e-16): also ~0, as officially
    clusters, _ = token_clustering(x, (4, 4), (2, 2), iters=3, temperature=1.0, window=3)
    assert clusters[0, 0].abs().max() < 1e-6


def test_initial_cells_are_nearest_resizing_of_the_cell_grid():
    """Exactly what F.interpolate(mode="nearest") gives (float32 scale, special cases), for
    every grid up to 64, more cells than positions, and the published ones."""
    pairs = [(size, cells) for size in range(1, 65) for cells in range(1, size + 1)]
    pairs += [(30, 16), (40, 16), (30, 24), (40, 24), (30, 28), (40, 28), (97, 31), (256, 10)]
    pairs += [(size, cells) for size in range(1, 40) for cells in range(size + 1, 2 * size + 3)]  # upsampling
    pairs += [(22, 28), (76, 28), (22, 20), (11, 16)]  # KITTI's 22 x 76 tokens
    for size, cells in pairs:
        ref = F.interpolate(torch.arange(cells, dtype=torch.float32)[None, None, None],
                            size=(1, size), mode="nearest").flatten().tolist()
        assert initial_cells(size, cells) == [int(c) for c in ref], (size, cells)


def test_operators_trace_without_graph_breaks():
    """torch.compile sees one graph: no data-dependent Python values in the operators."""
    import torch._dynamo as dynamo

    def expedite(x):
        clusters, state = token_clustering(x, (12, 10), (6, 5), 3, 0.05, 5, num_prefix_tokens=1)
        return (token_reconstruction(clusters, state, 4, 0.05),
                token_reconstruction(clusters, state, mode="nearest"))

    explained = dynamo.explain(expedite)(torch.randn(2, 1 + 120, 16))
    assert explained.graph_break_count == 0, [str(b.reason)[:200] for b in explained.break_reasons]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_computed_in_float32(dtype, device):
    torch.manual_seed(7)
    H, W, h, w = 12, 12, 8, 8
    x = (torch.randn(2, 1 + H * W, 64) * 50).to(device)  # fp16 squared distances would overflow
    ref, ref_state = token_clustering(x, (H, W), (h, w), 5, 0.05, 7, 1)
    clusters, state = token_clustering(x.to(dtype), (H, W), (h, w), 5, 0.05, 7, 1)
    assert clusters.dtype == dtype and state.centers.dtype == torch.float32
    assert torch.isfinite(clusters).all()
    torch.testing.assert_close(clusters.float(), ref, atol=0.5, rtol=2e-2)
    rec = token_reconstruction(clusters, state, 10, 0.05)
    assert rec.dtype == dtype and torch.isfinite(rec).all()
    with torch.autocast(device_type=device, dtype=dtype):
        auto, _ = token_clustering(x, (H, W), (h, w), 5, 0.05, 7, 1)
    assert auto.dtype == torch.float32  # autocast does not leak into the operator
    torch.testing.assert_close(auto, ref, atol=1e-5, rtol=1e-5)


def test_modules_hold_settings_and_no_parameters():
    clus = TokenClustering((4, 3), iters=2, temperature=0.1, window=3)
    rec = TokenReconstruction(k=2, temperature=0.5)
    assert list(clus.parameters()) == [] and list(clus.buffers()) == []
    assert list(rec.parameters()) == [] and list(rec.buffers()) == []
    x = torch.randn(2, 10 * 6, 5)
    c, s = clus(x, (10, 6))
    torch.testing.assert_close(c, token_clustering(x, (10, 6), (4, 3), 2, 0.1, 3)[0])
    assert isinstance(s, ClusteringState)
    torch.testing.assert_close(rec(c, s), token_reconstruction(c, s, 2, 0.5))
    assert "num_clusters=(4, 3)" in repr(clus)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_clusters=0), r"num_clusters must be a positive int or a pair \[h, w\] of positive ints, got 0"),
        (dict(window=4), r"window \(lambda\) must be an odd int >= 1, got 4"),
        (dict(window=0), r"got 0"),
        (dict(window=-3), r"got -3"),
        (dict(iters=0), r"iters must be an int >= 1, got 0"),
        (dict(temperature=0.0), r"clustering temperature must be a positive finite number, got 0.0"),
        (dict(temperature=-1), r"got -1"),
        (dict(temperature=float("nan")), r"got nan"),
        (dict(grid_size=(11, 10)), r"has 120 tokens, but grid_size \(11, 10\) with num_prefix_tokens=0 needs"),
        (dict(num_prefix_tokens=1), r"has 120 tokens, but grid_size \(12, 10\) with num_prefix_tokens=1"),
        (dict(num_prefix_tokens=-1), r"num_prefix_tokens must be an int >= 0, got -1"),
    ],
)
def test_clustering_rejects_bad_input(kwargs, message):
    args = dict(tokens=torch.randn(2, 120, 4), grid_size=(12, 10), num_clusters=(4, 4))
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        token_clustering(**args)


def test_bad_tensors_are_rejected():
    with pytest.raises(ValueError, match=r"shape \(B, P \+ H\*W, C\), got \(120, 4\)"):
        token_clustering(torch.randn(120, 4), (12, 10), 4)
    with pytest.raises(TypeError, match="floating-point tensor, got torch.int64"):
        token_clustering(torch.ones(1, 120, 4, dtype=torch.long), (12, 10), 4)


def test_reconstruction_rejects_bad_input():
    x = torch.randn(2, 1 + 120, 4)
    clusters, state = token_clustering(x, (12, 10), (4, 5), num_prefix_tokens=1)
    with pytest.raises(ValueError, match=r"reconstruction k=21 exceeds the number of clusters 20 \(4x5\)"):
        token_reconstruction(clusters, state, k=21)
    with pytest.raises(ValueError, match=r"reconstruction k must be an int >= 1, got 0"):
        token_reconstruction(clusters, state, k=0)
    with pytest.raises(ValueError, match=r"reconstruction temperature must be a positive finite number, got -0.5"):
        token_reconstruction(clusters, state, k=3, temperature=-0.5)
    with pytest.raises(ValueError, match=r"clusters has 20 tokens, but grid_size \(4, 5\) with num_prefix_tokens=1 needs 1 \+ 4\*5 = 21"):
        token_reconstruction(clusters[:, 1:], state, k=3)
    with pytest.raises(ValueError, match=r"clusters \(1, 21, 4\) do not match the clustering state"):
        token_reconstruction(clusters[:1], state, k=3)
    with pytest.raises(TypeError, match="ClusteringState"):
        token_reconstruction(clusters, (state.tokens, state.centers), k=3)
    with pytest.raises(ValueError, match=r"reconstruction k must be an int >= 1, got 0"):
        TokenReconstruction(k=0)


def test_operator_defaults_agree_with_the_config_and_the_settings():
    """One set of defaults: the operators', ``MODEL.EXPEDIT``'s, the official Swin keys' and
    :class:`ExpeditSettings`' are the same numbers (the official Expedit-Mask2Former ones)."""
    import dataclasses
    import inspect

    from detectron2.config import get_cfg

    from expedit_d2.config import add_expedit_config
    from expedit_d2.methods.expedit import ExpeditSettings

    cfg = get_cfg()
    add_expedit_config(cfg)
    clus = inspect.signature(token_clustering).parameters
    rec = inspect.signature(token_reconstruction).parameters
    ops = (clus["iters"].default, clus["temperature"].default, clus["window"].default,
           rec["k"].default, rec["temperature"].default)
    assert ops == (5, 0.05, 7, 10, 0.05)
    e, s = cfg.MODEL.EXPEDIT, cfg.MODEL.SWIN
    assert (e.ITERS, e.TEMPERATURE, e.WINDOW, e.RECON_K, e.RECON_TEMPERATURE) == ops
    c, r = s.TOKEN_CLUSTERING_BLOCK, s.TOKEN_RECONSTRUCTION_BLOCK
    assert (c.N_ITERS, c.TEMPERATURE, c.WINDOW_SIZE, r.K, r.TEMPERATURE) == ops
    fields = {f.name: f.default for f in dataclasses.fields(ExpeditSettings)}
    assert tuple(fields[n] for n in ("iters", "temperature", "window", "recon_k", "recon_temperature")) == ops
    module_c, module_r = TokenClustering((2, 2)), TokenReconstruction()
    assert (module_c.iters, module_c.temperature, module_c.window, module_r.k, module_r.temperature) == ops
