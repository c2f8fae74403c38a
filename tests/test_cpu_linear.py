"""MODEL.CPU_LINEAR: nn.Linear as a oneDNN 1x1 convolution in CPU float32 inference."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dpt import DPTDepth
from mask2former import MaskFormer
from expedit_d2.cpu_linear import OneDNNLinear, linear_as_conv, use_cpu_linear
from tests.compile_check import compiled_in_inference


@pytest.mark.parametrize("x_shape, out, bias", [((5, 7), 3, False), ((2, 9, 16), 24, True), ((16,), 8, True),
                                                ((1, 300, 64), 256, True)])
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_conv_route_equals_linear_up_to_rounding(x_shape, out, bias, mode):
    torch.manual_seed(0)
    x = torch.randn(x_shape)
    layer = nn.Linear(x_shape[-1], out, bias=bias)
    with torch.no_grad() if mode == "no_grad" else torch.inference_mode():
        ours, theirs = linear_as_conv(x, layer.weight, layer.bias), F.linear(x, layer.weight, layer.bias)
        exact = F.linear(x.double(), layer.weight.double(), None if layer.bias is None else layer.bias.double())
    assert ours.shape == theirs.shape == (*x_shape[:-1], out) and ours.dtype == torch.float32
    assert ours.is_contiguous()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    # as close to the float64 product as the BLAS result is (rounding, not another formula),
    # give or take 16 float32 ulps of the output's scale (where BLAS is nearly exact)
    floor = 16 * torch.finfo(torch.float32).eps * exact.abs().max()
    assert (ours.double() - exact).abs().max() <= 4 * (theirs.double() - exact).abs().max() + floor


def _fallback(case):
    """(layer, the (x, weight, bias) arguments, the context) of one case outside the route."""
    torch.manual_seed(0)
    layer = nn.Linear(8, 4)
    x, w, b = torch.randn(3, 6, 8), layer.weight, layer.bias
    args, context = {
        "autograd": ((x, w, b), torch.enable_grad),
        "float64": ((x.double(), w.double(), b.double()), torch.no_grad),
        "bfloat16": ((x.bfloat16(), w.bfloat16(), b.bfloat16()), torch.no_grad),
        "non-contiguous": ((x.transpose(0, 1), w, b), torch.no_grad),
        "empty": ((x[:0], w, b), torch.no_grad),
        "autocast": ((x, w, b), lambda: torch.autocast("cpu", dtype=torch.bfloat16)),
    }[case]
    return layer, args, context


@pytest.mark.parametrize("case", ["autograd", "float64", "bfloat16", "non-contiguous", "empty", "autocast"])
def test_outside_cpu_float32_inference_it_is_f_linear_exactly(case):
    """Training, other dtypes, autocast, strided or empty input: F.linear itself, bitwise
    (and with autograd, its gradients)."""
    layer, args, context = _fallback(case)
    with context():
        ours, theirs = linear_as_conv(*args), F.linear(*args)
    assert ours.dtype == theirs.dtype and torch.equal(ours, theirs)
    if case == "autograd":
        assert ours.requires_grad
        (g,) = torch.autograd.grad(ours.sum(), layer.weight)
        (h,) = torch.autograd.grad(theirs.sum(), layer.weight)
        assert torch.equal(g, h)


def test_without_onednn_it_is_f_linear_exactly(monkeypatch):
    torch.manual_seed(0)
    layer, x = nn.Linear(8, 4), torch.randn(5, 8)
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    with torch.no_grad():
        assert torch.equal(linear_as_conv(x, layer.weight, layer.bias), F.linear(x, layer.weight, layer.bias))


def test_use_cpu_linear_swaps_plain_linears_and_back_without_touching_parameters():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8), nn.MultiheadAttention(8, 2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 8)
    with torch.no_grad():
        plain = model[:3](x)
        assert use_cpu_linear(model, "onednn") == 2  # MHA's out_proj is a Linear subclass: left alone
        assert [type(m) for m in model[:3]] == [OneDNNLinear, nn.GELU, OneDNNLinear]
        assert type(model[3].out_proj) is not OneDNNLinear
        assert use_cpu_linear(model, "onednn") == 0  # idempotent
        fast = model[:3](x)
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], v) for k, v in before.items())
    assert use_cpu_linear(model, "blas") == 2 and type(model[0]) is nn.Linear
    with torch.no_grad():
        assert torch.equal(model[:3](x), plain)


def test_bad_mode_names_the_config_key(tiny_m2f_cfg):
    with pytest.raises(ValueError, match=r"MODEL\.CPU_LINEAR.*'mkl'"):
        use_cpu_linear(nn.Linear(2, 2), "mkl")
    cfg = tiny_m2f_cfg("expedit_test_cpu_linear_bad")
    cfg.MODEL.CPU_LINEAR = "mkl"
    with pytest.raises(ValueError, match=r"MODEL\.CPU_LINEAR"):
        MaskFormer(**MaskFormer.from_config(cfg))


def _pair(cls, cfg):
    """The model built with MODEL.CPU_LINEAR blas and onednn, on the same weights."""
    torch.manual_seed(0)
    blas = cls(**cls.from_config(cfg)).eval()
    cfg = cfg.clone()
    cfg.MODEL.CPU_LINEAR = "onednn"
    fast = cls(**cls.from_config(cfg)).eval()
    fast.load_state_dict(blas.state_dict())  # strict: the same names and shapes
    return blas, fast


def test_mask2former_by_config_runs_its_linears_through_onednn(tiny_m2f_cfg):
    cfg = tiny_m2f_cfg("expedit_test_cpu_linear_m2f")
    blas, fast = _pair(MaskFormer, cfg)
    assert not any(isinstance(m, OneDNNLinear) for m in blas.modules())
    n = sum(isinstance(m, OneDNNLinear) for m in fast.modules())
    assert n == sum(type(m) is nn.Linear for m in blas.modules()) > 10
    batch = [{"image": torch.rand(3, 64, 96) * 255, "height": 64, "width": 96}]
    x = torch.randn(1, 3, 64, 96)
    with torch.inference_mode():
        a, b = (m.sem_seg_head(m.backbone(x)) for m in (blas, fast))
        (ra,), (rb,) = blas(batch), fast(batch)
    for key in ("pred_logits", "pred_masks"):
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(rb["sem_seg"], ra["sem_seg"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backbone", ["D2ViTHybrid", "ExpeditBackbone"])
def test_dpt_by_config_runs_its_linears_through_onednn_and_compiles(backbone, dpt_cfg):
    cfg = dpt_cfg()
    cfg.MODEL.BACKBONE.NAME = backbone
    blas, fast = _pair(DPTDepth, cfg)
    assert sum(isinstance(m, OneDNNLinear) for m in fast.modules()) > 10
    x = torch.randn(1, 3, 96, 128)
    with torch.inference_mode():
        a, b = blas.forward_raw(x), fast.forward_raw(x)
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    # under torch.compile the layers are F.linear again (the compiler picks its kernels): one graph
    eager, ours, again, frames = compiled_in_inference(fast.forward_raw, x)
    assert frames == 1 and torch.equal(eager, b)
    torch.testing.assert_close(ours, a, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(again, ours, rtol=0, atol=0)
