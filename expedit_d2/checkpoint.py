"""Strict loading of checkpoints for evaluation.

* Mask2Former model-zoo ``.pkl`` files need no map: our backbone's names are the
  official ones under ``backbone.``; Detectron2's ``DetectionCheckpointer`` loads them.
  DPT ``.pt`` files are mapped by the DPT project's checkpointer (``dpt.checkpoint``, the
  one home of that key map).
* :func:`load_weights` loads ``MODEL.WEIGHTS`` for evaluation through a project's
  checkpointer (so every format above loads as usual), but fails with a
  :class:`WeightsError` naming the file and the first offending keys where Detectron2 would
  log a warning and evaluate random weights: no weights, a missing or unreadable file, a
  checkpoint of another model. ``--eval-only`` and the sweep use it;
  ``--allow-partial-weights`` accepts a partial load.
"""
from __future__ import annotations

import logging
import os

import torch

__all__ = ["WeightsError", "WeightsNotFoundError", "REBUILT_BUFFERS", "PARTIAL_FLAG", "load_weights", "incompatibilities"]

# ======================================================================================
# loading MODEL.WEIGHTS for evaluation: all of the model, or an error naming the file
# ======================================================================================
class WeightsError(RuntimeError):
    """Weights that cannot be evaluated as given: no ``MODEL.WEIGHTS``, a file that cannot be
    read, or a checkpoint that does not cover the model (another model, another size)."""


class WeightsNotFoundError(WeightsError, FileNotFoundError):
    """``MODEL.WEIGHTS`` names a file that does not exist."""


# Buffers a model computes at construction, whose presence or absence in a checkpoint says
# nothing about its weights (matched on the key's last component):
#   relative_position_index  Swin: a function of the window size (official files hold it, a
#                            converted or pruned file may not; its learned partner,
#                            relative_position_bias_table, is checked like any parameter)
#   attn_mask                official Swin classification files persist the shifted-window
#                            mask; ours is built per input size in the forward
#   num_batches_tracked      BatchNorm's step counter (Caffe2/pycls files drop it); inference
#                            uses the running statistics, which are checked
#   pixel_mean, pixel_std    non-persistent buffers of our meta-architectures (MaskFormer,
#                            DPTDepth) set from MODEL.PIXEL_MEAN/STD; older Detectron2 files
#                            still carry them
REBUILT_BUFFERS = frozenset({"relative_position_index", "attn_mask", "num_batches_tracked",
                             "pixel_mean", "pixel_std"})
PARTIAL_FLAG = "--allow-partial-weights"
SHOWN_KEYS = 5  # offending keys named per kind in an error


def is_rebuilt_buffer(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in REBUILT_BUFFERS


def _keys(keys, n=SHOWN_KEYS) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else ("es" if word.endswith("h") else "s"))


def incompatibilities(model, incompatible, ignore_unexpected=None) -> dict:
    """What of ``incompatible`` (Detectron2/fvcore ``_IncompatibleKeys``: missing_keys,
    unexpected_keys, incorrect_shapes) leaves the model with weights not from the file:
    ``{"missing": [...], "unexpected": [...], "shapes": [(key, file shape, model shape)]}``,
    without rebuilt buffers (:data:`REBUILT_BUFFERS`), parameters shared under another name,
    and unexpected keys ``ignore_unexpected(key)`` accepts."""
    try:  # a parameter registered under two names is loaded through either
        from fvcore.common.checkpoint import _filter_reused_missing_keys
    except ImportError:  # pragma: no cover - fvcore internals moved
        def _filter_reused_missing_keys(_model, keys):
            return keys
    shapes = [(k, tuple(c), tuple(m)) for k, c, m in getattr(incompatible, "incorrect_shapes", [])
              if not is_rebuilt_buffer(k)]
    skipped = {k for k, _, _ in getattr(incompatible, "incorrect_shapes", [])}  # also "missing"
    missing = [k for k in incompatible.missing_keys if k not in skipped and not is_rebuilt_buffer(k)]
    if missing:  # in the model's order, so the first ones named are the first layers
        order = {k: i for i, k in enumerate(model.state_dict())}
        missing = sorted(_filter_reused_missing_keys(model, missing), key=lambda k: order.get(k, len(order)))
    unexpected = [k for k in incompatible.unexpected_keys if not is_rebuilt_buffer(k)
                  and not (ignore_unexpected is not None and ignore_unexpected(k))]
    return {"missing": missing, "unexpected": unexpected, "shapes": shapes}


def describe_incompatibilities(found: dict) -> str:
    parts = []
    if found["missing"]:
        parts.append(f"{_plural(len(found['missing']), 'missing key')} (in the model, not in the file): "
                     f"{_keys(found['missing'])}")
    if found["unexpected"]:
        parts.append(f"{_plural(len(found['unexpected']), 'unexpected key')} (in the file, not in the model): "
                     f"{_keys(found['unexpected'])}")
    if found["shapes"]:
        shown = [f"{k} {list(c)} in the file vs {list(m)} in the model" for k, c, m in found["shapes"]]
        parts.append(f"{_plural(len(shown), 'shape mismatch')}: {_keys(shown)}")
    return "; ".join(parts)


def load_weights(checkpointer, path: str, *, allow_partial: bool = False, source: str = "MODEL.WEIGHTS",
                 ignore_unexpected=None) -> dict:
    """Load ``path`` into ``checkpointer.model`` for evaluation, all of it or nothing.

    ``checkpointer`` is a Detectron2 checkpointer (``DetectionCheckpointer``, or a subclass
    such as ``DPTCheckpointer``): its ``_load_file`` reads the format (``.pth``, model-zoo
    ``.pkl`` with Detectron2's name-matching heuristics, official DPT ``.pt``) and its
    ``_load_model`` loads the tensors, so every format it accepts loads the same here. Unlike
    its ``load``, which logs what did not fit and carries on with random weights there, this
    raises :class:`WeightsError` naming ``source`` (the config key or file the path came
    from), the file and the first offending keys with their counts when

    * ``path`` is empty (evaluation needs weights), or the file does not exist
      (:class:`WeightsNotFoundError`);
    * the file cannot be read (truncated, corrupt, not a checkpoint; the reader's exception
      is chained);
    * keys of the model are missing from it, it holds keys the model lacks, or shapes differ
      -- except buffers the model rebuilds (:data:`REBUILT_BUFFERS`) and unexpected keys
      ``ignore_unexpected(key)`` accepts (a backbone loaded from a whole-model file).

    ``allow_partial=True`` (``--allow-partial-weights``) turns the last case into warnings
    (Detectron2's usual ones plus a summary) and keeps the partial load. Returns what else the
    file held (Detectron2's ``load`` return value, model removed).
    """
    logger = getattr(checkpointer, "logger", None) or logging.getLogger(__name__)
    if not path:
        raise WeightsError(f"evaluation needs trained weights but {source} is empty: set {source} to a "
                           "checkpoint of this model (e.g. MODEL.WEIGHTS output/model_final.pth)")
    local = path
    if not os.path.isfile(local):
        try:  # URLs and detectron2:// names resolve to a downloaded copy
            local = checkpointer.path_manager.get_local_path(path)
        except Exception as e:
            raise WeightsNotFoundError(f"{source}: checkpoint file not found: {path} "
                                       f"({type(e).__name__}: {e})") from e
        if not os.path.isfile(local):
            raise WeightsNotFoundError(f"{source}: checkpoint file not found: {path}")
    named = path if local == path else f"{path} (local copy {local})"
    logger.info(f"[Checkpointer] Loading from {named} ...")
    try:
        checkpoint = checkpointer._load_file(local)
        if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("model"), dict):
            raise TypeError(f"expected a dict with a 'model' state dict, got {type(checkpoint).__name__}")
    except Exception as e:
        raise WeightsError(f"{source}: cannot read checkpoint {named} (truncated, corrupt or not a "
                           f"checkpoint?): {type(e).__name__}: {e}") from e
    model = checkpointer.model
    kind = type(model).__name__
    if type(model) is torch.nn.Module:  # a holder of submodules (a backbone loaded alone)
        kind = ", ".join(f"{n}: {type(m).__name__}" for n, m in model.named_children())
    try:
        incompatible = checkpointer._load_model(checkpoint)
    except Exception as e:
        raise WeightsError(f"{source}: cannot load checkpoint {named} into {kind}: "
                           f"{type(e).__name__}: {e}") from e
    found = incompatibilities(model, incompatible, ignore_unexpected)
    if any(found.values()):
        what = describe_incompatibilities(found)
        if not allow_partial:
            raise WeightsError(
                f"{source}: checkpoint {named} does not match the model ({kind}): {what}. "
                "Evaluating it would leave those weights random: check the file and the config (another "
                f"model, or another size?), or pass {PARTIAL_FLAG} to evaluate the partial load anyway")
        checkpointer._log_incompatible_keys(incompatible)
        logger.warning(f"{PARTIAL_FLAG}: evaluating a partial load of {named} into {kind}: {what}")
    return checkpoint
