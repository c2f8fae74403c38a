"""What every command shows a user: --help with defaults, no deprecation noise on start."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(rel):
    if rel.startswith("expedit_d2/"):  # a package module: imported by name
        return importlib.import_module(rel[:-3].replace("/", "."))
    spec = importlib.util.spec_from_file_location("_cli_" + Path(rel).stem, ROOT / rel)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("script, expected", [
    ("datasets/prepare_nyuv2.py", ["--root ROOT", "(default: "]),
    ("datasets/prepare_ade20k_sem_seg.py", ["--root ROOT", "(default: ", "ADEChallengeData2016"]),
    ("datasets/prepare_ade20k_pan_ins_seg.py", ["(default: ", "ADEChallengeData2016", "(default: ['train', 'val'])"]),
    ("datasets/prepare_coco_semantic_annos_from_panoptic_annos.py", ["(default: ", "coco"]),
    ("tools/demo.py", ["--output-dir", "(default: ", "output/demo"]),
    ("tools/analyze_model.py", ["(default: [1024, 1024])", "(default: ['flop'])"]),
    ("tools/benchmark_ops.py", ["--repeats REPEATS", "(default: 5)", "(default: 256.0)"]),
    ("tools/benchmark_backbone.py", ["--repeats REPEATS", "(default: 3)", "untimed calls first (default: 1)"]),
    ("tools/benchmark_head.py", ["(default: 5)", "(default: [640, 1024])", "autocast dtype (default: off)",
                                 "(default: ['deform_attn', 'decoder', 'inference'])"]),
    ("tools/benchmark_model.py", ["--input-size H W", "(default: 3)", "autocast dtype (default: off)"]),
    ("tools/export_onnx.py", ["--input-size H W", "(default: backbone)", "(default: 0.0001)", "(default: 5)"]),
    ("expedit_d2/sweep.py", ["(default: output/sweep)", "(default: the sweep file's, else 5)",
                             "(default: the sweep file's, else 2)"]),
])
def test_help_shows_defaults(script, expected, capsys):
    with pytest.raises(SystemExit) as e:
        _load(script).main(["--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps long lines
    for text in expected:
        assert text in out, (script, text, out)


def test_importing_the_package_prints_no_torch_jit_deprecation():
    """Detectron2 and fvcore script functions at import; torch then warns twice on every
    start that torch.jit.script is deprecated. expedit_d2 imports them with it silenced."""
    code = "import expedit_d2, detectron2.engine, detectron2.evaluation, detectron2.data"
    run = subprocess.run([sys.executable, "-W", "error::FutureWarning", "-c", code],
                         capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]


@pytest.mark.parametrize("project", ["DPT", "Mask2Former"])
def test_train_net_help_starts_without_deprecation_warnings(project):
    run = subprocess.run([sys.executable, "-W", "error::FutureWarning",
                          str(ROOT / "projects" / project / "train_net.py"), "--help"],
                         capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "--eval-only" in run.stdout and "Warning" not in run.stderr


def test_amp_argument_and_autocast_context():
    import argparse

    import torch

    from expedit_d2.cli import add_amp_argument, autocast

    parser = argparse.ArgumentParser()
    add_amp_argument(parser)
    assert parser.parse_args([]).amp is None and parser.parse_args(["--amp", "bf16"]).amp == "bf16"
    with pytest.raises(SystemExit):
        parser.parse_args(["--amp", "fp8"])
    a = torch.randn(4, 4)
    with autocast("cpu", "bf16"):
        assert (a @ a).dtype == torch.bfloat16
    with autocast("cpu", None):
        assert (a @ a).dtype == torch.float32
