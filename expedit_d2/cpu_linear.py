"""Linear layers through oneDNN on a CPU: ``MODEL.CPU_LINEAR``.

PyTorch runs a float32 ``nn.Linear`` on a CPU as a BLAS matrix product (MKL in the x86
wheels), and runs a convolution through oneDNN. MKL picks its kernels by CPU vendor: on AMD
processors with AVX-512 (Zen 4 and later) it stays on its AVX2 kernels, while oneDNN uses
AVX-512. There a linear layer computed as a 1x1 convolution on channels-last memory, which
is the same (tokens, in) x (in, out) product, runs about twice as fast (2 threads of an
AVX-512 AMD EPYC: 83-93 against 172-200 GMAC/s for the products of Swin-L, its pixel decoder
and ViT-L; on another EPYC, a Zen 4, 76-96 against 85-105: the gain depends on the chip;
docs/cpu.md).

``MODEL.CPU_LINEAR``:

* ``"blas"`` (default): ``F.linear``, what PyTorch does.
* ``"onednn"``: every ``nn.Linear`` of the model becomes an :class:`OneDNNLinear`, which in
  CPU float32 inference without autograd computes the product as a 1x1 convolution. The
  result differs from ``F.linear`` by float rounding only (another summation order); the
  parameters, their names and the checkpoints are unchanged. Elsewhere (a GPU, training,
  another dtype, autocast, ``torch.compile``, which picks its own kernels, a PyTorch build
  without oneDNN) it is ``F.linear`` exactly.

Layers that call ``F.linear`` on a weight themselves (``nn.MultiheadAttention``'s input
projection) keep the BLAS product.

Shapes: x (..., in) -> (..., out), weight (out, in), bias (out,) or None.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CPU_LINEAR_MODES", "OneDNNLinear", "linear_as_conv", "use_cpu_linear"]

#: MODEL.CPU_LINEAR values.
CPU_LINEAR_MODES = ("blas", "onednn")


def _conv_applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """CPU with oneDNN, float32, no autograd, no autocast, not under torch.compile,
    contiguous and not empty: where :func:`linear_as_conv` computes a 1x1 convolution."""
    if torch.compiler.is_compiling():  # first: the compiler may not trace the checks below
        return False
    if not torch.backends.mkldnn.is_available():  # a build without oneDNN: its convs are slower
        return False
    if any(t is not None and (t.device.type != "cpu" or t.dtype != torch.float32) for t in (x, weight, bias)):
        return False
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        return False
    if torch.is_autocast_enabled("cpu"):
        return False
    return x.dim() >= 1 and x.numel() > 0 and x.is_contiguous() and weight.is_contiguous()


def linear_as_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; where :func:`_conv_applies`, computed as a 1x1
    convolution over the tokens viewed as a channels-last (1, in, 1, tokens) image, whose
    channels-last (1, out, 1, tokens) output is the (tokens, out) result in place (views
    only, no copy either side)."""
    if not _conv_applies(x, weight, bias):
        return F.linear(x, weight, bias)
    k = x.shape[-1]
    rows = x.numel() // k
    image = x.view(1, 1, rows, k).permute(0, 3, 1, 2)  # (1, in, 1, rows), channels-last
    y = F.conv2d(image, weight.view(weight.shape[0], k, 1, 1), bias)
    return y.permute(0, 2, 3, 1).reshape(*x.shape[:-1], weight.shape[0])


class OneDNNLinear(nn.Linear):
    """``nn.Linear`` computed by :func:`linear_as_conv` (same parameters and names)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_as_conv(x, self.weight, self.bias)


def use_cpu_linear(model: nn.Module, mode: str = "onednn") -> int:
    """Make every plain ``nn.Linear`` of ``model`` an :class:`OneDNNLinear` (``"onednn"``),
    or every :class:`OneDNNLinear` a plain ``nn.Linear`` again (``"blas"``), in place; no
    parameter is touched. Returns how many layers changed. Subclasses of ``nn.Linear``
    other than :class:`OneDNNLinear` are left as they are (they may compute otherwise)."""
    if mode not in CPU_LINEAR_MODES:
        raise ValueError(f"MODEL.CPU_LINEAR must be one of {CPU_LINEAR_MODES}, got {mode!r}")
    source, target = (nn.Linear, OneDNNLinear) if mode == "onednn" else (OneDNNLinear, nn.Linear)
    changed = 0
    for module in model.modules():
        if type(module) is source:
            module.__class__ = target
            changed += 1
    return changed
