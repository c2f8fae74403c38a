"""What every project's ``train_net.py`` shares (Detectron2 style), and how tools load one.

A project folder holds a ``train_net.py`` that defines

* ``build_config(args)`` -- the frozen config for Detectron2's usual ``args`` (no side effects);
* ``register_datasets()`` -- register its datasets (idempotent; models read their metadata);
* ``setup(args)`` -- ``build_config`` plus logging set-up and ``register_datasets``;
* ``Trainer`` (a ``DefaultTrainer``: ``build_model``, ``test``) and ``Checkpointer`` (loads
  ``MODEL.WEIGHTS``, official formats included);
* ``main(args)`` -- :func:`train_or_evaluate`; with ``--eval-only`` the results also land in
  ``OUTPUT_DIR/eval_results.json`` (written atomically), which is how the sweep reads them.

``--eval-only`` evaluates the weights it was given or fails: no ``MODEL.WEIGHTS``, a missing or
unreadable file, or a checkpoint that does not cover the model (missing or unexpected keys,
shape mismatches; buffers the model rebuilds aside) raise
:class:`~expedit_d2.checkpoint.WeightsError` naming the file and the first offending keys.
``--allow-partial-weights`` (in :func:`argument_parser`) evaluates a partial load with
warnings instead. Training keeps Detectron2's lenient loading (an ImageNet backbone
checkpoint covers only part of the model).

Optionally, a module-level ``SWEEP`` dict tells :mod:`expedit_d2.sweep` what it cannot
know about the project's task (:mod:`expedit_d2.sweep.protocol`).

:func:`load_project` imports such a file as a module, the way running it would.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import sys
from pathlib import Path

import torch
from torch.multiprocessing import ProcessExitedException, ProcessRaisedException
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.engine import default_argument_parser, default_setup
from detectron2.evaluation import verify_results
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from .checkpoint import PARTIAL_FLAG, load_weights
from .reduction.core import reduction_statistics
from .fileio import atomic_write
from .launch import DIST_BACKENDS, LaunchError, WorkerError, launch, resolve_backend
from .progress import TrainingProgress

__all__ = ["build_cfg", "argument_parser", "setup_project", "train_or_evaluate", "launch_main", "load_project",
           "find_project", "config_from_file", "EVAL_RESULTS"]

EVAL_RESULTS = "eval_results.json"


def build_cfg(args, *add_config_fns):
    """A frozen config: defaults from ``add_config_fns``, then the file, then the opts.
    ``MODEL.DEVICE`` defaults to what this machine has (cuda if available, else cpu); a
    value in the file or the opts wins."""
    cfg = get_cfg()
    cfg.MODEL.DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
    for add in add_config_fns:
        add(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    return cfg


def argument_parser(epilog=None):
    """Detectron2's ``default_argument_parser`` plus ``--allow-partial-weights`` and
    ``--dist-backend`` (:mod:`expedit_d2.launch`); ``--dist-url`` defaults to ``auto`` (a free
    port on this machine) instead of a fixed port per user, so two runs side by side do not
    collide."""
    parser = default_argument_parser(epilog)
    parser.set_defaults(dist_url="auto")
    parser.add_argument(
        "--dist-backend", choices=DIST_BACKENDS, default="auto",
        help="how the --num-gpus processes per machine (x --num-machines) run and talk: nccl is "
             "Detectron2's launch, one process per GPU; gloo runs --num-gpus CPU processes "
             "(torch.distributed gloo, Detectron2's comm; --eval-only). auto: nccl where CUDA is "
             "available, gloo elsewhere (so --num-gpus N on a machine without GPUs means N CPU "
             "processes). --dist-url: auto (default) picks a free port on one machine; with "
             "--num-machines, tcp://HOST:PORT of machine 0")
    parser.add_argument(
        PARTIAL_FLAG, action="store_true",
        help="with --eval-only: evaluate even if MODEL.WEIGHTS does not cover the whole model "
             "(missing or unexpected keys, shape mismatches are logged as warnings and those "
             "weights stay random). Without it such a checkpoint is an error naming the file and "
             "the keys. A missing or unreadable file and an empty MODEL.WEIGHTS are errors either way")
    return parser


def train_or_evaluate(cfg, args, trainer_cls, checkpointer_cls=DetectionCheckpointer):
    """``--eval-only``: load ``MODEL.WEIGHTS`` (or, with ``--resume``, the last checkpoint in
    ``OUTPUT_DIR``) with ``checkpointer_cls`` through :func:`~expedit_d2.checkpoint.load_weights`
    (strict unless ``args.allow_partial_weights``), run the trainer's evaluators and write
    ``OUTPUT_DIR/eval_results.json``; otherwise train (resuming with ``--resume``), with a
    progress bar over the iterations on a terminal (:class:`~expedit_d2.progress.TrainingProgress`)."""
    if args.eval_only:
        model = trainer_cls.build_model(cfg)
        checkpointer = checkpointer_cls(model, save_dir=cfg.OUTPUT_DIR)
        path, source = cfg.MODEL.WEIGHTS, "MODEL.WEIGHTS"
        if args.resume and checkpointer.has_checkpoint():
            path, source = checkpointer.get_checkpoint_file(), f"{Path(cfg.OUTPUT_DIR) / 'last_checkpoint'} (--resume)"
        load_weights(checkpointer, path, allow_partial=getattr(args, "allow_partial_weights", False),
                     source=source)
        res = trainer_cls.test(cfg, model)
        for method, counts in _summed(comm.all_gather(reduction_statistics(model))).items():
            # e.g. expedit's unexpedited_images: token grid smaller than the cluster grid
            logging.getLogger(__name__).warning(f"token reduction {method!r}: {counts}")
            res[method] = counts
        if comm.is_main_process() and cfg.OUTPUT_DIR:
            Path(cfg.OUTPUT_DIR).mkdir(parents=True, exist_ok=True)
            atomic_write(Path(cfg.OUTPUT_DIR) / EVAL_RESULTS, json.dumps(res, indent=2))
        if comm.is_main_process():  # the other ranks' evaluators return {}
            verify_results(cfg, res)
        return res
    trainer = trainer_cls(cfg)
    trainer.resume_or_load(resume=args.resume)
    if comm.is_main_process():  # a bar over the iterations on a terminal, start/end lines in the log
        trainer.register_hooks([TrainingProgress()])
    return trainer.train()


def _summed(per_process: list[dict[str, dict[str, int]]]) -> dict[str, dict[str, int]]:
    """The processes' :func:`~expedit_d2.reduction.core.reduction_statistics`, added up."""
    out: dict[str, dict[str, int]] = {}
    for stats in per_process:
        for method, counts in stats.items():
            for name, value in counts.items():
                out.setdefault(method, {})[name] = out.get(method, {}).get(name, 0) + value
    return out


def setup_project(cfg, args, *logger_names: str) -> None:
    """Detectron2's ``default_setup`` plus loggers for expedit_d2 and the project's packages
    (``logger_names``), so their messages (e.g. the PQ and depth tables) reach the console
    and ``OUTPUT_DIR/log.txt`` like Detectron2's own."""
    default_setup(cfg, args)
    for name in ("expedit_d2", *logger_names):
        setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name=name)


def launch_main(main) -> None:
    """Parse Detectron2's usual flags (and ours, :func:`argument_parser`) and run ``main(args)``
    in --num-gpus processes per machine on --num-machines (:func:`expedit_d2.launch.launch`:
    Detectron2's launch on CUDA, gloo CPU processes elsewhere). A process that fails ends the
    run with its rank and traceback on stderr and exit status 1; Ctrl-C ends with one line
    on what was kept."""
    args = argument_parser().parse_args()
    print("Command Line Args:", args)
    try:
        backend = resolve_backend(args.dist_backend)
        if backend == "gloo" and args.num_gpus * args.num_machines > 1 and not args.eval_only:
            raise LaunchError("several CPU processes (gloo) evaluate only: add --eval-only, or train in one "
                              "process (Detectron2 0.6's trainer wraps the model for one GPU per process)")
        launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
               dist_url=args.dist_url, args=(args,), backend=backend)
    except LaunchError as e:
        print(f"{Path(sys.argv[0]).name}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except (WorkerError, ProcessRaisedException, ProcessExitedException) as e:  # ours (the first to fail), or Detectron2's launch
        print(f"{Path(sys.argv[0]).name}: {str(e).strip()}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        if args.eval_only:
            kept = "the evaluation was not finished and nothing was written; run the command again"
        else:
            kept = ("checkpoints saved so far are in OUTPUT_DIR (its last_checkpoint); run the same "
                    "command with --resume to continue from there")
        print(f"interrupted: {kept}", file=sys.stderr)
        sys.exit(130)


def find_project(config_file):
    """The nearest folder above ``config_file`` holding a ``train_net.py`` (or None)."""
    path = Path(config_file).resolve()
    return next((p for p in path.parents if (p / "train_net.py").is_file()), None)


def config_from_file(config_file, project=None, opts=()):
    """A frozen config for ``config_file`` as its project builds it (``project`` or the one
    found above the file: its config keys, e.g. ``MODEL.SEM_SEG_HEAD.*``, and its datasets
    registered), or expedit-d2's keys alone for a file outside any project. Returns
    (cfg, project module or None)."""
    import argparse

    from .config import add_expedit_config

    project = project or find_project(config_file)
    if project is None:
        return build_cfg(argparse.Namespace(config_file=str(config_file), opts=list(opts)),
                         add_expedit_config), None
    module = load_project(project)
    module.register_datasets()
    return module.build_config(argparse.Namespace(config_file=str(config_file), opts=list(opts))), module


def project_script(project) -> Path:
    """A project's training script: ``project`` itself when it names a ``.py`` file (e.g.
    ``projects/Mask2Former/train_net_video.py``), else the folder's ``train_net.py``."""
    path = Path(project).resolve()
    return path if path.suffix == ".py" else path / "train_net.py"


def load_project(project) -> object:
    """Import a project's training script as a module: ``project`` is the project folder (its
    ``train_net.py``) or the script itself (e.g. ``projects/Mask2Former/train_net_video.py``)."""
    path = project_script(project)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a project folder holds a train_net.py "
                                "(e.g. projects/Mask2Former), or name the script")
    name = f"_expedit_project_{path.parent.name.lower()}" + ("" if path.stem == "train_net" else f"_{path.stem}")
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    missing = [a for a in ("build_config", "register_datasets", "setup", "Trainer", "Checkpointer", "main") if not hasattr(module, a)]
    if missing:
        raise AttributeError(f"{path} lacks {missing} (see expedit_d2.engine for what a project defines)")
    sys.modules[name] = module
    return module


