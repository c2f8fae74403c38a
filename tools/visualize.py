#!/usr/bin/env python
"""Pictures of what a token-reduction setting does: its token groups, and the predictions with
and without it (Detectron2 style).

    python tools/visualize.py --config-file projects/DPT/configs/demo/tiny_vit_nyuv2.yaml \\
        --input scene.png --output pictures/ MODEL.WEIGHTS model_final.pth \\
        MODEL.EXPEDIT.CLUSTERING_LOCATION 1 MODEL.EXPEDIT.NUM_CLUSTERS "[12, 12]"
    python tools/visualize.py --config-file CONFIG --input a.jpg b.jpg --output pictures/ \\
        --point "MODEL.TOKEN_REDUCTION.METHOD=tome;MODEL.TOKEN_REDUCTION.TOME.R=120" \\
        --point "MODEL.TOKEN_REDUCTION.METHOD=pool;MODEL.TOKEN_REDUCTION.POOL.LOCATION=1;MODEL.TOKEN_REDUCTION.POOL.SIZE=[12, 12]" \\
        --opts MODEL.WEIGHTS model_final.pth

Settings are given as the sweep and the benchmarks take them: the token-reduction keys among
the config overrides (``MODEL.EXPEDIT.*``, ``MODEL.TOKEN_REDUCTION.*``, the official Expedit
Swin keys) form one setting, each ``--point KEY=VALUE[;KEY=VALUE ...]`` another; with none, the
config as given (an expedited config) is the setting. Each is compared with the un-reduced
baseline of the same config (:func:`expedit_d2.reduction.config.point_overrides`), on the
same weights: ``MODEL.WEIGHTS`` loaded into every model, or, when it is empty, the
baseline's random weights (seed 0) copied into each. Overrides go after the other arguments
or after ``--opts``, as ``KEY VALUE`` pairs.

Each image is prepared as the project's test loader prepares it (Detectron2's default test
mapper: resized to ``INPUT.MIN_SIZE_TEST`` / ``MAX_SIZE_TEST``; a project with its own test
mapper, as DPT: the image as read) and the predictions come back at the image's size. One PNG
per image and setting, ``<output>/<image name>_<setting>.png``, written atomically, four
panels side by side:

1. the image with the setting's token groups (:func:`expedit_d2.reduction.record_token_groups`):
   each token of the reduced grid coloured by its group and the groups' boundaries traced --
   expedit's clusters (per attention window on Swin), ToMe's merged tokens, EViT's fused
   tokens (one group per keep step; a kept token is its own group), pooling's cells. Tokens
   left on their own are not coloured;
2. the baseline's prediction, drawn by Detectron2's ``Visualizer`` (panoptic segments,
   instances or semantic classes, ``--task``) or, for depth, a colour map (near: bright);
3. the setting's prediction, drawn the same way (the same colours, the same depth scale);
4. the difference: for segmentation the pixels whose class differs, red over the greyed
   image, with their share; for depth ``|setting - baseline|`` as a colour map with its mean
   and largest value.

The device is the config's ``MODEL.DEVICE`` (CUDA when available, else the CPU).
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from expedit_d2.cli import HelpFormatter

__all__ = ["TASKS", "GAP", "TITLE_HEIGHT", "Picture", "split_setting", "prepare_input", "task_of", "draw_groups",
           "draw_prediction", "draw_difference", "compose", "picture_size", "visualize", "main"]

logger = logging.getLogger("expedit_d2.visualize")

#: what a model's output can be drawn as, in the order ``--task auto`` looks for it
TASKS = {"panoptic": "panoptic_seg", "instances": "instances", "semantic": "sem_seg", "depth": "depth"}
#: pixels between two panels
GAP = 6
#: height of the title strip above the panels (two lines of text)
TITLE_HEIGHT = 30
#: token groups: colour over the image; groups' boundaries
_GROUP_ALPHA = 0.5
_BOUNDARY = np.array([255, 255, 255], np.uint8)
#: a config key among the overrides: upper-case words joined by dots
_KEY = re.compile(r"^[A-Z][A-Z0-9_]*(\.[A-Z0-9_]+)+$")
#: the keys that make a token-reduction setting (besides the official Expedit Swin aliases)
_SETTING_PREFIXES = ("MODEL.EXPEDIT.", "MODEL.TOKEN_REDUCTION.")


# --------------------------------------------------------------------------------------
# settings and inputs
# --------------------------------------------------------------------------------------
def split_setting(opts: list[str]) -> tuple[list[str], dict]:
    """``KEY VALUE ...`` overrides -> (the base config's overrides, the token-reduction keys
    among them as a setting {key: value}, values read as YAML as ``--point`` reads them)."""
    from expedit_d2.reduction.config import OFFICIAL_SWIN_ALIASES
    from expedit_d2.sweep import SweepError

    if len(opts) % 2:
        raise SweepError(f"config overrides must be KEY VALUE pairs, got an odd list: {opts}")
    base, setting = [], {}
    for key, value in zip(opts[::2], opts[1::2]):
        if key.startswith(_SETTING_PREFIXES) or key in OFFICIAL_SWIN_ALIASES:
            setting[key] = yaml.safe_load(value)
        else:
            base += [key, value]
    return base, setting


def _test_mapper(project, cfg):
    """The project's test mapper when it reads an image file alone: its Trainer's
    ``build_test_mapper(cfg)``, or Detectron2's default where the Trainer keeps
    ``DefaultTrainer.build_test_loader``; None otherwise (e.g. DPT's reads the depth too)."""
    from detectron2.data import DatasetMapper
    from detectron2.engine import DefaultTrainer

    if hasattr(project.Trainer, "build_test_mapper"):
        return project.Trainer.build_test_mapper(cfg)
    own = getattr(project.Trainer.build_test_loader, "__func__", None)
    return DatasetMapper(cfg, is_train=False) if own is DefaultTrainer.build_test_loader.__func__ else None


def prepare_input(path: Path, cfg, project) -> dict:
    """The model's input for the image at ``path``, as the project's test loader makes it
    (see the module docstring): ``{"image": (C, h, w), "height": H, "width": W}``."""
    from detectron2.data import detection_utils as utils

    mapper = _test_mapper(project, cfg)
    if mapper is not None:
        return mapper({"file_name": str(path)})
    image = utils.read_image(str(path), format=cfg.INPUT.FORMAT)
    return {"image": torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1))).float(),
            "height": image.shape[0], "width": image.shape[1]}


def task_of(output: dict, task: str = "auto") -> str:
    """The task to draw: ``task``, or with ``auto`` the first of :data:`TASKS` the output has."""
    if task != "auto":
        if TASKS[task] not in output:
            raise ValueError(f"--task {task}: the model's output has no {TASKS[task]!r} (it has {sorted(output)})")
        return task
    found = next((t for t, key in TASKS.items() if key in output), None)
    if found is None:
        raise ValueError(f"nothing to draw in the model's output {sorted(output)}: expected one of "
                         f"{list(TASKS.values())}")
    return found


# --------------------------------------------------------------------------------------
# drawing: every function takes and returns (H, W, 3) uint8 RGB at the image's size
# --------------------------------------------------------------------------------------
def _palette(n: int) -> np.ndarray:
    """(n, 3) uint8: Detectron2's colour map, cycled."""
    from detectron2.utils.colormap import colormap

    colours = colormap(rgb=True, maximum=255).astype(np.uint8)
    return colours[np.arange(n) % len(colours)]


def group_map(groups, image_size: tuple[int, int], model_size: tuple[int, int]) -> np.ndarray:
    """(H, W) int: the group of the token over each pixel of the image, for image 0 of the
    pass. The token grid spans the backbone's input (``groups.input_size``, padded), whose
    top-left ``model_size`` (h, w) is the image resized as the model takes it."""
    labels = groups.labels[0].to("cpu", torch.float32)[None, None]
    padded = groups.input_size or model_size
    on_input = F.interpolate(labels, size=tuple(padded), mode="nearest")[:, :, : model_size[0], : model_size[1]]
    return F.interpolate(on_input, size=tuple(image_size), mode="nearest")[0, 0].long().numpy()


def draw_groups(rgb: np.ndarray, groups, model_size: tuple[int, int]) -> np.ndarray:
    """The image with each token group of two or more tokens coloured (Detectron2's colour
    map) and the boundaries of those groups traced; tokens on their own are left as they are."""
    H, W = rgb.shape[:2]
    pixels = group_map(groups, (H, W), model_size)
    sizes = np.bincount(groups.labels[0].reshape(-1).cpu().numpy())
    merged = sizes[pixels] >= 2  # pixels under a group of several tokens
    out = rgb.astype(np.float32)
    colour = _palette(len(sizes))[pixels].astype(np.float32)
    out[merged] = (1 - _GROUP_ALPHA) * out[merged] + _GROUP_ALPHA * colour[merged]
    out = out.round().astype(np.uint8)
    edge = np.zeros((H, W), bool)  # a pixel whose right or lower neighbour is in another group
    across = pixels[:, 1:] != pixels[:, :-1]
    down = pixels[1:] != pixels[:-1]
    edge[:, :-1] |= across & (merged[:, 1:] | merged[:, :-1])
    edge[:-1] |= down & (merged[1:] | merged[:-1])
    out[edge] = _BOUNDARY
    return out


@contextlib.contextmanager
def _fixed_numpy_rng(seed: int = 0):
    """Detectron2's ``Visualizer`` jitters instance colours with numpy's global generator:
    seeded here and given back as it was, so that both predictions get the same colours and
    the caller's random state is untouched."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def drawing_metadata(metadata):
    """Metadata the ``Visualizer`` reads names and colours from. Where the dataset numbers
    things and stuff in one contiguous space (Mask2Former's convention: predictions' category
    ids index ``stuff_classes``), every class is given as a thing too, as the official
    Mask2Former demo registers them; classes without colours get Detectron2's colour map."""
    from detectron2.data.catalog import Metadata

    names = list(metadata.get("stuff_classes", None) or metadata.get("thing_classes", None) or [])
    things = metadata.get("thing_dataset_id_to_contiguous_id", None) or {}
    stuff_ids = metadata.get("stuff_dataset_id_to_contiguous_id", None) or {}
    one_space = bool(things) and all(stuff_ids.get(k) == v for k, v in things.items())
    thing_classes = names if one_space else list(metadata.get("thing_classes", None) or [])
    colours = [tuple(int(v) for v in c) for c in _palette(max(len(names), len(thing_classes), 1))]
    return Metadata(name=f"{metadata.name} (drawn)").set(
        thing_classes=thing_classes, stuff_classes=names,
        thing_colors=list(metadata.get("thing_colors", None) or colours[: len(thing_classes)])
        if not one_space else colours[: len(names)],
        stuff_colors=list(metadata.get("stuff_colors", None) or colours[: len(names)]))


def _class_map(output: dict, task: str, score_threshold: float) -> np.ndarray:
    """(H, W) int: the class of each pixel (-1: none) in the prediction, to compare two."""
    if task == "panoptic":
        seg, segments = output["panoptic_seg"]
        seg = seg.cpu().numpy()
        out = np.full(seg.shape, -1, np.int64)
        for s in segments:
            out[seg == s["id"]] = s["category_id"]
        return out
    if task == "semantic":
        return output["sem_seg"].argmax(0).cpu().numpy()
    inst = output["instances"].to("cpu")
    keep = inst.scores >= score_threshold
    masks, classes, scores = inst.pred_masks[keep].numpy(), inst.pred_classes[keep].numpy(), inst.scores[keep]
    out = np.full(inst.image_size, -1, np.int64)
    for i in scores.argsort().numpy():  # the highest score last: it wins where masks overlap
        out[masks[i] > 0] = classes[i]
    return out


def _depth_colours(depth: np.ndarray, lo: float, hi: float, cmap: str) -> np.ndarray:
    import matplotlib

    scaled = np.clip((depth - lo) / max(hi - lo, 1e-12), 0.0, 1.0)
    return (matplotlib.colormaps[cmap](scaled)[..., :3] * 255).round().astype(np.uint8)


def depth_range(depth: np.ndarray) -> tuple[float, float]:
    """The colour scale of a depth map: its 2nd to 98th percentile (a few outliers do not
    wash out the rest)."""
    lo, hi = np.percentile(depth, [2, 98])
    return float(lo), float(max(hi, lo + 1e-6))


def draw_prediction(rgb: np.ndarray, output: dict, task: str, metadata, score_threshold: float = 0.5,
                    depth_scale: tuple[float, float] | None = None) -> np.ndarray:
    """One prediction drawn: Detectron2's ``Visualizer`` for panoptic / instances / semantic,
    a colour map of the depth (near bright, over ``depth_scale`` (lo, hi) metres)."""
    if task == "depth":
        depth = output["depth"].float().cpu().numpy()
        lo, hi = depth_scale or depth_range(depth)
        return _depth_colours(hi - depth + lo, lo, hi, "magma")  # near: bright
    from detectron2.utils.visualizer import ColorMode, Visualizer

    with _fixed_numpy_rng():
        vis = Visualizer(rgb, drawing_metadata(metadata), scale=1.0, instance_mode=ColorMode.IMAGE)
        if task == "panoptic":
            seg, segments = output["panoptic_seg"]
            drawn = vis.draw_panoptic_seg(seg.to("cpu"), segments)
        elif task == "semantic":
            drawn = vis.draw_sem_seg(output["sem_seg"].argmax(0).to("cpu"))
        else:
            inst = output["instances"].to("cpu")
            drawn = vis.draw_instance_predictions(inst[inst.scores >= score_threshold])
    return drawn.get_image()


def draw_difference(rgb: np.ndarray, base: dict, setting: dict, task: str,
                    score_threshold: float = 0.5) -> tuple[np.ndarray, str]:
    """(picture, caption) of where the two predictions differ (see the module docstring)."""
    if task == "depth":
        diff = np.abs(setting["depth"].float().cpu().numpy() - base["depth"].float().cpu().numpy())
        top = float(diff.max())
        return (_depth_colours(diff, 0.0, max(top, 1e-6), "inferno"),
                f"|difference|: mean {diff.mean():.3g}, max {top:.3g} m")
    differs = _class_map(base, task, score_threshold) != _class_map(setting, task, score_threshold)
    grey = rgb.astype(np.float32).mean(axis=2, keepdims=True).repeat(3, axis=2) * 0.6
    grey[differs] = 0.3 * grey[differs] + 0.7 * np.array([230.0, 30.0, 30.0])
    return grey.round().astype(np.uint8), f"class differs at {100.0 * differs.mean():.1f}% of pixels"


# --------------------------------------------------------------------------------------
# the picture
# --------------------------------------------------------------------------------------
def picture_size(image_size: tuple[int, int], scale: float = 1.0, panels: int = 4) -> tuple[int, int]:
    """(width, height) in pixels of a picture of ``panels`` panels of an image of
    ``image_size`` (H, W) at ``scale``."""
    h, w = (max(1, round(s * scale)) for s in image_size)
    return panels * w + (panels - 1) * GAP, TITLE_HEIGHT + h


def _fit(draw, text: str, font, width: int) -> str:
    """``text``, cut with an ellipsis to fit ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def compose(panels: list[tuple[np.ndarray, str, str]], scale: float = 1.0):
    """Panels (picture (H, W, 3) uint8, title, caption) side by side under their two-line
    titles, each scaled by ``scale``: a PIL image of :func:`picture_size`."""
    from PIL import Image, ImageDraw, ImageFont

    H, W = panels[0][0].shape[:2]
    size = picture_size((H, W), scale, len(panels))
    w, h = (max(1, round(s * scale)) for s in (W, H))
    canvas = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for i, (picture, title, caption) in enumerate(panels):
        x = i * (w + GAP)
        image = Image.fromarray(picture)
        if (w, h) != (W, H):
            image = image.resize((w, h), Image.Resampling.NEAREST if scale > 1 else Image.Resampling.BOX)
        canvas.paste(image, (x, TITLE_HEIGHT))
        draw.text((x + 2, 2), _fit(draw, title, font, w - 4), fill=(0, 0, 0), font=font)
        draw.text((x + 2, 2 + TITLE_HEIGHT // 2), _fit(draw, caption, font, w - 4), fill=(70, 70, 70), font=font)
    return canvas


@dataclass
class Picture:
    """One picture written: its path, the image and the setting, what was drawn, the token
    groups (per image 0 of the pass: groups, tokens) and the difference's caption."""

    path: Path
    image: Path
    setting: str
    task: str
    groups: int
    tokens: int
    difference: str


def _build_models(project, cfgs: dict, points, allow_partial: bool) -> dict:
    """{point id: eval model}, all on the same weights (see the module docstring)."""
    from expedit_d2.checkpoint import load_weights

    models = {}
    for point in points:
        cfg = cfgs[point.id][0]
        torch.manual_seed(0)
        model = project.Trainer.build_model(cfg).eval()
        if cfg.MODEL.WEIGHTS:
            load_weights(project.Checkpointer(model), cfg.MODEL.WEIGHTS, allow_partial=allow_partial)
        elif models:
            model.load_state_dict(models["baseline"].state_dict())
        models[point.id] = model
    return models


def visualize(config_file, inputs, output_dir, opts=(), points=(), project=None, task: str = "auto",
              scale: float = 1.0, score_threshold: float = 0.5, allow_partial: bool = False) -> list[Picture]:
    """Write the pictures (see the module docstring) of every image in ``inputs`` for every
    setting (``points``: ``--point`` dicts; token-reduction keys among ``opts`` make one more)
    under ``output_dir``; returns what was written. Bad input (a missing image or config file,
    a setting the config cannot take) raises before any model is built, naming it."""
    from detectron2.data import MetadataCatalog
    from detectron2.data import detection_utils as utils
    from detectron2.data.catalog import Metadata

    from expedit_d2.engine import config_from_file, find_project, load_project
    from expedit_d2.fileio import atomic_write
    from expedit_d2.reduction import record_token_groups
    from expedit_d2.sweep import Point, SweepError, SweepSpec, expand_points, validate_points

    config_file = Path(config_file)
    if not config_file.is_file():
        raise FileNotFoundError(f"config file not found: {config_file}")
    inputs = [Path(p) for p in inputs]
    if not inputs:
        raise ValueError("no input image given (--input IMAGE ...)")
    missing = [str(p) for p in inputs if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"input image not found: {', '.join(missing)}")
    stems = [p.stem for p in inputs]
    twice = sorted({s for s in stems if stems.count(s) > 1})
    if twice:
        raise ValueError(f"input images with the same name {twice} would write the same pictures; "
                         "give them different names")
    if not 0 < scale <= 16:
        raise ValueError(f"--scale must be in (0, 16], got {scale}")
    project_dir = Path(project) if project else find_project(config_file)
    if project_dir is None:
        raise SweepError(f"no train_net.py in any folder above {config_file}; pass --project")
    base_opts, setting = split_setting(list(opts))
    explicit = ([setting] if setting else []) + [dict(p) for p in points]
    try:
        base_cfg, _ = config_from_file(config_file, project_dir, base_opts)
    except (KeyError, ValueError, AssertionError, TypeError) as e:
        raise SweepError(f"config {config_file} with overrides {base_opts}: {e}") from e
    module = load_project(project_dir)
    prepared = [prepare_input(p, base_cfg, module) for p in inputs]
    spec = SweepSpec(config_file=str(config_file), project=str(project_dir), opts=base_opts, points=explicit,
                     input_size=tuple(int(s) for s in prepared[0]["image"].shape[-2:]))
    settings = expand_points(spec)
    if len(settings) == 1:  # no setting given: the config as it is, against its baseline
        settings.append(Point(()))
    cfgs = validate_points(module, spec, settings)
    models = _build_models(module, cfgs, settings, allow_partial)
    base_model = models["baseline"]
    for point in settings[1:]:
        if not any(getattr(m, "token_reduction", None) is not None for m in models[point.id].modules()):
            raise ValueError(
                f"setting {'config' if not point.overrides else point.label}: {config_file} with these overrides "
                "runs no token reduction; give a setting: token-reduction keys among the overrides "
                "(e.g. MODEL.EXPEDIT.CLUSTERING_LOCATION 1 MODEL.EXPEDIT.NUM_CLUSTERS \"[12, 12]\") or --point")
    names = MetadataCatalog.get(base_cfg.DATASETS.TEST[0]) if base_cfg.DATASETS.TEST else Metadata(name="none")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for path, inp in zip(inputs, prepared):
        rgb = utils.read_image(str(path), format="RGB")
        model_size = tuple(int(s) for s in inp["image"].shape[-2:])
        with torch.inference_mode():
            base = base_model([inp])[0]
        what = task_of(base, task)
        scale_of_depth = depth_range(base["depth"].float().cpu().numpy()) if what == "depth" else None
        base_picture = draw_prediction(rgb, base, what, names, score_threshold, scale_of_depth)
        for point in settings[1:]:
            label = "config" if not point.overrides else point.label
            with torch.inference_mode(), record_token_groups(models[point.id]) as passes:
                out = models[point.id]([inp])[0]
            if not passes:
                raise ValueError(f"setting {label}: the model ran no token-reduction pass on {path}")
            groups = passes[-1]
            difference, caption = draw_difference(rgb, base, out, what, score_threshold)
            h, w = groups.grid_size
            n = groups.num_groups()[0]
            panels = [
                (draw_groups(rgb, groups, model_size), f"{label}: token groups",
                 f"{h}x{w} tokens -> {n} groups ({point.method})"),
                (base_picture, "baseline", what),
                (draw_prediction(rgb, out, what, names, score_threshold, scale_of_depth), label, what),
                (difference, "difference", caption),
            ]
            picture = compose(panels, scale)
            target = output_dir / f"{path.stem}_{label}.png"
            atomic_write(target, lambda p: picture.save(p, format="PNG"))
            written.append(Picture(target, path, label, what, n, h * w, caption))
            logger.info(f"{target}: {h}x{w} tokens -> {n} groups; {caption}")
    return written


def _split_inputs(items: list[str]) -> tuple[list[str], list[str]]:
    """``--input a.png b.png KEY VALUE ...``: the overrides after the images (argparse cannot
    tell them apart) start at the first config key that is not a file."""
    for i, item in enumerate(items):
        if _KEY.match(item) and not Path(item).exists():
            return items[:i], items[i:]
    return items, []


def main(argv=None) -> int:
    from detectron2.utils.logger import setup_logger

    from expedit_d2.sweep import parse_point

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--input", nargs="+", required=True, metavar="IMAGE", help="image files")
    parser.add_argument("--output", required=True, type=Path, metavar="DIR", help="folder of the pictures")
    parser.add_argument("--project", help="project folder (default: found from the config's path)")
    parser.add_argument("--point", action="append", default=[], metavar="KEY=VALUE[;KEY=VALUE]",
                        help="one more setting, as for the sweep (repeatable)")
    parser.add_argument("--task", choices=["auto", *TASKS], default="auto",
                        help="what to draw; auto: the first of panoptic, instances, semantic, depth "
                             "that the model predicts")
    parser.add_argument("--scale", type=float, default=1.0, help="size of each panel relative to the image")
    parser.add_argument("--score-threshold", type=float, default=0.5, help="instances: the lowest score drawn")
    parser.add_argument("--allow-partial-weights", action="store_true",
                        help="accept MODEL.WEIGHTS that cover only part of the model")
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[], metavar="KEY VALUE",
                        help="config overrides, last on the line (they may also simply follow the "
                             "other arguments, as train_net.py takes them)")
    parser.add_argument("overrides", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = parser.parse_args(argv)
    images, trailing = _split_inputs(args.input)
    setup_logger(name="expedit_d2")
    visualize(args.config_file, images, args.output, opts=[*trailing, *args.overrides, *args.opts],
              points=[parse_point(p) for p in args.point], project=args.project, task=args.task,
              scale=args.scale, score_threshold=args.score_threshold,
              allow_partial=args.allow_partial_weights)
    return 0


if __name__ == "__main__":
    from expedit_d2.sweep import SweepError

    try:
        sys.exit(main())
    except (SweepError, FileNotFoundError, ValueError) as e:
        print(f"visualize: error: {e}", file=sys.stderr)
        sys.exit(2)
