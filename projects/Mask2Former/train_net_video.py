#!/usr/bin/env python
"""Video Mask2Former (YouTube-VIS 2019 / 2021) with expedit-d2 backbones: evaluation of the
published checkpoints (Detectron2 script, as the official ``train_net_video.py``).

    python projects/Mask2Former/train_net_video.py --eval-only --config-file \\
        projects/Mask2Former/configs/youtubevis_2019/swin/video_maskformer2_hourglass_swin_large_IN21k_384_bs16_8ep.yaml \\
        MODEL.WEIGHTS <the YouTube-VIS 2019 Swin-L model-zoo .pkl>

The official video YAMLs run unchanged. Each video is one forward (all its frames); the
``YTVISEvaluator`` writes ``results.json`` (the submission format) into
``OUTPUT_DIR/inference`` and, where the ground truth has annotations, reports video AP.
Training is not implemented (``--eval-only``).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the mask2former packages

import expedit_d2  # noqa: E402,F401  (first: registers the backbones, quiets import-time warnings)
from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.data import DatasetCatalog, build_detection_test_loader  # noqa: E402
from detectron2.engine import DefaultTrainer  # noqa: E402
from detectron2.projects.deeplab import add_deeplab_config  # noqa: E402

from expedit_d2.engine import build_cfg, launch_main, setup_project, train_or_evaluate  # noqa: E402
from expedit_d2.evaluation.ytvis import YTVISEvaluator  # noqa: E402
from mask2former import add_maskformer2_config  # noqa: E402
from mask2former_video import YTVISDatasetMapper, add_maskformer2_video_config, register_ytvis  # noqa: E402


class Trainer(DefaultTrainer):
    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return YTVISEvaluator(dataset_name, output_folder or os.path.join(cfg.OUTPUT_DIR, "inference"))

    @classmethod
    def build_test_mapper(cls, cfg):
        return YTVISDatasetMapper(cfg, is_train=False)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        # one video per batch; the dicts straight from the catalog (Detectron2's
        # get_detection_dataset_dicts reads per-image annotations, not per-frame lists)
        return build_detection_test_loader(DatasetCatalog.get(dataset_name), mapper=cls.build_test_mapper(cfg),
                                           num_workers=cfg.DATALOADER.NUM_WORKERS)

    @classmethod
    def build_train_loader(cls, cfg):
        raise NotImplementedError("training the video model is not implemented in expedit-d2: use --eval-only")


Checkpointer = DetectionCheckpointer

# what the sweep needs to know (expedit_d2.sweep.protocol.SweepProtocol)
SWEEP = dict(primary_metrics=["segm/AP"], size_divisibility_keys=["MODEL.MASK_FORMER.SIZE_DIVISIBILITY"])


def build_config(args):
    return build_cfg(args, add_deeplab_config, add_maskformer2_config, add_maskformer2_video_config)


def register_datasets():
    """YouTube-VIS 2019 / 2021 under $DETECTRON2_DATASETS (idempotent, lazily loaded)."""
    register_ytvis()


def setup(args):
    cfg = build_config(args)
    setup_project(cfg, args, "mask2former", "mask2former_video")
    register_datasets()
    return cfg


def main(args):
    if not args.eval_only:
        raise SystemExit("train_net_video.py: error: training the video model is not implemented; add --eval-only")
    return train_or_evaluate(setup(args), args, Trainer, Checkpointer)


if __name__ == "__main__":
    launch_main(main)
