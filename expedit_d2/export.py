"""ONNX export of expedited backbones and of DPT's whole image-to-depth network.

* :class:`OrderedOutputs` -- a Detectron2 backbone (dict of maps) as a module returning a
  tuple of maps in a fixed key order (ONNX graphs have positional outputs);
* :class:`ImageToDepth` -- ``DPTDepth`` from a (B, 3, H, W) image in the model's input
  format (pixel values, ``INPUT.FORMAT``) to the depth map (B, H, W): the model's own
  normalisation (``PIXEL_MEAN`` / ``PIXEL_STD``), ``forward_raw`` and ``to_depth``; the fixed
  input size must already be a multiple of the backbone's ``size_divisibility`` (no padding,
  no resizing of the output);
* :func:`build_export_pair` -- the (base, reduced) modules of a config on the same weights;
* :func:`export_onnx` -- PyTorch's dynamo exporter (``torch.onnx.export(dynamo=True)``,
  opset 18) for one fixed input: the clustering iterations unroll into graph ops, top-k and
  arg-min become ONNX ``TopK`` / ``ArgMin``; the file is written atomically;
* :func:`onnx_parity` -- the largest difference of onnxruntime's outputs from PyTorch eager's,
  relative to each output's largest absolute value;
* :func:`onnx_latency` -- onnxruntime vs eager latency of base and reduced, interleaved.

``onnx``, ``onnxruntime`` and ``onnxscript`` are the optional extra ``pip install -e .[onnx]``.

What does not export: a whole Detectron2 meta-architecture other than DPT (e.g. Mask2Former:
its inference takes a list of dicts of images of any size, pads them to a batch, and its
semantic/panoptic/instance post-processing builds per-image results of data-dependent size);
export its backbone (``--what backbone``) instead. :func:`check_exportable_model` refuses it by
name.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from .fileio import atomic_write

__all__ = ["OPSET", "OrderedOutputs", "ImageToDepth", "check_exportable_model", "build_export_pair",
           "export_onnx", "onnx_session", "onnx_parity", "onnx_latency", "require_onnx"]

logger = logging.getLogger(__name__)

#: the ONNX opset the exporter writes (the issue asks for >= 17; the dynamo exporter's own is 18)
OPSET = 18


def require_onnx() -> None:
    """Import onnx, onnxruntime and onnxscript, or raise naming the optional extra."""
    missing = []
    for name in ("onnx", "onnxruntime", "onnxscript"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ImportError(f"ONNX export needs {', '.join(missing)}: install the optional extra "
                          "with `pip install -e .[onnx]` (tools/install.sh does)")


class OrderedOutputs(nn.Module):
    """A backbone's ``{name: map}`` as a tuple in ``names`` order (default: its
    ``output_shape()`` order)."""

    def __init__(self, backbone: nn.Module, names=None):
        super().__init__()
        self.backbone = backbone
        self.names = tuple(names or backbone.output_shape())

    def forward(self, image: torch.Tensor):
        out = self.backbone(image)
        return tuple(out[name] for name in self.names)


class ImageToDepth(nn.Module):
    """``DPTDepth`` as one tensor function: image (B, 3, H, W) in the model's input format
    -> depth (B, H, W), H and W multiples of the backbone's ``size_divisibility``."""

    names = ("depth",)

    def __init__(self, model: nn.Module):
        super().__init__()
        check_exportable_model(model)
        self.model = model

    def forward(self, image: torch.Tensor):
        m = self.model
        div = m.backbone.size_divisibility
        if div and (image.shape[-2] % div or image.shape[-1] % div):
            raise ValueError(f"--input-size {image.shape[-2]} {image.shape[-1]}: the exported DPT takes "
                             f"sizes that are multiples of its backbone's size_divisibility ({div}); "
                             "the model's own padding is not part of the graph")
        x = (image - m.pixel_mean) / m.pixel_std
        return (m.to_depth(m.forward_raw(x)),)


def check_exportable_model(model: nn.Module) -> None:
    """Refuse, by name, a meta-architecture whose whole network does not export (anything
    but DPT's ``DPTDepth``: e.g. Mask2Former's post-processing)."""
    if not (hasattr(model, "forward_raw") and hasattr(model, "to_depth")):
        raise ValueError(
            f"cannot export the whole {type(model).__name__} model: only DPT's image-to-depth network "
            "(DPTDepth) exports whole; a Detectron2 meta-architecture such as Mask2Former takes a list of "
            "dicts of images of any size and its post-processing (semantic/panoptic/instance results of "
            "data-dependent size) is not a fixed-size graph. Export its backbone with --what backbone")


def build_export_pair(config_file, opts=(), what: str = "backbone", allow_partial: bool = False):
    """(base, reduced) eval modules of ``config_file`` + ``opts`` on the same weights, each
    wrapped for export: ``what="backbone"`` the backbone (:class:`OrderedOutputs`),
    ``what="model"`` the whole DPT network (:class:`ImageToDepth`). Returns (base, reduced, cfg)."""
    from .benchmark.backbone import _with, build_pair
    from .engine import config_from_file
    from .reduction.config import METHOD_KEY, point_overrides

    if what not in ("backbone", "model"):
        raise ValueError(f"what must be 'backbone' or 'model', got {what!r}")
    cfg, project = config_from_file(config_file, opts=list(opts))
    if what == "backbone":
        from detectron2.checkpoint import DetectionCheckpointer

        checkpointer = DetectionCheckpointer if project is None else project.Checkpointer
        base, reduced = build_pair(cfg, allow_partial, checkpointer)
        return OrderedOutputs(base), OrderedOutputs(reduced), cfg
    if project is None:
        raise ValueError(f"--what model: {config_file} is in no project (no train_net.py above it); "
                         "only a project's DPT model exports whole")
    from .sweep.measure import load_model

    base_cfg = _with(cfg, point_overrides(cfg, {}, baseline=True))
    red_cfg = _with(cfg, point_overrides(cfg, {METHOD_KEY: cfg.MODEL.TOKEN_REDUCTION.METHOD}))
    models = []
    for c in (base_cfg, red_cfg):
        torch.manual_seed(0)
        model = load_model(project, c, allow_partial) if c.MODEL.WEIGHTS else project.Trainer.build_model(c)
        check_exportable_model(model)
        if models:  # the same weights as the base
            model.load_state_dict(models[0].state_dict())
        models.append(model.eval())
    return ImageToDepth(models[0]), ImageToDepth(models[1]), cfg


def _sort_stable(self, stable=None, dim: int = -1, descending: bool = False):
    """``aten.sort.stable`` as ONNX ``TopK`` over the whole axis (no exporter translation
    exists; Swin's window padding sorts a constant mask with it): ONNX's TopK breaks ties by
    the lower index first, which is a stable sort. Compared as int64 (onnxruntime's TopK
    takes no uint8/bool)."""
    from onnx import TensorProto
    from onnxscript import opset18 as op

    n = op.Reshape(op.Gather(op.Shape(self), op.Constant(value_int=dim)), op.Constant(value_ints=[1]))
    values, indices = op.TopK(op.Cast(self, to=TensorProto.INT64), n, axis=dim, largest=int(bool(descending)),
                              sorted=1)
    return op.CastLike(values, self), indices


def export_onnx(module: nn.Module, example: torch.Tensor, path, opset: int = OPSET) -> Path:
    """Export ``module`` (eval mode) for the fixed input ``example`` to ``path`` (one file,
    weights inside), written under a temporary name and renamed."""
    require_onnx()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = module.eval()

    def write(tmp: Path):
        with torch.no_grad():
            program = torch.onnx.export(module, (example,), dynamo=True, opset_version=opset,
                                        input_names=["image"], output_names=list(module.names),
                                        external_data=False, verbose=False,
                                        custom_translation_table={torch.ops.aten.sort.stable: _sort_stable})
        program.save(str(tmp), external_data=False)

    atomic_write(path, write)
    logger.info("wrote %s", path)
    return path


def onnx_session(path, threads: int | None = None):
    """An onnxruntime CPU session of ``path`` (``threads``: its intra-op thread count)."""
    require_onnx()
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _run(session, example: torch.Tensor):
    return session.run(None, {session.get_inputs()[0].name: example.detach().cpu().numpy()})


def onnx_parity(session, module: nn.Module, example: torch.Tensor) -> dict[str, float]:
    """{output name: max |onnxruntime - eager| / max |eager|} for ``example``."""
    with torch.no_grad():
        expected = module(example)
    got = _run(session, example)
    if len(got) != len(expected):
        raise ValueError(f"the ONNX graph has {len(got)} outputs, the module {len(expected)}")
    out = {}
    for name, g, e in zip(module.names, got, expected):
        e = e.detach().cpu().double()
        g = torch.from_numpy(g).double()
        if g.shape != e.shape:
            raise ValueError(f"output {name}: onnxruntime shape {tuple(g.shape)}, PyTorch {tuple(e.shape)}")
        out[name] = float((g - e).abs().max() / e.abs().max().clamp_min(1e-30))
    return out


def onnx_latency(runners: dict[str, tuple[nn.Module, object]], example: torch.Tensor, repeats: int,
                 warmup: int) -> dict[str, list[float]]:
    """Seconds per round of each ``{variant: (module, session)}``, eager and onnxruntime,
    all interleaved in one loop (:func:`expedit_d2.measure.interleaved_samples`); keys are
    ``"<variant> eager"`` and ``"<variant> onnxruntime"``."""
    from .measure import interleaved_samples

    fns = {}
    for variant, (module, session) in runners.items():
        def eager(m=module):
            with torch.inference_mode():
                m(example)
        fns[f"{variant} eager"] = eager
        fns[f"{variant} onnxruntime"] = lambda s=session: _run(s, example)
    return interleaved_samples(fns, example.device, repeats, warmup)
