"""Checks on what the projects' models are given (one home for both meta-architectures)."""
from __future__ import annotations

import torch

__all__ = ["check_finite_images", "model_inputs"]


def model_inputs(image: torch.Tensor, frames: int | None = None) -> list[dict]:
    """The one-element batch the tools count and time a model on: ``image`` (C, H, W) at its
    own size, or for a video model a clip of ``frames`` copies of it (distinct tensors: the
    tracer behind fvcore passes a repeated input on as copies)."""
    H, W = (int(s) for s in image.shape[-2:])
    clip = image if frames is None else [image.clone() for _ in range(frames)]
    return [{"image": clip, "height": H, "width": W}]


def check_finite_images(batched_inputs) -> None:
    """Raise if any ``batched_inputs[i]["image"]`` holds NaN or inf, naming the image.

    A single non-finite pixel turns the whole output into NaN (attention and normalisation
    mix every position), silently; integer images (what the dataset mappers produce) are
    always finite and are not scanned.
    """
    for i, x in enumerate(batched_inputs):
        image = x["image"]
        if image.is_floating_point() and not bool(torch.isfinite(image).all()):
            bad = int((~torch.isfinite(image)).sum())
            name = x.get("file_name") or (f"image_id {x['image_id']}" if "image_id" in x else None)
            where = f"{name!r} (batch index {i})" if name else f"batch index {i}"
            raise ValueError(f"input image {where} has {bad} non-finite (NaN/inf) values of "
                             f"{image.numel()}: the model would output NaN; fix the input")
