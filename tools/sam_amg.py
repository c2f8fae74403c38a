#!/usr/bin/env python
"""Segment Anything's automatic mask generator (AMG) on your images, base vs expedited.

    python tools/sam_amg.py --checkpoint sam_vit_h_4b8939.pth --model-type vit_h \\
        --input photo.jpg more_photos/ --output output/sam_amg --preset h_a8_81
    python tools/sam_amg.py --random-weights --input photo.jpg --output output/sam_smoke

One SAM model, loaded as its users load it (segment-anything's ``sam_model_registry[type]
(checkpoint=PATH)``), runs ``SamAutomaticMaskGenerator.generate`` twice per image: as it is
and with its image encoder expedited (:func:`expedit_d2.sam.expedit_sam`, toggled on and
off between the calls: same weights, no second copy). Per image it writes ``<name>.png``:
the AMG masks in random colours over the image, base on the left, expedited on the right
(8 white pixels between them; an expedited mask that matches a base mask with IoU >= 0.5
takes that mask's colour). Over all images it writes ``summary.json`` and ``summary.md``
(atomically, after every image): the settings, per image the number of masks, the mask
agreement (mean best IoU: for each expedited mask the largest IoU with a base mask, averaged;
and the reverse) and the timing -- the image encoder alone and the whole ``generate``, base
and expedited, interleaved round by round (``--warmup`` untimed rounds, then ``--repeats``
timed ones; medians, and the speed-up as the median over rounds of base time / expedited
time of the same round).

Settings: ``--preset`` (default ``h_amg``, the official amg.py's) names the official
Expedit-SAM settings for ViT-H (:data:`expedit_d2.sam.SAM_PRESETS`, docs/sam.md); on ViT-L
or ViT-B its clustering location moves to the same fraction of the depth. Any of
``--clustering-location``, ``--num-clusters`` (per 14 x 14 window, a square: 81, 100, 121),
``--cluster-iters``, ``--temperature`` (clustering and reconstruction, as the official
encoder), ``--cluster-window-size`` and ``--reconstruction-k`` replace the preset's value.
The AMG options are segment-anything's (the official amg.py's names); unset, its defaults.

``--random-weights`` runs without a checkpoint, for smoke runs: with ``--model-type tiny``
(its default) a small random SAM of SAM's layout (416 x 416 input, 4 blocks; seconds on a
CPU), with ``vit_b``/``vit_l``/``vit_h`` the full-size model with random weights (timing
only: the masks mean nothing). With random weights the AMG quality filters
(``--pred-iou-thresh``, ``--stability-score-thresh``) default to 0, or nothing would pass.
A full-size model on a CPU takes minutes per ``generate``: ``--repeats 1 --warmup 0``.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import re
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from expedit_d2.cli import HelpFormatter, add_timing_arguments, apply_timing_arguments  # noqa: E402

logger = logging.getLogger("expedit_d2.sam_amg")

MODEL_TYPES = ("vit_h", "vit_l", "vit_b", "default", "tiny")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
#: white pixels between the two halves of an output PNG
GAP = 8
#: an expedited mask whose best IoU with a base mask reaches this takes that mask's colour
SAME_COLOUR_IOU = 0.5
#: blend of a mask's colour over the image (the official demo's)
ALPHA = 0.35
TIMED = ("encoder base", "encoder expedited", "amg base", "amg expedited")
#: the library's names of the settings (in its error messages) -> this tool's options
OPTION_OF_KEY = {"CLUSTERING_LOCATION": "--clustering-location", "NUM_CLUSTERS": "--num-clusters",
                 "ITERS": "--cluster-iters", "TEMPERATURE": "--temperature", "WINDOW": "--cluster-window-size",
                 "RECON_K": "--reconstruction-k"}
#: AMG option -> SamAutomaticMaskGenerator keyword
AMG_OPTIONS = {
    "points_per_side": int, "points_per_batch": int, "pred_iou_thresh": float, "stability_score_thresh": float,
    "stability_score_offset": float, "box_nms_thresh": float, "crop_n_layers": int, "crop_nms_thresh": float,
    "crop_overlap_ratio": float, "crop_n_points_downscale_factor": int, "min_mask_region_area": int,
}

#: AMG options with a lower bound
AMG_AT_LEAST = {"points_per_side": 1, "points_per_batch": 1, "crop_n_layers": 0,
                "crop_n_points_downscale_factor": 1, "min_mask_region_area": 0}


def build_parser() -> argparse.ArgumentParser:
    from expedit_d2.sam import DEFAULT_PRESET, SAM_PRESETS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, metavar="IMG",
                        help=f"images, or folders of images ({', '.join(IMAGE_SUFFIXES)})")
    parser.add_argument("--output", required=True, type=Path, metavar="DIR", help="where the PNGs and summary go")
    parser.add_argument("--checkpoint", type=Path, metavar="PATH",
                        help="a SAM checkpoint (sam_vit_h_4b8939.pth, ...), as segment-anything loads it")
    parser.add_argument("--model-type", choices=MODEL_TYPES,
                        help="segment-anything's sam_model_registry key ('tiny': --random-weights only); "
                             "default: vit_h with a checkpoint, tiny with --random-weights")
    parser.add_argument("--random-weights", action="store_true",
                        help="no checkpoint: random weights (smoke runs, timing)")
    parser.add_argument("--seed", type=int, default=0, help="random weights and mask colours")
    group = parser.add_argument_group("expedit settings (a preset, any value replaced)")
    group.add_argument("--preset", default=DEFAULT_PRESET, choices=list(SAM_PRESETS))
    group.add_argument("--clustering-location", type=int, help="alpha: cluster right before this block")
    group.add_argument("--num-clusters", type=int, help="clusters per 14 x 14 window, a square (81, 100, 121)")
    group.add_argument("--cluster-iters", type=int)
    group.add_argument("--temperature", type=float, help="clustering and reconstruction")
    group.add_argument("--cluster-window-size", type=int, help="odd")
    group.add_argument("--reconstruction-k", type=int)
    amg = parser.add_argument_group("automatic mask generator (segment-anything's defaults when unset)")
    for name, kind in AMG_OPTIONS.items():
        amg.add_argument("--" + name.replace("_", "-"), type=kind)
    add_timing_arguments(parser, repeats=3, warmup=1)
    return parser


# --------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------
def image_paths(inputs: list[str]) -> list[Path]:
    """The images of ``--input`` (folders: their image files, sorted), each checked to open."""
    from PIL import Image, UnidentifiedImageError

    paths = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise ValueError(f"--input {item}: a folder with no images ({', '.join(IMAGE_SUFFIXES)})")
            paths += found
        elif p.is_file():
            paths.append(p)
        else:
            raise ValueError(f"--input {item}: no such file or folder")
    for p in paths:
        try:
            with Image.open(p):  # reads the header only
                pass
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"--input {p}: not an image PIL can read ({e})") from None
    return paths


def read_image(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB, as SamPredictor.set_image takes it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"))
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"--input {path}: not an image PIL can read ({e})") from None


def output_names(paths: list[Path]) -> list[str]:
    """``<stem>.png`` per image, ``<stem>_2.png``... where stems repeat."""
    seen: dict[str, int] = {}
    names = []
    for p in paths:
        seen[p.stem] = seen.get(p.stem, 0) + 1
        names.append(p.stem + (f"_{seen[p.stem]}" if seen[p.stem] > 1 else "") + ".png")
    return names


def load_sam(args):
    """The Sam model of the arguments, in eval mode, on the device; and its description."""
    from segment_anything import sam_model_registry

    from expedit_d2.sam import build_tiny_sam

    if args.random_weights:
        model_type = args.model_type or "tiny"
        torch.manual_seed(args.seed)
        sam = build_tiny_sam(seed=args.seed) if model_type == "tiny" else sam_model_registry[model_type]()
        what = f"{model_type}, random weights (seed {args.seed})"
    else:
        model_type = args.model_type or "vit_h"
        if not args.checkpoint.is_file():
            raise ValueError(f"--checkpoint {args.checkpoint}: no such file")
        try:
            sam = sam_model_registry[model_type](checkpoint=str(args.checkpoint))
        except Exception as e:  # a file of another model type, or not a checkpoint
            raise ValueError(f"--checkpoint {args.checkpoint} does not load into SAM {model_type} (--model-type): "
                             f"{type(e).__name__}: {str(e)[:600]}") from None
        what = f"{model_type}, {args.checkpoint}"
    return sam.to(args.device).eval(), model_type, what


def expedit_settings(args, depth: int):
    """The preset scaled to ``depth``, with the explicit values in its place."""
    from expedit_d2.sam import official_settings, sam_settings

    s = sam_settings(args.preset, depth)
    pick = lambda given, preset: preset if given is None else given  # noqa: E731
    return official_settings(
        pick(args.clustering_location, s.clustering_location), pick(args.num_clusters, s.num_clusters[0] ** 2),
        pick(args.cluster_iters, s.iters), pick(args.temperature, s.temperature),
        pick(args.cluster_window_size, s.window), pick(args.reconstruction_k, s.recon_k))


def amg_kwargs(args) -> dict:
    kwargs = {k: getattr(args, k) for k in AMG_OPTIONS if getattr(args, k) is not None}
    if args.random_weights:
        for key in ("pred_iou_thresh", "stability_score_thresh"):
            if key not in kwargs:
                kwargs[key] = 0.0
                logger.info(f"random weights: --{key.replace('_', '-')} 0 (pass a value to filter)")
    return kwargs


# --------------------------------------------------------------------------------------
# pictures
# --------------------------------------------------------------------------------------
def overlay(image: np.ndarray, masks: list[np.ndarray], colours: np.ndarray) -> np.ndarray:
    """The masks (largest first, so small ones stay visible) blended over the image."""
    out = image.astype(np.float32)
    for i in sorted(range(len(masks)), key=lambda i: -int(masks[i].sum())):
        m = masks[i]
        out[m] = out[m] * (1 - ALPHA) + colours[i] * ALPHA
    return out.round().clip(0, 255).astype(np.uint8)


def side_by_side(image, base, expedited, ious, rng) -> np.ndarray:
    """(H, 2W + GAP, 3): base masks over the image on the left, expedited on the right; an
    expedited mask takes the colour of the base mask it matches (IoU >= SAME_COLOUR_IOU)."""
    base_colours = rng.integers(0, 256, size=(len(base), 3)).astype(np.float32)
    exp_colours = rng.integers(0, 256, size=(len(expedited), 3)).astype(np.float32)
    if ious.size:
        best = ious.argmax(axis=1)
        for i, j in enumerate(best):
            if ious[i, j] >= SAME_COLOUR_IOU:
                exp_colours[i] = base_colours[j]
    H, W = image.shape[:2]
    canvas = np.full((H, 2 * W + GAP, 3), 255, dtype=np.uint8)
    canvas[:, :W] = overlay(image, base, base_colours)
    canvas[:, W + GAP:] = overlay(image, expedited, exp_colours)
    return canvas


def write_png(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    from expedit_d2.fileio import atomic_write

    atomic_write(path, lambda p: Image.fromarray(array).save(p, format="PNG"))


# --------------------------------------------------------------------------------------
# one image
# --------------------------------------------------------------------------------------
def encoder_input(sam, image: np.ndarray) -> torch.Tensor:
    """What SamPredictor.set_image feeds the encoder: resized longest side, normalised, padded."""
    from segment_anything.utils.transforms import ResizeLongestSide

    resized = ResizeLongestSide(sam.image_encoder.img_size).apply_image(image)
    x = torch.as_tensor(resized, device=sam.device).permute(2, 0, 1).contiguous()[None]
    return sam.preprocess(x)


def run_image(sam, settings, image, amg, repeats, warmup, device):
    """Masks of both and the interleaved timing of encoder and AMG, base and expedited."""
    from segment_anything import SamAutomaticMaskGenerator

    from expedit_d2 import apply_patch, remove_patch
    from expedit_d2.measure import interleaved_samples

    encoder = sam.image_encoder
    generator = SamAutomaticMaskGenerator(sam, output_mode="binary_mask", **amg)
    x = encoder_input(sam, image)
    results = {}

    def patched(on: bool) -> None:
        if on == (getattr(encoder, "token_reduction", None) is not None):
            return
        if on:
            apply_patch(encoder, settings)
        else:
            remove_patch(encoder)

    def call(name, on, fn):
        def run():
            patched(on)
            results[name] = fn()
        return run

    fns = {"encoder base": call("encoder base", False, lambda: encoder(x)),
           "encoder expedited": call("encoder expedited", True, lambda: encoder(x)),
           "amg base": call("amg base", False, lambda: generator.generate(image)),
           "amg expedited": call("amg expedited", True, lambda: generator.generate(image))}
    try:
        with torch.no_grad():
            samples = interleaved_samples(fns, device, repeats=repeats, warmup=warmup)
    finally:
        patched(False)
    return results["amg base"], results["amg expedited"], samples


def summarise(samples: dict[str, list[float]]) -> tuple[dict, dict]:
    seconds = {name.replace(" ", "_"): statistics.median(ts) for name, ts in samples.items()}
    speedup = {part: statistics.median(b / e for b, e in zip(samples[f"{part} base"], samples[f"{part} expedited"]))
               for part in ("encoder", "amg")}
    return seconds, speedup


# --------------------------------------------------------------------------------------
# the report
# --------------------------------------------------------------------------------------
def _fmt(v, spec=".3f"):
    return "-" if v is None else format(v, spec)


def markdown(data: dict) -> str:
    s = data["settings"]
    lines = [
        "# SAM automatic mask generation, base vs expedited", "",
        f"- model: {data['model']}; device: {data['device']}, {data['threads']} threads",
        f"- expedit: preset {data['preset']} -> clustering before block {s['clustering_location']} of "
        f"{data['depth']}, {s['num_clusters'][0]}x{s['num_clusters'][1]} clusters per 14x14 window, "
        f"{s['iters']} iterations, temperature {s['temperature']:g}, window {s['window']}, k {s['recon_k']}",
        f"- AMG: {data['amg'] or 'segment-anything defaults'}",
        f"- timing: median of {data['repeats']} interleaved rounds after {data['warmup']} untimed; speed-up = "
        "median over rounds of base / expedited", "",
        "| image | masks base | masks exp. | mean best IoU exp.->base | base->exp. | encoder base s | encoder exp. s "
        "| encoder speed-up | AMG base s | AMG exp. s | AMG speed-up |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in data["images"]:
        t, u, iou = r["seconds"], r["speedup"], r["mean_best_iou"]
        lines.append(f"| [{Path(r['image']).name}]({r['png']}) | {r['masks']['base']} | {r['masks']['expedited']} "
                     f"| {_fmt(iou['expedited_to_base'])} | {_fmt(iou['base_to_expedited'])} "
                     f"| {t['encoder_base']:.3f} | {t['encoder_expedited']:.3f} | {u['encoder']:.2f}x "
                     f"| {t['amg_base']:.3f} | {t['amg_expedited']:.3f} | {u['amg']:.2f}x |")
    lines += ["", "Mean best IoU: for each mask of one side, its largest IoU with a mask of the other, averaged "
              "(- : that side found no masks)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    from detectron2.utils.logger import setup_logger
    from tqdm import tqdm

    from expedit_d2.measure import write_report
    from expedit_d2.sam import best_iou_means, image_encoder_of, mask_ious

    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logger(name="expedit_d2")
    if args.random_weights == (args.checkpoint is not None):
        parser.error("give --checkpoint PATH, or --random-weights for a smoke run without one (not both)")
    if args.model_type == "tiny" and not args.random_weights:
        parser.error("--model-type tiny has no checkpoint format: it is for --random-weights only")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available here (use --device cpu)")
    if args.repeats < 1:
        parser.error(f"--repeats {args.repeats}: must be >= 1")
    if args.warmup < 0:
        parser.error(f"--warmup {args.warmup}: must be >= 0")
    for name, least in AMG_AT_LEAST.items():
        value = getattr(args, name)
        if value is not None and value < least:
            parser.error(f"--{name.replace('_', '-')} {value}: must be >= {least}")
    try:
        paths = image_paths(args.input)
        apply_timing_arguments(args)
        sam, model_type, what = load_sam(args)
        depth = len(image_encoder_of(sam).blocks)
        settings = expedit_settings(args, depth)
        from expedit_d2 import apply_patch, remove_patch

        remove_patch(apply_patch(sam.image_encoder, settings))  # bad settings fail here, naming the value
    except ValueError as e:  # name the tool's option beside the library's key
        parser.error(re.sub(r"MODEL\.EXPEDIT\.([A-Z_]+)", lambda m: (
            f"{OPTION_OF_KEY[m.group(1)]} ({m.group(0)})" if m.group(1) in OPTION_OF_KEY else m.group(0)), str(e)))
    amg = amg_kwargs(args)
    args.output.mkdir(parents=True, exist_ok=True)
    data = {"model": what, "model_type": model_type, "checkpoint": None if args.checkpoint is None
            else str(args.checkpoint), "random_weights": args.random_weights, "device": args.device,
            "threads": torch.get_num_threads(), "depth": depth, "preset": args.preset,
            "settings": dataclasses.asdict(settings), "amg": amg, "repeats": args.repeats, "warmup": args.warmup,
            "images": []}
    logger.info(f"SAM {what}; expedit {settings}")
    for path, name in zip(tqdm(paths, desc="images", unit="image"), output_names(paths)):
        image = read_image(path)
        base, expedited, samples = run_image(sam, settings, image, amg, args.repeats, args.warmup, args.device)
        base_masks = [m["segmentation"] for m in base]
        exp_masks = [m["segmentation"] for m in expedited]
        ious = mask_ious(exp_masks, base_masks)
        expedited_to_base, base_to_expedited = best_iou_means(ious)
        rng = np.random.default_rng([args.seed, len(data["images"])])
        write_png(args.output / name, side_by_side(image, base_masks, exp_masks, ious, rng))
        seconds, speedup = summarise(samples)
        data["images"].append({
            "image": str(path), "png": name, "size": list(image.shape[:2]),
            "masks": {"base": len(base_masks), "expedited": len(exp_masks)},
            "mean_best_iou": {"expedited_to_base": expedited_to_base, "base_to_expedited": base_to_expedited},
            "seconds": seconds, "speedup": speedup,
            "rounds": {k.replace(" ", "_"): v for k, v in samples.items()},
        })
        write_report(args.output / "summary", markdown(data), data)  # after every image
    print(markdown(data))
    logger.info(f"wrote {len(paths)} PNG(s) and summary.{{json,md}} to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
