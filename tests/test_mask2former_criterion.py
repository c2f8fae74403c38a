"""Hungarian matcher and set criterion of Mask2Former."""
import torch

from mask2former.modeling.criterion import (
    HungarianMatcher,
    SetCriterion,
    dice_loss,
    pairwise_dice,
    pairwise_sigmoid_ce,
    sigmoid_ce_loss,
)


def _scene(perm, K=4, H=16, W=16):
    """Targets with T distinct masks; predictions that are those masks, queries permuted."""
    T = len(perm)
    masks = torch.zeros(T, H, W)
    for t in range(T):
        masks[t, :, t * (W // T):(t + 1) * (W // T)] = 1
    labels = torch.arange(T) % K
    Q = T + 2
    pred_masks = torch.full((1, Q, H, W), -10.0)
    logits = torch.zeros(1, Q, K + 1)
    logits[0, :, K] = 5.0  # extra queries: no object
    for t, q in enumerate(perm):
        pred_masks[0, q] = masks[t] * 20 - 10
        logits[0, q, K] = 0.0
        logits[0, q, labels[t]] = 10.0
    return {"pred_logits": logits, "pred_masks": pred_masks}, [{"labels": labels, "masks": masks}]


def test_matcher_recovers_the_permutation():
    torch.manual_seed(0)
    perm = [3, 0, 2, 1]
    outputs, targets = _scene(perm)
    (q, t), = HungarianMatcher(num_points=256)(outputs, targets)
    assert dict(zip(t.tolist(), q.tolist())) == dict(enumerate(perm))


def test_pairwise_costs_equal_the_per_pair_losses():
    torch.manual_seed(1)
    logits, targets = torch.randn(3, 50), (torch.rand(4, 50) > 0.5).float()
    dice, ce = pairwise_dice(logits, targets), pairwise_sigmoid_ce(logits, targets)
    for i in range(3):
        for j in range(4):
            torch.testing.assert_close(dice[i, j], dice_loss(logits[i:i + 1], targets[j:j + 1], 1.0))
            torch.testing.assert_close(ce[i, j], sigmoid_ce_loss(logits[i:i + 1], targets[j:j + 1], 1.0))


def _criterion(K=4, importance_sample_ratio=0.75):
    weights = {"loss_ce": 2.0, "loss_mask": 5.0, "loss_dice": 5.0}
    return SetCriterion(K, HungarianMatcher(num_points=256), weights, eos_coef=0.1, num_points=256,
                        importance_sample_ratio=importance_sample_ratio)


def test_losses_are_small_for_perfect_predictions_and_weighted():
    torch.manual_seed(2)
    # uniform points: importance sampling would put most points on the mask boundaries,
    # where even a perfect prediction is interpolated to ~0.5
    crit = _criterion(importance_sample_ratio=0.0)
    assert torch.equal(crit.empty_weight, torch.tensor([1, 1, 1, 1, 0.1]))
    good, targets = _scene([1, 0, 3, 2], H=64, W=64)
    bad = {"pred_logits": torch.randn_like(good["pred_logits"]), "pred_masks": torch.randn_like(good["pred_masks"])}
    good["aux_outputs"] = [dict(good)]
    lg, lb = crit(good, targets), crit(bad, targets)
    assert set(lg) == {"loss_ce", "loss_mask", "loss_dice", "loss_ce_0", "loss_mask_0", "loss_dice_0"}
    assert lg["loss_ce"] < 0.01 < lb["loss_ce"]
    assert lg["loss_mask"] < 0.2 * lb["loss_mask"] and lg["loss_dice"] < 0.2 * lb["loss_dice"]
    torch.testing.assert_close(lg["loss_ce_0"], lg["loss_ce"])  # the aux output is the same
    assert all(torch.isfinite(v) for v in lb.values())


def test_gradients_flow_and_empty_targets_are_fine():
    torch.manual_seed(3)
    crit = _criterion()
    _, targets = _scene([0, 1])
    out = {"pred_logits": torch.randn(1, 4, 5, requires_grad=True),
           "pred_masks": torch.randn(1, 4, 16, 16, requires_grad=True)}
    sum(crit(out, targets).values()).backward()
    assert torch.isfinite(out["pred_masks"].grad).all() and out["pred_masks"].grad.abs().sum() > 0
    empty = [{"labels": torch.zeros(0, dtype=torch.long), "masks": torch.zeros(0, 16, 16)}]
    losses = crit({"pred_logits": torch.randn(1, 4, 5), "pred_masks": torch.randn(1, 4, 16, 16)}, empty)
    assert losses["loss_mask"] == 0 and torch.isfinite(losses["loss_ce"])
