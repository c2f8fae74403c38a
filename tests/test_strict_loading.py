"""--eval-only evaluates the weights it was given or fails naming the file and the keys:
no MODEL.WEIGHTS, a missing, truncated or corrupt file, a checkpoint of another model (other
depth, renamed key, other shape) are errors; rebuilt buffers may be absent;
--allow-partial-weights evaluates a partial load; training stays lenient; the sweep (and its
per point subprocess) fails the same way."""
import json
import pickle
import re
import sys

import numpy as np
import pytest
import torch

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog, MetadataCatalog

from datasets.prepare_nyuv2 import main as prepare_nyuv2
from expedit_d2.checkpoint import REBUILT_BUFFERS, WeightsError, WeightsNotFoundError, load_weights
from expedit_d2.engine import EVAL_RESULTS, argument_parser
from expedit_d2.synthetic import write_nyuv2_mat
from tests.d2_helpers import load_train_net
from tests.project_opts import DEPTH_METRICS, DPT_TINY_OPTS, M2F_SMALL, M2F_TINY_CONFIG, ROOT, TINY_SWIN
from tests.reference_keys import official_dpt_names

DPT_CONFIG = str(ROOT / "projects/DPT/configs/dpt_hybrid_nyuv2.yaml")
NYU = "strict_loading_nyuv2"  # registered here, so no other test's registration is reused


def dpt_args(tmp_path, *opts, flags=("--eval-only",)):
    return argument_parser().parse_args(["--config-file", DPT_CONFIG, *flags, *DPT_TINY_OPTS,
                                         "DATASETS.TRAIN", f"('{NYU}',)", "DATASETS.TEST", f"('{NYU}',)",
                                         "OUTPUT_DIR", str(tmp_path), *opts])


@pytest.fixture(scope="module")
def dpt():
    return load_train_net("DPT")


@pytest.fixture(scope="module")
def nyu(tmp_path_factory):
    """Synthetic NYUv2 (official .mat -> prepare script), registered as ``NYU``."""
    from dpt import load_nyuv2

    folder = tmp_path_factory.mktemp("nyu")
    labeled, splits, _, _ = write_nyuv2_mat(folder)
    prepare_nyuv2(["--labeled", str(labeled), "--splits", str(splits), "--root", str(folder / "d2")])
    if NYU in DatasetCatalog.list():
        DatasetCatalog.remove(NYU)
        MetadataCatalog.remove(NYU)
    DatasetCatalog.register(NYU, lambda: load_nyuv2(folder / "d2", "test"))
    MetadataCatalog.get(NYU).set(evaluator_type="depth", min_depth=1e-3, max_depth=10.0, eval_crop="nyu_eigen")
    return NYU


@pytest.fixture(scope="module")
def dpt_weights(dpt, tmp_path_factory):
    """The tiny DPT-Hybrid's state as Detectron2's checkpointer saves it, and the state."""
    folder = tmp_path_factory.mktemp("dpt_weights")
    cfg = dpt.setup(dpt_args(folder))
    torch.manual_seed(0)
    model = dpt.Trainer.build_model(cfg)
    DetectionCheckpointer(model, save_dir=str(folder)).save("model_final")
    return folder / "model_final.pth", {k: v.clone() for k, v in model.state_dict().items()}


def save_pth(path, state):
    torch.save({"model": state}, path)
    return path


# --------------------------------------------------------------------------------------
# what fails, and what the error names
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags", [("--eval-only",), ("--eval-only", "--allow-partial-weights")])
def test_no_weights_names_the_config_key(dpt, tmp_path, flags):
    with pytest.raises(WeightsError, match="evaluation needs trained weights but MODEL.WEIGHTS is empty"):
        dpt.main(dpt_args(tmp_path, "MODEL.WEIGHTS", "", flags=flags))
    assert not (tmp_path / EVAL_RESULTS).exists()


def test_missing_file_names_the_path(dpt, tmp_path):
    missing = tmp_path / "nope" / "model_final.pth"
    message = f"MODEL.WEIGHTS: checkpoint file not found: {re.escape(str(missing))}$"
    with pytest.raises(WeightsNotFoundError, match=message):
        dpt.main(dpt_args(tmp_path, "MODEL.WEIGHTS", str(missing), flags=("--eval-only", "--allow-partial-weights")))
    assert issubclass(WeightsNotFoundError, FileNotFoundError)


@pytest.mark.parametrize("suffix", [".pth", ".pkl"])
def test_truncated_checkpoint_names_the_file(dpt, dpt_weights, tmp_path, suffix):
    path, state = dpt_weights
    whole = tmp_path / f"whole{suffix}"
    if suffix == ".pkl":  # model-zoo format: numpy arrays, read by Detectron2's pickle path
        with open(whole, "wb") as f:
            pickle.dump({"model": {k: v.numpy() for k, v in state.items()}, "__author__": "test"}, f)
    else:
        whole.write_bytes(path.read_bytes())
    data = whole.read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(data[: len(data) // 2])
    load_weights(dpt.Checkpointer(dpt.Trainer.build_model(dpt.setup(dpt_args(tmp_path)))), str(whole))  # intact: loads
    with pytest.raises(WeightsError, match=f"cannot read checkpoint {re.escape(str(cut))} "
                                           r"\(truncated, corrupt or not a checkpoint\?\)") as e:
        dpt.main(dpt_args(tmp_path, "MODEL.WEIGHTS", str(cut), flags=("--eval-only", "--allow-partial-weights")))
    assert e.value.__cause__ is not None  # the reader's own exception is chained
    garbage = tmp_path / f"garbage{suffix}"
    garbage.write_bytes(b"not a checkpoint at all" * 10)
    with pytest.raises(WeightsError, match=f"cannot read checkpoint {re.escape(str(garbage))}"):
        dpt.main(dpt_args(tmp_path, "MODEL.WEIGHTS", str(garbage)))


def test_official_dpt_file_with_a_renamed_key(dpt, tmp_path, dpt_cfg, seeded_dpt):
    """An official-names .pt (through DPTCheckpointer's key map) with one key renamed: the
    model's key is missing and the file's is unexpected; both are named with their counts."""
    official = official_dpt_names(seeded_dpt(dpt_cfg(hybrid=True)))
    old = "scratch.output_conv.0.weight"
    official["scratch.output_conv.0.weight_v2"] = official.pop(old)
    path = tmp_path / "dpt_official_renamed.pt"
    torch.save(official, path)
    with pytest.raises(WeightsError) as e:
        dpt.main(dpt_args(tmp_path, "MODEL.WEIGHTS", str(path)))
    msg = str(e.value)
    assert f"checkpoint {path} does not match the model (DPTDepth)" in msg
    assert f"1 missing key (in the model, not in the file): {old};" in msg
    assert "1 unexpected key (in the file, not in the model): scratch.output_conv.0.weight_v2." in msg
    assert "--allow-partial-weights" in msg and "shape" not in msg


def test_shape_mismatch_is_named(dpt, dpt_weights, tmp_path):
    """Weights of a 96-pixel ViT into a 64-pixel one: only pos_embed differs, and it is
    named with both shapes (not also counted as missing)."""
    with pytest.raises(WeightsError) as e:
        dpt.main(dpt_args(tmp_path, "MODEL.WEIGHTS", str(dpt_weights[0]), "MODEL.VIT.IMG_SIZE", "64"))
    msg = str(e.value)
    assert f"checkpoint {dpt_weights[0]} does not match the model" in msg
    assert "1 shape mismatch: backbone.pos_embed [1, 37, 32] in the file vs [1, 17, 32] in the model." in msg
    assert "missing key" not in msg and "unexpected key" not in msg


def test_swin_of_other_depths_names_the_first_keys(tmp_path):
    """A Mask2Former checkpoint of a deeper Swin (stage 3: 4 blocks) into a shallower one (2)."""
    m2f = load_train_net("Mask2Former")

    def args(*opts):
        return argument_parser().parse_args(["--config-file", M2F_TINY_CONFIG, "--eval-only", *M2F_SMALL,
                                             "OUTPUT_DIR", str(tmp_path), *opts])

    deeper = m2f.Trainer.build_model(m2f.setup(args("MODEL.SWIN.DEPTHS", "[2, 2, 4, 2]")))
    extra = [k for k in deeper.state_dict() if re.match(r"backbone\.layers\.2\.blocks\.[23]\.", k)
             and not k.endswith("relative_position_index")]
    path = save_pth(tmp_path / "deeper_swin.pth", deeper.state_dict())
    with pytest.raises(WeightsError) as e:
        m2f.main(args("MODEL.WEIGHTS", str(path)))
    msg = str(e.value)
    assert f"checkpoint {path} does not match the model (MaskFormer)" in msg
    assert (f"{len(extra)} unexpected keys (in the file, not in the model): {', '.join(extra[:5])}, ... "
            f"({len(extra) - 5} more)") in msg
    assert "missing key" not in msg


# --------------------------------------------------------------------------------------
# what loads
# --------------------------------------------------------------------------------------
def test_rebuilt_buffers_may_be_absent(tmp_path):
    """An official-format .pkl without relative_position_index (rebuilt from the window size)
    loads strictly through Detectron2's .pkl path; every tensor it holds is in the model."""
    m2f = load_train_net("Mask2Former")
    cfg = m2f.setup(argument_parser().parse_args(["--config-file", M2F_TINY_CONFIG, *M2F_SMALL,
                                                  "OUTPUT_DIR", str(tmp_path)]))
    torch.manual_seed(0)
    src = m2f.Trainer.build_model(cfg).state_dict()
    dropped = [k for k in src if k.endswith("relative_position_index")]
    assert dropped and "relative_position_index" in REBUILT_BUFFERS
    path = tmp_path / "model_final.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": {k: v.numpy() for k, v in src.items() if k not in dropped}, "__author__": "test"}, f)
    torch.manual_seed(1)
    model = m2f.Trainer.build_model(cfg)
    load_weights(m2f.Checkpointer(model), str(path))
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in src.items())  # rebuilt index equals the saved one
    # a stale persistent-buffer copy of pixel_mean (older Detectron2 files) is not "another model"
    save_pth(tmp_path / "with_pixel_mean.pth", {**src, "pixel_mean": torch.zeros(3, 1, 1)})
    load_weights(m2f.Checkpointer(model), str(tmp_path / "with_pixel_mean.pth"))
    assert torch.allclose(model.pixel_mean.flatten(), torch.tensor(cfg.MODEL.PIXEL_MEAN))  # from the config


def test_partial_flag_evaluates_a_partial_load(dpt, nyu, dpt_weights, tmp_path):
    path, state = dpt_weights
    dropped = [k for k in state if k.startswith("scratch.output_conv.")]
    partial = save_pth(tmp_path / "partial.pth", {k: v for k, v in state.items() if k not in dropped})
    with pytest.raises(WeightsError, match=f"{len(dropped)} missing keys .*{re.escape(dropped[0])}"):
        dpt.main(dpt_args(tmp_path / "strict", "MODEL.WEIGHTS", str(partial)))
    res = dpt.main(dpt_args(tmp_path / "partial", "MODEL.WEIGHTS", str(partial),
                            flags=("--eval-only", "--allow-partial-weights")))
    assert set(res["depth"]) == DEPTH_METRICS and all(np.isfinite(v) for v in res["depth"].values())
    assert json.loads((tmp_path / "partial" / EVAL_RESULTS).read_text()) == res
    log = (tmp_path / "partial" / "log.txt").read_text()  # Detectron2's log of the run
    warned = [line for line in log.splitlines() if "--allow-partial-weights: evaluating a partial load" in line]
    assert len(warned) == 1 and str(partial) in warned[0] and dropped[0] in warned[0]


def test_resume_evaluates_the_last_checkpoint(dpt, nyu, dpt_weights, tmp_path):
    """--eval-only --resume loads OUTPUT_DIR/last_checkpoint (our own files are complete),
    whatever MODEL.WEIGHTS says; without one, MODEL.WEIGHTS is still required."""
    with pytest.raises(WeightsError, match="MODEL.WEIGHTS is empty"):
        dpt.main(dpt_args(tmp_path, "MODEL.WEIGHTS", "", flags=("--eval-only", "--resume")))
    model = dpt.Trainer.build_model(dpt.setup(dpt_args(tmp_path)))
    model.load_state_dict(dpt_weights[1])
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("model_0000009")
    res = dpt.main(dpt_args(tmp_path, "MODEL.WEIGHTS", "", flags=("--eval-only", "--resume")))
    assert set(res["depth"]) == DEPTH_METRICS
    (tmp_path / "last_checkpoint").write_text("model_gone.pth")
    with pytest.raises(WeightsNotFoundError, match=r"last_checkpoint \(--resume\): checkpoint file not found: "
                                                   f"{re.escape(str(tmp_path / 'model_gone.pth'))}"):
        dpt.main(dpt_args(tmp_path, "MODEL.WEIGHTS", "", flags=("--eval-only", "--resume")))


def test_training_still_starts_from_a_partial_checkpoint(dpt, nyu, dpt_weights, tmp_path):
    """Without --eval-only, Detectron2's lenient loading: a backbone-only file initialises the
    backbone (learning rate 0: the saved model still holds exactly those weights)."""
    _, state = dpt_weights
    backbone = save_pth(tmp_path / "backbone_only.pth", {k: v for k, v in state.items() if k.startswith("backbone.")})
    out = tmp_path / "train"
    dpt.main(dpt_args(out, "MODEL.WEIGHTS", str(backbone), "SOLVER.MAX_ITER", "1", "SOLVER.IMS_PER_BATCH", "1",
                      "SOLVER.BASE_LR", "0.0", "TEST.EVAL_PERIOD", "0", "SOLVER.CHECKPOINT_PERIOD", "100",
                      "DATASETS.TEST", "()", flags=()))
    final = torch.load(out / "model_final.pth", map_location="cpu")["model"]
    assert all(torch.equal(final[k], v) for k, v in state.items() if k.startswith("backbone."))


# --------------------------------------------------------------------------------------
# the sweep
# --------------------------------------------------------------------------------------
def sweep_spec(weights, **kw):
    from expedit_d2.sweep import SweepSpec

    args = dict(config_file=M2F_TINY_CONFIG, input_size=(64, 96), grid={},
                opts=M2F_SMALL + ["MODEL.WEIGHTS", str(weights)], repeats=1, warmup=0, memory=False, timing=False)
    args.update(kw)
    return SweepSpec(**args)


@pytest.fixture(scope="module")
def partial_m2f(synthetic_coco, tmp_path_factory):
    """The sweep's tiny Mask2Former weights without the class head."""
    state = torch.load(synthetic_coco[1], map_location="cpu")["model"]
    dropped = [k for k in state if k.startswith("sem_seg_head.predictor.class_embed.")]
    path = save_pth(tmp_path_factory.mktemp("partial") / "no_class_head.pth",
                    {k: v for k, v in state.items() if k not in dropped})
    return path, dropped


def test_sweep_checks_the_weights_before_any_evaluation(partial_m2f, tmp_path, monkeypatch, capsys):
    from expedit_d2.sweep import cli, run_sweep

    path, dropped = partial_m2f
    with pytest.raises(WeightsError, match=f"checkpoint {re.escape(str(path))} does not match the model "
                                           rf"\(MaskFormer\): 2 missing keys .*{re.escape(dropped[0])}"):
        run_sweep(sweep_spec(path), tmp_path, show_progress=False)
    with pytest.raises(WeightsError, match="MODEL.WEIGHTS is empty"):
        run_sweep(sweep_spec(""), tmp_path, show_progress=False)
    assert not (tmp_path / "points").exists() and not list(tmp_path.glob("results*"))
    # the command line: one line naming the file and keys, exit status 2
    monkeypatch.setattr(sys, "argv", ["sweep", "--config-file", M2F_TINY_CONFIG, "--input-size", "64", "96",
                                      "--output-dir", str(tmp_path), *M2F_SMALL, "MODEL.WEIGHTS", str(path)])
    with pytest.raises(SystemExit) as e:
        cli()
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("sweep: error: ")]
    assert e.value.code == 2 and len(errors) == 1
    assert errors[0].startswith(f"sweep: error: MODEL.WEIGHTS: checkpoint {path} does not match")
    assert dropped[0] in errors[0]


def test_point_evaluation_surfaces_the_childs_weights_error(partial_m2f, tmp_path):
    """train_net.py --eval-only in the subprocess fails; the sweep's error is the child's own
    (file and keys), with the command and the log, not a bare exit status."""
    from expedit_d2.sweep import evaluate_point

    path, dropped = partial_m2f
    s = sweep_spec(path)
    with pytest.raises(WeightsError) as e:
        evaluate_point(s.project, s, [], tmp_path / "baseline", 1)
    msg = str(e.value)
    assert msg.startswith(f"point baseline: MODEL.WEIGHTS: checkpoint {path} does not match the model (MaskFormer): "
                          f"2 missing keys (in the model, not in the file): {dropped[0]}, {dropped[1]}.")
    assert f"log: {tmp_path / 'baseline' / 'stdout.txt'}" in msg and "--eval-only" in msg
    assert "--allow-partial-weights" not in msg.split("command:")[1]


def test_sweep_passes_the_partial_flag_on(partial_m2f, tmp_path):
    from expedit_d2.sweep import read_rows, run_sweep

    path, dropped = partial_m2f
    rows = run_sweep(sweep_spec(path, allow_partial_weights=True), tmp_path, show_progress=False)
    assert [r["label"] for r in rows] == ["baseline"] and 0 <= rows[0]["metric_value"] <= 100
    assert read_rows(tmp_path) == rows
    log = (tmp_path / "points" / "baseline" / "stdout.txt").read_text()
    assert "--allow-partial-weights: evaluating a partial load of" in log and dropped[0] in log


def test_child_exception_is_the_last_traceback():
    from expedit_d2.sweep import child_exception

    log = ("[INFO] starting\nTraceback (most recent call last):\n  File \"a.py\", line 1, in <module>\n"
           "    f()\n    ^^^\nOSError: inner\n\nThe above exception was the direct cause of the following "
           "exception:\n\nTraceback (most recent call last):\n  File \"b.py\", line 2, in g\n    raise X\n"
           "expedit_d2.checkpoint.WeightsError: MODEL.WEIGHTS: cannot read checkpoint /w.pth: two\nlines\n")
    assert child_exception(log) == "expedit_d2.checkpoint.WeightsError: MODEL.WEIGHTS: cannot read checkpoint " \
                                   "/w.pth: two\nlines"
    assert child_exception("no traceback here") is None


# --------------------------------------------------------------------------------------
# tools/benchmark_backbone.py: given weights load strictly into the backbone
# --------------------------------------------------------------------------------------
def test_benchmark_backbone_weights_are_strict(tmp_path):
    from detectron2.modeling import build_backbone

    from expedit_d2.benchmark.backbone import build_pair
    from expedit_d2.benchmark.cases import swin_l_cfg

    def cfg(*opts):
        c = swin_l_cfg()
        c.merge_from_list([*TINY_SWIN, "MODEL.DEVICE", "cpu", *opts])
        return c

    torch.manual_seed(1)  # build_pair seeds 0: loaded weights differ from its own
    src = build_backbone(cfg()).state_dict()
    whole = save_pth(tmp_path / "whole_model.pth", {**{f"backbone.{k}": v for k, v in src.items()},
                                                    "sem_seg_head.predictor.class_embed.weight": torch.zeros(3, 4)})
    base, expedited = build_pair(cfg("MODEL.WEIGHTS", str(whole)))  # the head's keys are not the backbone's
    assert all(torch.equal(base.state_dict()[k], v) and torch.equal(expedited.state_dict()[k], v)
               for k, v in src.items())
    shallower = save_pth(tmp_path / "shallower.pth", {f"backbone.{k}": v for k, v in build_backbone(
        cfg("MODEL.SWIN.DEPTHS", "[2, 2, 2, 2]")).state_dict().items()})
    message = (rf"checkpoint {re.escape(str(shallower))} does not match the model \(backbone: ExpeditD2SwinTransformer\): "
               r"\d+ missing keys \(in the model, not in the file\): backbone\.layers\.2\.blocks\.2\.norm1\.weight")
    with pytest.raises(WeightsError, match=message):
        build_pair(cfg("MODEL.WEIGHTS", str(shallower)))
    build_pair(cfg("MODEL.WEIGHTS", str(shallower)), allow_partial=True)
