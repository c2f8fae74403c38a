"""The shared sweep on synthetic COCO panoptic data (real formats, real evaluators): outputs,
resume after a kill, shards that merge to the unsharded table, validation before evaluation."""
import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from expedit_d2.engine import load_project
from expedit_d2.reduction.config import WRAPPER_BACKBONES
from expedit_d2.sweep import (SweepError, SweepSpec, expand_points, merge, read_rows, rows_from_csv,
                              rows_from_jsonl, run_sweep, write_report)
from tests.processes import process_group
from tests.project_opts import M2F_SMALL, M2F_TINY_CONFIG, ROOT

GRID = {"MODEL.EXPEDIT.CLUSTERING_LOCATION": [4, 6], "MODEL.EXPEDIT.NUM_CLUSTERS": [[3, 3]]}


def spec(weights, **kw):
    args = dict(config_file=M2F_TINY_CONFIG, input_size=(64, 96), grid=GRID, opts=M2F_SMALL + ["MODEL.WEIGHTS", weights],
                repeats=1, warmup=0, memory=False)
    args.update(kw)
    return SweepSpec(**args)


STABLE = ("point_id", "label", "baseline", "overrides", "metric", "metric_value", "metrics",
          "backbone_gmacs", "model_gmacs")


def stable(rows):
    return [{k: getattr(r, k) for k in STABLE} for r in rows]


def sweep_cmd(weights, out_dir, *flags):
    """The sweep of :func:`spec` (no memory measurement) as a command line, ``flags`` added."""
    return [sys.executable, "-m", "expedit_d2.sweep", "--config-file", M2F_TINY_CONFIG, "--input-size", "64", "96",
            "--output-dir", str(out_dir), "--repeats", "1", "--warmup", "0", "--no-memory",
            "--grid", "MODEL.EXPEDIT.CLUSTERING_LOCATION=[4, 6]", "--grid", "MODEL.EXPEDIT.NUM_CLUSTERS=[[3, 3]]",
            *flags, *M2F_SMALL, "MODEL.WEIGHTS", weights]


@pytest.fixture(scope="module")
def unsharded(synthetic_coco, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    rows = run_sweep(spec(synthetic_coco[1], memory=True), out, show_progress=False)
    return out, rows, synthetic_coco[1]


def test_sweep_writes_every_output(unsharded):
    out, rows, weights = unsharded
    assert [r.label for r in rows] == ["baseline", "a4_3x3", "a6_3x3"]
    assert [r.method for r in rows] == ["baseline", "expedit", "expedit"]
    base = rows[0]
    assert base.metric == "panoptic_seg/PQ" and base.speedup_vs_baseline == 1.0
    assert {"panoptic_seg/PQ", "sem_seg/mIoU", "segm/AP"} <= set(base.metrics)  # panoptic + instance
    for r in rows:
        assert 0 <= r.metric_value <= 100 and r.latency_ms > 0 and r.fps > 0
        assert r.peak_memory_mb is not None and r.peak_memory_mb > 0
        assert r.input_size == [64, 96] and r.versions["torch"] == torch.__version__
    # blocks after the clustering run on 3x3 clusters instead of padded 7x7 windows
    assert max(rows[1].backbone_gmacs, rows[2].backbone_gmacs) < base.backbone_gmacs
    assert rows[1].overrides == {"MODEL.EXPEDIT.CLUSTERING_LOCATION": 4, "MODEL.EXPEDIT.NUM_CLUSTERS": [3, 3]}
    lines = (out / "results.jsonl").read_text().splitlines()
    assert [json.loads(x)["point_id"] for x in lines] == [r.point_id for r in rows]
    assert read_rows(out) == rows  # the typed rows back from the file, field for field
    assert rows_from_csv((out / "results.csv").read_text()) == rows
    csv_lines = (out / "results.csv").read_text().splitlines()
    assert len(csv_lines) == 4 and csv_lines[0].startswith("order,point_id,label,method")
    table = (out / "table.md").read_text()
    assert "| a4_3x3 | expedit |" in table and "panoptic_seg/PQ" in table
    assert "Best setting of each method within no budget" in table and "| expedit | a" in table
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "points" / "baseline" / "eval_results.json").exists()
    # a rerun finds every point done
    assert run_sweep(spec(weights, memory=True), out, show_progress=False) == []


def test_budget_and_report(unsharded):
    out, rows, _ = unsharded
    lo = min(r.backbone_gmacs for r in rows)
    _, best = write_report(out, budget_gmacs=lo + 1e-9)
    assert best.backbone_gmacs == lo
    _, none = write_report(out, budget_gmacs=lo / 2)
    assert none is None and "none fits" in (out / "table.md").read_text()


def test_shard_processes_side_by_side_on_one_folder_merge_to_the_unsharded_table(synthetic_coco, unsharded, tmp_path,
                                                                                  caplog):
    """``--shard 0/2`` and ``--shard 1/2`` as two sweep processes running at once into one
    ``--output-dir`` (as two machines sharing a folder do), then ``--merge``: every point
    exactly once, with the one-process sweep's metrics and GMACs. A merge without one
    shard's file names the missing shard."""
    with contextlib.ExitStack() as stack:
        shards = [stack.enter_context(process_group(sweep_cmd(synthetic_coco[1], tmp_path, "--shard", f"{i}/2"),
                                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
                  for i in range(2)]
        errs = [p.communicate(timeout=600)[1] for p in shards]
    assert [p.returncode for p in shards] == [0, 0], "\n".join(e[-3000:] for e in errs)
    by_shard = [rows_from_jsonl((tmp_path / f"results.shard-{i}-of-2.jsonl").read_text()) for i in range(2)]
    assert [[r.label for r in rows] for rows in by_shard] == [["baseline", "a6_3x3"], ["a4_3x3"]]
    assert [{r.shard for r in rows} for rows in by_shard] == [{"0/2"}, {"1/2"}]
    merged = subprocess.run([sys.executable, "-m", "expedit_d2.sweep", "--merge", "--output-dir", str(tmp_path)],
                            capture_output=True, text=True)
    assert merged.returncode == 0, merged.stderr[-3000:]
    rows = rows_from_jsonl((tmp_path / "results.jsonl").read_text())
    assert [r.label for r in rows] == ["baseline", "a4_3x3", "a6_3x3"]  # each once, in sweep order
    assert stable(rows) == stable(read_rows(unsharded[0]))
    assert rows_from_csv((tmp_path / "results.csv").read_text()) == rows
    table = (tmp_path / "table.md").read_text().split("\n| point | method |", 1)[1].split("\n\n")[0]
    assert [line.split(" | ")[0] for line in table.splitlines()[2:]] == ["| baseline", "| a4_3x3", "| a6_3x3"]
    assert len(list((tmp_path / "points").glob("*/eval_results.json"))) == 3  # each point evaluated once
    assert not list(tmp_path.glob("*.tmp"))  # no temporary file left by the concurrent writers
    assert stable(read_rows(tmp_path)) == stable(rows)  # merged file + shards' files: no duplicates
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(tmp_path / "results.shard-0-of-2.jsonl", partial)
    sweep_logger = logging.getLogger("expedit_d2.sweep")
    sweep_logger.addHandler(caplog.handler)  # whether or not a logger set-up stopped its propagation
    try:
        assert [r.label for r in merge(partial)] == ["baseline", "a6_3x3"]
    finally:
        sweep_logger.removeHandler(caplog.handler)
    assert f"no results from shard(s) 1/2 in {partial}" in caplog.text


def test_killed_sweep_resumes_without_redoing_points(synthetic_coco, tmp_path):
    weights = synthetic_coco[1]
    cmd = sweep_cmd(weights, tmp_path)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    results = tmp_path / "results.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if results.exists() and len(results.read_text().splitlines()) >= 1:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the sweep finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # the sweep and its evaluation subprocess
    proc.wait()
    first = read_rows(tmp_path)
    assert 1 <= len(first) < 3
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = read_rows(tmp_path)
    assert [r.label for r in rows] == ["baseline", "a4_3x3", "a6_3x3"]
    assert [json.loads(x)["point_id"] for x in results.read_text().splitlines()] == [r.point_id for r in rows]
    assert rows[: len(first)] == first  # finished points were not redone
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("grid, message", [
    ({"MODEL.EXPEDIT.NOT_A_KEY": [1]}, "MODEL.EXPEDIT.NOT_A_KEY"),
    ({"MODEL.EXPEDIT.CLUSTERING_LOCATION": [4, 99], "MODEL.EXPEDIT.NUM_CLUSTERS": [[3, 3]]},
     "CLUSTERING_LOCATION=99"),
    ({"MODEL.EXPEDIT.CLUSTERING_LOCATION": [4], "MODEL.EXPEDIT.NUM_CLUSTERS": [[3, 3], [9, 9]]},
     r"NUM_CLUSTERS=\[9, 9\]"),
    ({"MODEL.SWIN.TOKEN_CLUSTERING_BLOCK.NUM_SPIXELS": [10]}, "NUM_SPIXELS=10"),
])
def test_bad_grid_values_fail_before_any_evaluation(synthetic_coco, tmp_path, grid, message):
    with pytest.raises(SweepError, match=message):
        run_sweep(spec(synthetic_coco[1], grid=grid), tmp_path, show_progress=False)
    assert not (tmp_path / "points").exists() and not list(tmp_path.glob("results*"))


def test_cluster_grid_with_more_clusters_than_tokens_is_named(tmp_path):
    """DPT/ViT: 480x640 gives a 30x40 token grid (1200 tokens); 36x36 clusters are more."""
    s = SweepSpec(config_file=str(ROOT / "projects/DPT/configs/demo/tiny_vit_nyuv2.yaml"), input_size=(480, 640),
                  grid={"MODEL.EXPEDIT.CLUSTERING_LOCATION": [1], "MODEL.EXPEDIT.NUM_CLUSTERS": [[16, 16], [36, 36]]},
                  opts=["MODEL.DEVICE", "cpu"])
    with pytest.raises(SweepError, match=r"NUM_CLUSTERS=\[36, 36\] makes more clusters \(1296\) than this input's token grid \[30, 40\]"):
        run_sweep(s, tmp_path, show_progress=False)
    assert not (tmp_path / "points").exists()


def test_points_and_aliases():
    s = SweepSpec(config_file=M2F_TINY_CONFIG, input_size=(64, 96),
                  grid={"MODEL.SWIN.CLUSTERING_LOCATION": [4], "MODEL.SWIN.TOKEN_CLUSTERING_BLOCK.NUM_SPIXELS": [16, 9]},
                  points=[{"MODEL.EXPEDIT.CLUSTERING_LOCATION": 4, "MODEL.EXPEDIT.NUM_CLUSTERS": [4, 4]}])
    points = expand_points(s)
    assert [p.label for p in points] == ["baseline", "a4_4x4", "a4_3x3"]  # the explicit point is a duplicate
    assert s.project == str(ROOT / "projects/Mask2Former")
    with pytest.raises(SweepError, match="input_size"):
        SweepSpec(config_file=M2F_TINY_CONFIG, input_size=(64,))
    with pytest.raises(SweepError, match="config file not found"):
        SweepSpec(config_file="nope.yaml", input_size=(64, 96))


def test_output_dir_of_another_sweep_is_refused(synthetic_coco, unsharded):
    with pytest.raises(SweepError, match="different sweep"):
        run_sweep(spec(synthetic_coco[1], input_size=(96, 96)), unsharded[0], show_progress=False)


@pytest.mark.parametrize("sweep_file", sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs/sweeps").glob("*.yaml")))
def test_shipped_sweep_files_validate(sweep_file, monkeypatch):
    """Every point of every shipped sweep file builds and fits its input (meta device)."""
    from expedit_d2.sweep import load_sweep_file, validate_points

    monkeypatch.chdir(ROOT)
    s = SweepSpec(**load_sweep_file(sweep_file))
    points = expand_points(s)
    assert points[0].baseline and len(points) >= 5
    cfgs = validate_points(load_project(s.project), s, points)
    base_cfg = cfgs["baseline"][0]
    name = base_cfg.MODEL.BACKBONE.NAME
    assert name != "D2HourglassSwinTransformer" and not (name in WRAPPER_BACKBONES and base_cfg.MODEL.EXPEDIT.ENABLED)
    for p in points[1:]:
        cfg, overrides = cfgs[p.id][0], dict(p.overrides)
        assert cfg.MODEL.BACKBONE.NAME == "TokenReductionBackbone" and cfg.MODEL.TOKEN_REDUCTION.METHOD == p.method
        if p.method == "expedit":
            assert cfg.MODEL.EXPEDIT.ENABLED
            assert cfg.MODEL.EXPEDIT.CLUSTERING_LOCATION == overrides["MODEL.EXPEDIT.CLUSTERING_LOCATION"]
        for key, value in overrides.items():  # every override reached the config
            node = cfg
            for part in key.split("."):
                node = node[part]
            assert node == (tuple(value) if isinstance(value, list) and isinstance(node, tuple) else value), key


def test_command_line_errors_exit_2_naming_the_value(tmp_path):
    base = [sys.executable, "-m", "expedit_d2.sweep", "--output-dir", str(tmp_path)]
    out = subprocess.run(base + ["--config-file", "nope.yaml", "--input-size", "8", "8"], capture_output=True, text=True)
    assert out.returncode == 2 and "config file not found: nope.yaml" in out.stderr
    out = subprocess.run(base + ["--config-file", M2F_TINY_CONFIG, "--input-size", "8", "8", "--grid", "MODEL.EXPEDIT.WINDOW=3"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "--grid 'MODEL.EXPEDIT.WINDOW=3': the values must be a list" in out.stderr
    out = subprocess.run(base + ["--merge"], capture_output=True, text=True)
    assert out.returncode == 2 and "no results*.jsonl rows" in out.stderr


def test_second_sweep_on_a_busy_output_dir_refuses_and_ctrl_c_says_how_to_resume(synthetic_coco, tmp_path):
    """Two real sweep processes on one --output-dir: the second refuses at once naming the
    holder (before, both evaluated the baseline and rows were lost); Ctrl-C on the first
    prints one line on what was kept and how to resume, no traceback."""
    weights = synthetic_coco[1]
    cmd = sweep_cmd(weights, tmp_path)
    # enough points that the first sweep is still running after the second one's start-up
    # (imports alone take seconds, and longer on a loaded machine)
    first_cmd = [c if c != "MODEL.EXPEDIT.NUM_CLUSTERS=[[3, 3]]" else
                 "MODEL.EXPEDIT.NUM_CLUSTERS=[[3, 3], [2, 2]]"
                 for c in cmd]
    lock = tmp_path / ".results.lock"
    with process_group(first_cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) as first:
        deadline = time.time() + 120
        while time.time() < deadline and first.poll() is None and not (lock.exists() and lock.read_text()):
            time.sleep(0.2)
        assert first.poll() is None and f"pid {first.pid}" in lock.read_text()
        other_grid = [c if c != "MODEL.EXPEDIT.CLUSTERING_LOCATION=[4, 6]" else "MODEL.EXPEDIT.CLUSTERING_LOCATION=[2]"
                      for c in cmd]
        second = subprocess.run(other_grid, capture_output=True, text=True)
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"is in use by another sweep (pid {first.pid} on " in second.stderr
        assert first.poll() is None  # the first one was not disturbed
        os.killpg(first.pid, signal.SIGINT)  # Ctrl-C in a terminal reaches the whole group
        err = first.communicate(timeout=120)[1]
    assert first.returncode == 130
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("sweep: interrupted; every finished point is kept")
    from expedit_d2.sweep import output_lock

    with output_lock(tmp_path):  # released with the process
        assert f"pid {os.getpid()}" in lock.read_text()


def test_config_without_test_dataset_fails_before_any_evaluation(synthetic_coco, tmp_path):
    with pytest.raises(SweepError, match=r"the config has no DATASETS.TEST"):
        run_sweep(spec(synthetic_coco[1], opts=M2F_SMALL + ["MODEL.WEIGHTS", synthetic_coco[1], "DATASETS.TEST", "()"]),
                  tmp_path, show_progress=False)
    with pytest.raises(SweepError, match=r"DATASETS.TEST names \['no_such_val'\], not registered"):
        run_sweep(spec(synthetic_coco[1], opts=M2F_SMALL + ["MODEL.WEIGHTS", synthetic_coco[1], "DATASETS.TEST", "('no_such_val',)"]),
                  tmp_path, show_progress=False)
    assert not (tmp_path / "points").exists() and not read_rows(tmp_path)
