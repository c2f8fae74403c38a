#!/usr/bin/env python
"""Mask2Former with expedit-d2 backbones (Detectron2 training/evaluation script).

    python projects/Mask2Former/train_net.py --config-file CONFIG --eval-only MODEL.WEIGHTS model_final.pkl
    python projects/Mask2Former/train_net.py --config-file CONFIG --num-gpus 8

Official Mask2Former model-zoo ``.pkl`` checkpoints load as they are (same names). The
expedited configs differ from the baselines only in the backbone keys.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the mask2former package

from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.config import get_cfg  # noqa: E402
from detectron2.data import MetadataCatalog, build_detection_train_loader  # noqa: E402
from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup, launch  # noqa: E402
from detectron2.evaluation import COCOEvaluator, DatasetEvaluators, SemSegEvaluator, verify_results  # noqa: E402

from expedit_d2.evaluation import PanopticQualityEvaluator  # noqa: E402
from mask2former import add_maskformer2_config  # noqa: E402
from mask2former.data import register_all  # noqa: E402
from mask2former.data.train_mapper import MaskFormerTrainMapper  # noqa: E402
from mask2former.optim import build_maskformer_optimizer  # noqa: E402


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
        return build_maskformer_optimizer(cfg, model)

    @classmethod
    def build_train_loader(cls, cfg):
        return build_detection_train_loader(cfg, mapper=MaskFormerTrainMapper(cfg))


def setup(args):
    cfg = get_cfg()
    add_maskformer2_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    register_all()
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        res = Trainer.test(cfg, model)
        verify_results(cfg, res)
        return res
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))
