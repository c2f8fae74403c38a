"""expedit_d2.blocked: CPU inference in blocks of rows."""
import torch
from torch import nn

from expedit_d2.blocked import map_rows, runs_in_blocks
from tests.numerics import assert_close_f32


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8)).eval()


def test_blocks_cover_every_row_once_and_equal_one_call():
    mlp, seen = _mlp(), []
    x = torch.randn(3, 7, 8)
    fn = lambda t: seen.append(t.shape) or mlp(t)  # noqa: E731
    with torch.no_grad():
        one = mlp(x)
        out = map_rows(fn, x, 5, mlp)
    assert [s[0] for s in seen] == [5, 5, 5, 5, 1] and all(s[1] == 8 for s in seen)
    assert out.shape == (3, 7, 8)
    assert_close_f32(out, one)


def test_residual_sums_go_into_the_callers_tensor():
    mlp = _mlp()
    x = torch.randn(4, 6, 8)
    with torch.no_grad():
        expect = x + mlp(x)
        y = x.clone()
        out = map_rows(mlp, y, 5, mlp, residual=True)
    assert out.data_ptr() == y.data_ptr()
    assert_close_f32(out, expect)


def test_one_call_when_training_recording_or_small():
    mlp, x = _mlp(), torch.randn(20, 8)
    with torch.no_grad():
        assert runs_in_blocks(x, mlp, 20, 5)
        assert not runs_in_blocks(x, mlp, 5, 5)  # one block's worth
        assert not runs_in_blocks(x, mlp.train(), 20, 5)  # drop path would see rows as samples
    mlp.eval()
    assert not runs_in_blocks(x, mlp, 20, 5)  # autograd on: parameters require grad
    calls = []
    out = map_rows(lambda t: calls.append(t) or mlp(t), x, 5, mlp, residual=True)
    assert len(calls) == 1 and out.requires_grad
    out.sum().backward()
    assert mlp[1].weight.grad is not None
