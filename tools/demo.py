#!/usr/bin/env python
"""The embedded demo: an accuracy-versus-GMACs sweep end to end, with no downloads.

1. writes small synthetic datasets in the real formats under ``<output>/datasets``
   (``$DETECTRON2_DATASETS`` for the run): COCO panoptic + instances (JSON + PNG) and NYUv2
   (``nyu_depth_v2_labeled.mat`` / ``splits.mat``, then ``datasets/prepare_nyuv2.py``);
2. trains two small models from scratch with the projects' own ``train_net.py``: a Swin
   Mask2Former (panoptic + instance + semantic) and a ViT DPT (depth), a minute or two each
   on a CPU (``projects/*/configs/demo/``);
3. sweeps the token-reduction methods on both, without fine-tuning (Mask2Former's Swin:
   expedit and pooling per window; DPT's ViT: expedit, ToMe, EViT and pooling at two costs
   each; ``configs/sweeps/demo_*.yaml``, :mod:`expedit_d2.sweep`), and leaves per project
   ``results.{jsonl,csv}``, ``table.md`` (with the best setting of each method) and
   ``pareto.png`` (one curve per method) under ``<output>/``;
4. draws, for one validation image of each project, what every swept setting does
   (``tools/visualize.py``: its token groups, the baseline's and its prediction, and the
   difference) under ``<output>/pictures/<project>/``.

On a terminal, each training run and the sweep show a progress bar with its ETA; in a log
(no terminal) there are plain lines at the start and the end of every stage instead.

Every step resumes: data already written, a finished training and swept points are kept,
so a rerun only completes what is missing.

    python tools/demo.py [--output-dir output/demo] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from expedit_d2.cli import HelpFormatter  # noqa: E402
from expedit_d2.progress import is_terminal  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

logger = logging.getLogger("expedit_d2.demo")

DEMOS = (  # (name, project, sweep file)
    ("mask2former", "projects/Mask2Former", "configs/sweeps/demo_mask2former.yaml"),
    ("dpt", "projects/DPT", "configs/sweeps/demo_dpt.yaml"),
)


def write_data(root: Path) -> None:
    from datasets.prepare_nyuv2 import main as prepare_nyuv2
    from expedit_d2.synthetic import write_coco, write_nyuv2_mat

    write_coco(root, {"train": 48, "val": 8}, height=256, width=384, seed=0)
    if not (root / "nyuv2" / "test.json").exists():
        raw = root / "nyuv2_raw"
        labeled, splits, _, _ = write_nyuv2_mat(raw, n=40, n_test=8, seed=0, scenes=True)
        prepare_nyuv2(["--labeled", str(labeled), "--splits", str(splits), "--root", str(root)])


def train(project: str, config: str, out: Path, device: str) -> Path:
    """``train_net.py`` of the project (resumed if it was interrupted); returns the weights."""
    final = out / "model_final.pth"
    if final.exists():
        logger.info(f"{project}: trained model found ({final})")
        return final
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(REPO / project / "train_net.py"), "--config-file", str(REPO / config), "--resume",
           "MODEL.DEVICE", device, "OUTPUT_DIR", str(out)]
    logger.info(f"{project}: training from scratch ({' '.join(cmd[1:])}), log in {out / 'log.txt'}")
    t0 = time.time()
    # on a terminal the child's stderr is ours, so that its progress bar (TrainingProgress) shows
    # here; otherwise everything goes to the log file, as the child's bar stays off there
    on_terminal = is_terminal(sys.stderr)
    with open(out / "stdout.txt", "a") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=None if on_terminal else subprocess.STDOUT)
    if proc.returncode != 0 or not final.exists():
        where = f"{out / 'stdout.txt'}" + (" and the error above" if on_terminal else "")
        raise RuntimeError(f"training failed (exit {proc.returncode}); see {where}")
    logger.info(f"{project}: trained in {time.time() - t0:.0f} s")
    return final


def demo_image(name: str, data: Path) -> Path:
    """The first validation image of the project's synthetic dataset."""
    folder = data / ("coco/val2017" if name == "mask2former" else "nyuv2/test/rgb")
    images = sorted(folder.glob("*.png"))
    if not images:
        raise FileNotFoundError(f"no validation image in {folder}")
    return images[0]


def main(argv=None) -> int:
    from detectron2.utils.logger import setup_logger

    from expedit_d2.fileio import atomic_write
    from expedit_d2.sweep import SweepSpec, load_sweep_file, read_rows, run_sweep
    from tools.visualize import visualize

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--output-dir", type=Path, default=REPO / "output" / "demo")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--only", choices=[d[0] for d in DEMOS], action="append",
                        help="run only this demo (repeatable)")
    args = parser.parse_args(argv)
    setup_logger(name="expedit_d2")
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = args.output_dir.resolve()
    data = out / "datasets"
    os.environ["DETECTRON2_DATASETS"] = str(data)  # for this process and the subprocesses
    t0 = time.time()
    demos = [d for d in DEMOS if not args.only or d[0] in args.only]
    stages = 1 + 3 * len(demos)
    done = 0

    def stage(what: str) -> float:
        nonlocal done
        done += 1
        logger.info(f"stage {done}/{stages}: {what}")
        return time.time()

    started = stage(f"synthetic datasets in {data}")
    write_data(data)
    logger.info(f"synthetic datasets written ({time.time() - started:.0f} s)")
    tables = []
    for name, project, sweep_file in demos:
        sweep = load_sweep_file(REPO / sweep_file)
        config = sweep.pop("config_file")
        # a changed demo config trains (and sweeps) anew; an unchanged one resumes
        digest = hashlib.sha1((REPO / config).read_bytes() + device.encode()).hexdigest()[:8]
        stage(f"{name}: training ({project}/train_net.py)")
        weights = train(project, config, out / f"train_{name}_{digest}", device)
        opts = list(sweep.pop("opts", [])) + ["MODEL.DEVICE", device, "MODEL.WEIGHTS", str(weights)]
        spec = SweepSpec(config_file=str(REPO / config), opts=opts, **sweep)
        rows = read_rows(out / name)
        if rows and rows[0]["fingerprint"] != spec.fingerprint():
            logger.info(f"{out / name} holds an older demo sweep; starting it again")
            shutil.rmtree(out / name)
        started = stage(f"{name}: sweep of {len(spec.points)} settings and the baseline")
        run_sweep(spec, out / name)  # also (re)writes table.md and pareto.png
        logger.info(f"{name}: sweep done ({time.time() - started:.0f} s)")
        started = stage(f"{name}: pictures of each setting")
        drawn = visualize(REPO / config, [demo_image(name, data)], out / "pictures" / name, opts=opts,
                          points=spec.points)
        logger.info(f"{name}: {len(drawn)} pictures in {out / 'pictures' / name} ({time.time() - started:.0f} s)")
        links = "\n".join(f"![{p.setting}](pictures/{name}/{p.path.name})" for p in drawn)
        tables.append(f"## {name}\n\n" + (out / name / "table.md").read_text()
                      + f"\n![{name}]({name}/pareto.png)\n\nWhat each setting does to the tokens and the "
                      f"prediction on `{drawn[0].image.name}` (token groups, baseline, setting, difference):"
                      f"\n\n{links}\n")
    summary = out / "README.md"
    atomic_write(summary, "# expedit-d2 demo (synthetic data, small models trained from scratch)\n\n"
                 + "\n".join(tables))
    print("\n".join(tables))
    logger.info(f"demo done in {time.time() - t0:.0f} s: {summary}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("demo: interrupted; the data, trained models and finished sweep points are kept "
              "under --output-dir: run the same command again to resume", file=sys.stderr)
        sys.exit(130)
