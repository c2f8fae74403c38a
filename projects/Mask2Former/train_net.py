#!/usr/bin/env python
"""Mask2Former with expedit-d2 backbones (Detectron2 training/evaluation script).

    python projects/Mask2Former/train_net.py --config-file CONFIG --eval-only MODEL.WEIGHTS model_final.pkl
    python projects/Mask2Former/train_net.py --config-file CONFIG --num-gpus 8

Official Mask2Former model-zoo ``.pkl`` checkpoints load as they are (same names). The
expedited configs differ from the baselines only in the backbone keys. The official
Mask2Former / Expedit-Mask2Former YAMLs run unchanged: their ``_BASE_`` chains set DeepLab
keys, so DeepLab's config is added first (as the official script does), and their ADE20K
``SOLVER.LR_SCHEDULER_NAME: "WarmupPolyLR"`` is built by DeepLab's scheduler factory.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the mask2former package

import expedit_d2  # noqa: E402,F401  (first: registers the backbones, quiets import-time warnings)
from detectron2.data import DatasetMapper, MetadataCatalog, build_detection_train_loader  # noqa: E402
from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.engine import DefaultTrainer  # noqa: E402
from detectron2.evaluation import COCOEvaluator, DatasetEvaluators, SemSegEvaluator  # noqa: E402
from detectron2.projects.deeplab import add_deeplab_config, build_lr_scheduler  # noqa: E402

from expedit_d2.engine import build_cfg, launch_main, setup_project, train_or_evaluate  # noqa: E402
from expedit_d2.evaluation import PanopticQualityEvaluator  # noqa: E402
from mask2former import add_maskformer2_config  # noqa: E402
from mask2former.data import register_all  # noqa: E402
from mask2former.data.train_mapper import MaskFormerTrainMapper  # noqa: E402
from expedit_d2.batching import build_batched_test_loader  # noqa: E402
from expedit_d2.solver import build_optimizer  # noqa: E402


class Trainer(DefaultTrainer):
    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference")
        kind = MetadataCatalog.get(dataset_name).evaluator_type
        test = cfg.MODEL.MASK_FORMER.TEST
        evaluators = []
        if kind == "coco_panoptic_seg":
            if test.PANOPTIC_ON:
                evaluators.append(PanopticQualityEvaluator(dataset_name, output_folder))
            if test.SEMANTIC_ON:
                evaluators.append(SemSegEvaluator(dataset_name, distributed=True, output_dir=output_folder))
            if test.INSTANCE_ON:
                evaluators.append(COCOEvaluator(dataset_name, output_dir=output_folder, use_fast_impl=False))
        elif kind == "coco":
            evaluators.append(COCOEvaluator(dataset_name, output_dir=output_folder, use_fast_impl=False))
        elif kind == "sem_seg":
            evaluators.append(SemSegEvaluator(dataset_name, distributed=True, output_dir=output_folder))
        if not evaluators:
            raise ValueError(f"no evaluator for dataset {dataset_name!r} (evaluator_type {kind!r}) with "
                             "the MODEL.MASK_FORMER.TEST settings")
        return DatasetEvaluators(evaluators)

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer):
        # "WarmupPolyLR" (the ADE20K recipes) or any of Detectron2's own schedulers
        return build_lr_scheduler(cfg, optimizer)

    @classmethod
    def build_train_loader(cls, cfg):
        return build_detection_train_loader(cfg, mapper=MaskFormerTrainMapper(cfg))

    @classmethod
    def build_test_mapper(cls, cfg):
        """Detectron2's test mapper (also how tools/visualize.py prepares an image)."""
        return DatasetMapper(cfg, is_train=False)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        # TEST.IMS_PER_BATCH images per batch (expedit_d2.batching)
        return build_batched_test_loader(cfg, dataset_name, mapper=cls.build_test_mapper(cfg))


Checkpointer = DetectionCheckpointer

# what the sweep needs to know (expedit_d2.sweep.protocol.SweepProtocol): the panoptic, instance and
# semantic evaluators' main metrics; the model pads its input to MASK_FORMER.SIZE_DIVISIBILITY
SWEEP = dict(
    primary_metrics=["panoptic_seg/PQ", "segm/AP", "sem_seg/mIoU", "bbox/AP"],
    size_divisibility_keys=["MODEL.MASK_FORMER.SIZE_DIVISIBILITY"],
)


def build_config(args):
    return build_cfg(args, add_deeplab_config, add_maskformer2_config)


def register_datasets():
    """The project's datasets under $DETECTRON2_DATASETS (idempotent, lazily loaded)."""
    register_all()


def setup(args):
    cfg = build_config(args)
    setup_project(cfg, args, "mask2former")
    register_datasets()
    return cfg


def main(args):
    return train_or_evaluate(setup(args), args, Trainer, Checkpointer)


if __name__ == "__main__":
    launch_main(main)
