"""The evaluate-or-train flow every project's ``train_net.py`` shares (Detectron2 style)."""
from __future__ import annotations

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.engine import default_argument_parser, default_setup, launch
from detectron2.evaluation import verify_results

__all__ = ["setup_cfg", "train_or_evaluate", "launch_main"]


def setup_cfg(args, *add_config_fns):
    """A frozen config: defaults from ``add_config_fns``, then the file, then the opts."""
    cfg = get_cfg()
    for add in add_config_fns:
        add(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    return cfg


def train_or_evaluate(cfg, args, trainer_cls, checkpointer_cls=DetectionCheckpointer):
    """``--eval-only``: load ``MODEL.WEIGHTS`` with ``checkpointer_cls`` and run the trainer's
    evaluators; otherwise train (resuming with ``--resume``)."""
    if args.eval_only:
        model = trainer_cls.build_model(cfg)
        checkpointer_cls(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        res = trainer_cls.test(cfg, model)
        verify_results(cfg, res)
        return res
    trainer = trainer_cls(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def launch_main(main) -> None:
    """Parse Detectron2's usual flags and run ``main(args)`` on --num-gpus / --num-machines."""
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))
