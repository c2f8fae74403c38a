#!/usr/bin/env python
"""DPT depth estimation on NYUv2 and KITTI with expedit-d2 backbones (Detectron2 training script).

    python projects/DPT/train_net.py --config-file projects/DPT/configs/dpt_hybrid_nyuv2.yaml \\
        --eval-only MODEL.WEIGHTS dpt_hybrid_nyu-2ce69ec7.pt
    python projects/DPT/train_net.py --config-file \\
        projects/DPT/configs/dpt_hybrid_nyuv2_expedit_a4_16x16.yaml --eval-only MODEL.WEIGHTS ...

Official DPT ``.pt`` files load through a load-time key map (``dpt.DPTCheckpointer``).
NYUv2 and KITTI must be prepared first: ``python datasets/prepare_nyuv2.py`` /
``datasets/prepare_kitti.py`` (see datasets/README.md).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the dpt package

import expedit_d2  # noqa: E402,F401  (first: registers the backbones, quiets import-time warnings)
from detectron2.data import MetadataCatalog, build_detection_train_loader  # noqa: E402
from detectron2.engine import DefaultTrainer  # noqa: E402

from expedit_d2.batching import build_batched_test_loader  # noqa: E402
from expedit_d2.solver import build_optimizer  # noqa: E402
from expedit_d2.engine import build_cfg, launch_main, setup_project, train_or_evaluate  # noqa: E402
from dpt import (DepthDatasetMapper, DepthEvaluator, DPTCheckpointer, add_dpt_config, register_kitti,  # noqa: E402
                 register_nyuv2)


class Trainer(DefaultTrainer):
    def __init__(self, cfg):
        super().__init__(cfg)
        # same arguments as DefaultTrainer's, plus the official-DPT key map
        self.checkpointer = DPTCheckpointer(self._trainer.model, cfg.OUTPUT_DIR,
                                            trainer=self.checkpointer.checkpointables["trainer"])

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    @classmethod
    def build_train_loader(cls, cfg):
        return build_detection_train_loader(cfg, mapper=DepthDatasetMapper(True, cfg.INPUT.FORMAT))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        # TEST.IMS_PER_BATCH images per batch (expedit_d2.batching)
        return build_batched_test_loader(cfg, dataset_name, mapper=DepthDatasetMapper(False, cfg.INPUT.FORMAT))

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        # the dataset's protocol (NYUv2: Eigen crop, 10 m; KITTI: Garg crop, 80 m, PNG depth)
        return DepthEvaluator.from_metadata(dataset_name, MetadataCatalog.get(dataset_name))


Checkpointer = DPTCheckpointer

# what the sweep needs to know (expedit_d2.sweep.protocol.SweepProtocol): DepthEvaluator's RMSE first;
# its error metrics are lower-is-better (d1..d3, fractions of accurate pixels, are not)
SWEEP = dict(
    primary_metrics=["depth/rmse", "depth/abs_rel"],
    lower_is_better=["depth/abs_rel", "depth/sq_rel", "depth/rmse", "depth/rmse_log", "depth/log10",
                     "depth/silog"],
)


def build_config(args):
    cfg = build_cfg(args, add_dpt_config)
    if cfg.TEST.AUG.ENABLED:
        raise NotImplementedError("TEST.AUG (test-time augmentation) is not supported for DPT depth")
    return cfg


def register_datasets():
    """The project's datasets under $DETECTRON2_DATASETS (idempotent, lazily loaded)."""
    register_nyuv2()
    register_kitti()


def setup(args):
    cfg = build_config(args)
    setup_project(cfg, args, "dpt")
    register_datasets()
    return cfg


def main(args):
    return train_or_evaluate(setup(args), args, Trainer, Checkpointer)


if __name__ == "__main__":
    launch_main(main)
