"""FLOP counting (fvcore) that sees the whole method.

fvcore counts one multiply-add as one "flop" and knows matmuls, convolutions, norms and
pooling. Out of the box it skips ``aten::scaled_dot_product_attention`` (the fused
attention our backbones use) and ``aten::baddbmm`` (the distance matmul of the
clustering/reconstruction operators), which would make both the baseline and the
expedited model look cheaper than they are. :data:`EXTRA_HANDLES` counts them.
Elementwise work (softmax, exp, masking) is not counted, as in fvcore's convention.

Units: what fvcore counts are multiply-adds, so expedit-d2 reports them as **GMACs**. The
papers differ: Mask2Former (and Detectron2's tools) publish fvcore's count under the name
"GFLOPs" (the Swin-L backbone's 937), while the DPT figures count two flops per multiply-add
(DPT-Hybrid's 560.2 GFLOPs is about 2 x 280 GMACs). :data:`FLOPS_PER_MAC` converts.
"""
from __future__ import annotations

from functools import reduce
from operator import mul

import torch
from fvcore.nn import FlopCountAnalysis
from fvcore.nn.jit_handles import get_shape

from .inputs import model_inputs

__all__ = ["EXTRA_HANDLES", "FLOPS_PER_MAC", "backbone_flops", "model_flops", "gmacs"]

#: GFLOPs = FLOPS_PER_MAC x GMACs in the two-flops-per-multiply-add convention.
FLOPS_PER_MAC = 2


def _numel(shape) -> int:
    return reduce(mul, shape, 1)


def sdpa_flop_jit(inputs, outputs) -> int:
    """q (..., L, E), k (..., S, E), v (..., S, Ev): QK^T is L*S*E and AV is L*S*Ev per batch."""
    q, k, v = (get_shape(inputs[i]) for i in range(3))
    batch = _numel(q[:-2])
    return batch * q[-2] * k[-2] * (q[-1] + v[-1])


def baddbmm_flop_jit(inputs, outputs) -> int:
    """baddbmm(input, b1 (B, n, k), b2 (B, k, m)): B*n*k*m multiply-adds."""
    b1, b2 = get_shape(inputs[1]), get_shape(inputs[2])
    return b1[0] * b1[1] * b1[2] * b2[2]


def embedding_bag_flop_jit(inputs, outputs) -> int:
    """embedding_bag(weight (R, D), indices (B, n), ..., per_sample_weights): a weighted sum
    of B*n rows, B*n*D multiply-adds (Mask2Former's deformable attention: the same count as
    fvcore gives grid_sample's four bilinear taps)."""
    return _numel(get_shape(inputs[1])) * get_shape(inputs[0])[1]


def mm_flop_jit(inputs, outputs) -> int:
    """mm(a (n, k), b (k, m)) or mm(a, b, out=...): n*k*m multiply-adds (fvcore's own
    handle rejects the out= form, which Mask2Former's semantic inference uses)."""
    a, b = get_shape(inputs[0]), get_shape(inputs[1])
    return a[0] * a[1] * b[1]


EXTRA_HANDLES = {
    "aten::mm": mm_flop_jit,
    "aten::embedding_bag": embedding_bag_flop_jit,
    "aten::scaled_dot_product_attention": sdpa_flop_jit,
    "aten::baddbmm": baddbmm_flop_jit,
    "aten::baddbmm_": baddbmm_flop_jit,
}

# Ops that are pure data movement or elementwise: silence fvcore's "unsupported" warnings.
_IGNORED = [
    "aten::topk", "aten::scatter_", "aten::scatter", "aten::softmax", "aten::exp",
    "aten::masked_fill_", "aten::clamp_min_", "aten::clamp_min", "aten::norm",
    "aten::linalg_vector_norm", "aten::gelu", "aten::roll", "aten::pad", "aten::constant_pad_nd",
    "aten::add", "aten::add_", "aten::sub", "aten::mul", "aten::mul_", "aten::div", "aten::sum",
    "aten::mean", "aten::repeat", "aten::repeat_interleave", "aten::abs", "aten::le", "aten::ge",
    "aten::__and__", "aten::bitwise_not", "aten::fill_", "aten::zero_", "aten::index",
    "aten::rsub", "aten::remainder", "aten::floor_divide", "aten::eq", "aten::ne", "aten::where",
    "aten::dropout", "aten::bernoulli_", "aten::max_pool2d", "aten::sigmoid", "aten::relu",
    "aten::relu_", "aten::expand_as", "aten::masked_fill", "aten::zeros_like", "aten::new_zeros",
    "aten::div_", "aten::sub_", "aten::upsample_bicubic2d", "aten::lt", "aten::gt", "aten::neg",
    "aten::meshgrid", "aten::stack", "aten::arange", "aten::minimum", "aten::cumsum", "aten::ones_like",
    # SAM's image encoder: its neck's LayerNorm2d, the resizing of its relative-position tables
    # (windows of another size), the clustering's distance offset
    "aten::pow", "aten::sqrt", "aten::upsample_linear1d", "aten::amin",
]


def _configure(analysis):
    analysis.set_op_handle(**EXTRA_HANDLES)
    analysis.set_op_handle(**{name: None for name in _IGNORED})
    analysis.unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    return analysis


def backbone_flops(backbone: torch.nn.Module, image: torch.Tensor) -> FlopCountAnalysis:
    """fvcore analysis of a Detectron2 backbone on one (N, 3, H, W) image tensor."""
    return _configure(FlopCountAnalysis(backbone, (image,)))


def model_flops(model: torch.nn.Module, inputs: list) -> FlopCountAnalysis:
    """fvcore analysis of a whole Detectron2 model on its list-of-dict inputs."""
    from detectron2.utils.analysis import FlopCountAnalysis as D2FlopCountAnalysis

    return _configure(D2FlopCountAnalysis(model, inputs))


def gmacs(model: torch.nn.Module, image: torch.Tensor, whole_model: bool = True,
          frames: int | None = None) -> dict[str, float]:
    """Backbone and whole-model GMACs (fvcore multiply-adds / 1e9) of a Detectron2 model on
    one (C, H, W) image, or on a clip of ``frames`` copies of it for a video model (input
    ``{"image": [frame] * frames}``, e.g. ``VideoMaskFormer``).

    The backbone sees the image as the model preprocesses it (normalised, padded to the
    size divisibility) when the model has ``preprocess_image``; a clip's frames go through it
    as one batch. Returns ``backbone``, ``model`` (when ``whole_model``) and ``padded`` (the
    backbone input's H, W); for a clip these are per clip, with ``frames`` and the per-frame
    ``backbone_per_frame`` (and ``model_per_frame``) beside them."""
    if frames is not None and (isinstance(frames, bool) or not isinstance(frames, int) or frames < 1):
        raise ValueError(f"frames must be an int >= 1 (a clip's length), got {frames!r}")
    with torch.inference_mode():
        if hasattr(model, "preprocess_image"):
            x = model.preprocess_image([{"image": image}]).tensor
        else:
            x = image[None]
        if frames is not None:
            x = x.expand(frames, *x.shape[1:])
        out = {"backbone": backbone_flops(model.backbone, x).total() / 1e9, "padded": tuple(x.shape[-2:])}
        if whole_model:
            out["model"] = model_flops(model, model_inputs(image, frames)).total() / 1e9
    if frames is not None:
        out["frames"] = frames
        for key in ("backbone", "model"):
            if key in out:
                out[f"{key}_per_frame"] = out[key] / frames
    return out
