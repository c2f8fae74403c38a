"""The sweep's typed rows, per-method report, point translation and project protocol, without
running a model: rows are built by hand; configs are only built, never run."""
import json
import types
from pathlib import Path

import pytest
from PIL import Image

from detectron2.engine import default_argument_parser
from expedit_d2.engine import load_project
from expedit_d2.sweep.protocol import SweepProtocol, sweep_protocol
from expedit_d2.sweep import (Point, Row, SweepError, SweepSpec, best_per_method, expand_points, pareto_front,
                              point_opts, read_rows, rows_from_csv, rows_to_csv, write_report)
from expedit_d2.sweep.measure import primary_metric
from expedit_d2.sweep.store import append_row

ROOT = Path(__file__).resolve().parents[1]
DPT_TINY = str(ROOT / "projects/DPT/configs/demo/tiny_vit_nyuv2.yaml")
M2F_TINY = str(ROOT / "projects/Mask2Former/configs/demo/tiny_swin_coco_panoptic.yaml")
TOME = {"MODEL.TOKEN_REDUCTION.METHOD": "tome", "MODEL.TOKEN_REDUCTION.TOME.R": 8,
        "MODEL.TOKEN_REDUCTION.TOME.START_BLOCK": 0}


def row(order, method, gmacs, value, speedup, label=None, base_ms=100.0, **kw):
    """A synthetic row of a depth sweep (RMSE: lower is better), timed against a baseline that
    took ``base_ms`` in the point's run (as the sweep records it: speed-up = base_ms / point ms)."""
    baseline = method == "baseline"
    overrides = {} if baseline or method == "expedit" else {"MODEL.TOKEN_REDUCTION.METHOD": method}
    return Row(point_id="baseline" if baseline else f"{method}{order}", order=order,
               label=label or (method if baseline else f"{method}_{order}"), baseline=baseline,
               overrides=overrides, metric="depth/rmse", metric_mode="min", metric_value=value,
               metrics={"depth/rmse": value}, backbone_gmacs=gmacs, model_gmacs=gmacs + 50.0, input_size=[480, 640],
               latency_ms=base_ms / speedup, fps=speedup * 1000 / base_ms, speedup_vs_baseline=speedup,
               baseline_latency_ms_same_run=base_ms, device="cpu (test)",
               config_file="projects/DPT/configs/dpt_hybrid_nyuv2.yaml", fingerprint="f" * 12, **kw)


ROWS = [row(0, "baseline", 130.0, 0.357, 1.0),
        row(1, "expedit", 67.0, 0.362, 1.6), row(2, "expedit", 85.0, 0.359, 1.3),
        row(3, "tome", 67.0, 0.380, 1.5), row(4, "tome", 85.0, 0.365, 1.25),
        row(5, "evit", 67.0, 0.400, 1.55), row(6, "evit", 85.0, 0.370, 1.3),
        row(7, "pool", 67.0, 0.420, 1.7), row(8, "pool", 110.0, 0.362, 1.1)]


# --------------------------------------------------------------------------------------
# typed rows
# --------------------------------------------------------------------------------------
def test_row_round_trips_through_jsonl_and_csv(tmp_path):
    for r in ROWS:
        append_row(tmp_path, None, r)
    text = (tmp_path / "results.jsonl").read_text()
    back = read_rows(tmp_path)
    assert back == ROWS and all(isinstance(r, Row) for r in back)
    assert rows_from_csv((tmp_path / "results.csv").read_text()) == ROWS
    append_row(tmp_path, None, back[3])  # rewriting a row of the same point replaces it (moved last)
    assert (tmp_path / "results.jsonl").read_text().splitlines()[-1] == text.splitlines()[3]
    assert read_rows(tmp_path) == ROWS  # in sweep order again
    assert rows_from_csv(rows_to_csv(ROWS)) == ROWS
    r = back[3]
    assert (r.method, r.label, r.metric_value, r["label"]) == ("tome", "tome_3", 0.380, "tome_3")


def test_old_format_rows_stay_readable(tmp_path):
    """A row as the sweep wrote it before typed rows and methods: GFLOPs names, no method,
    keys this version does not know (kept and written back)."""
    old = {"order": 1, "point_id": "abc123", "label": "a4_3x3", "baseline": False,
           "overrides": {"MODEL.EXPEDIT.CLUSTERING_LOCATION": 4, "MODEL.EXPEDIT.NUM_CLUSTERS": [3, 3]},
           "metric": "panoptic_seg/PQ", "metric_mode": "max", "metric_value": 41.5,
           "metrics": {"panoptic_seg/PQ": 41.5},
           "backbone_gflops": 1.25, "model_gflops": 3.5, "input_size": [64, 96], "latency_ms": 12.0,
           "fps": 83.3, "speedup_vs_baseline": 1.2, "peak_memory_mb": None, "device": "cpu", "versions": {},
           "time": "2024-01-01T00:00:00", "fingerprint": "0123456789ab", "note": "from an older version"}
    base = {"order": 0, "point_id": "baseline", "label": "baseline", "baseline": True, "overrides": {},
            "metric_value": 42.0, "backbone_gflops": 2.0}
    (tmp_path / "results.jsonl").write_text(json.dumps(old) + "\n" + json.dumps(base) + "\n")
    rows = read_rows(tmp_path)
    assert [r.point_id for r in rows] == ["baseline", "abc123"]  # baseline first
    r = rows[1]
    assert (r.backbone_gmacs, r.model_gmacs, r.method) == (1.25, 3.5, "expedit")
    assert r.extra == {"note": "from an older version"} and r["note"] == "from an older version"
    assert (r.opts, r.padded_input, r.shard, r.num_gpus) == ([], None, None, 1)  # missing: defaults
    assert rows[0].method == "baseline" and rows[0].metric_mode == "max"
    written = json.loads(r.to_json())
    assert written["note"] == "from an older version" and written["backbone_gmacs"] == 1.25
    assert "backbone_gflops" not in written and "extra" not in written
    assert Row.from_dict(written) == r
    with pytest.raises(KeyError):
        r["no_such_key"]
    with pytest.raises(SweepError, match="without point_id"):
        Row.from_dict({"label": "x"})


# --------------------------------------------------------------------------------------
# the per-method report
# --------------------------------------------------------------------------------------
def test_best_per_method_and_pareto_front():
    best = best_per_method(ROWS, budget_gmacs=90)
    assert list(best) == ["expedit", "tome", "evit", "pool"]  # expedit first, then as swept
    assert {m: r.label for m, r in best.items()} == {"expedit": "expedit_2", "tome": "tome_4", "evit": "evit_6",
                                                    "pool": "pool_7"}  # lower RMSE is better
    assert best_per_method(ROWS, budget_gmacs=60) == dict.fromkeys(best)
    front = pareto_front(ROWS, "backbone_gmacs")
    assert [r.label for r in front] == ["expedit_1", "expedit_2", "baseline"]
    front = pareto_front(ROWS, "speedup_vs_baseline")  # higher is better
    assert [r.label for r in front] == ["baseline", "expedit_2", "expedit_1", "pool_7"]


def test_report_has_a_row_per_method_and_the_best_of_each(tmp_path):
    for r in ROWS:
        append_row(tmp_path, None, r)
    rows, best = write_report(tmp_path, budget_gmacs=90)
    assert best.label == "expedit_2" and rows == ROWS
    table = (tmp_path / "table.md").read_text()
    lines = table.splitlines()
    head = next(i for i, x in enumerate(lines) if x.startswith("| point | method |"))
    points = lines[head + 2: head + 2 + len(ROWS)]
    assert [x.split(" | ")[1] for x in points] == [r.method for r in ROWS]
    assert points[3].startswith("| tome_3 | tome | 67.00 (-48.5%) |") and points[3].endswith("| 0.380 | +0.023 |")
    section = lines.index("Best setting of each method within 90 backbone GMACs:")
    best_rows = lines[section + 4: section + 8]
    assert [x.split(" | ")[:2] for x in best_rows] == [["| expedit", "expedit_2"], ["| tome", "tome_4"],
                                                       ["| evit", "evit_6"], ["| pool", "pool_7"]]
    write_report(tmp_path, budget_ms=50)  # nothing is that fast
    table = (tmp_path / "table.md").read_text()
    assert "Best depth/rmse within 50 ms: none fits" in table
    assert table.count(" | none fits | - |") == 4
    png = tmp_path / "pareto.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as im:
        assert im.size == (1320, 504)  # 11 x 4.2 in at 120 dpi


def _table_rows(table: str, header: str) -> list[dict]:
    """The rows of the markdown table under ``header``'s first column as {column: cell}."""
    lines = table.splitlines()
    head = next(i for i, x in enumerate(lines) if x.startswith(f"| {header} |"))
    names = [c.strip() for c in lines[head].strip("|").split("|")]
    out = []
    for line in lines[head + 2:]:
        if not line.startswith("|"):
            break
        out.append(dict(zip(names, (c.strip() for c in line.strip("|").split("|")))))
    return out


#: the demo's DPT sweep of 2026-12-05 as its rows held it: the baseline timed 135.1 ms in its own
#: run and 212.0 ms in tome_r215's (the table then showed 181.2 ms at 1.17x beside 135.1 ms)
DEMO_ROWS = [row(0, "baseline", 2.56, 0.358, 1.0, base_ms=135.1),
             row(1, "expedit", 1.14, 0.364, 1.03, label="a1_12x12", base_ms=305.2),
             row(3, "tome", 1.16, 0.356, 212.0 / 181.2, label="tome_r215", base_ms=212.0),
             row(7, "pool", 1.00, 0.444, 1.19, label="pool_a1_12x12", base_ms=271.7)]


@pytest.mark.parametrize("rows", [ROWS, DEMO_ROWS], ids=["synthetic", "demo"])
def test_every_speedup_is_the_printed_same_run_baseline_over_the_printed_time(rows, tmp_path):
    for r in rows:
        append_row(tmp_path, None, r)
    write_report(tmp_path)
    table = (tmp_path / "table.md").read_text()
    points = _table_rows(table, "point")
    assert [p["point"] for p in points] == [r.label for r in rows]
    for p, r in zip(points, rows):
        ms, base, speedup = float(p["point ms"]), float(p["baseline ms, same run"]), float(p["speed-up"][:-1])
        # printed to 0.1 ms and 0.01x: the quotient of the printed times agrees within that rounding
        tolerance = 0.005 + 0.05 * (1 / ms + base / ms**2)
        assert abs(speedup - base / ms) <= tolerance, (r.label, speedup, base, ms)
        assert float(p["FPS"]) == pytest.approx(1000 / ms, abs=0.005 + 0.05 * 1000 / ms**2)
    # the baseline row is timed against itself in its own run; other rows carry their run's baseline
    assert points[0]["baseline ms, same run"] == points[0]["point ms"] and points[0]["speed-up"] == "1.00x"
    best = _table_rows(table, "method")
    for b in best:
        ms, base, speedup = float(b["point ms"]), float(b["baseline ms, same run"]), float(b["speed-up"][:-1])
        assert abs(speedup - base / ms) <= 0.005 + 0.05 * (1 / ms + base / ms**2)


def test_the_demo_table_prints_tome_against_the_baseline_of_its_own_run(tmp_path):
    for r in DEMO_ROWS:
        append_row(tmp_path, None, r)
    write_report(tmp_path)
    table = (tmp_path / "table.md").read_text()
    tome = next(p for p in _table_rows(table, "point") if p["point"] == "tome_r215")
    assert (tome["point ms"], tome["baseline ms, same run"], tome["speed-up"]) == ("181.2", "212.0", "1.17x")
    baseline = _table_rows(table, "point")[0]
    assert (baseline["point ms"], baseline["baseline ms, same run"]) == ("135.1", "135.1")
    # the baseline took 135.1 to 305.2 ms over the 4 runs: every speed-up here is within that spread
    assert "took 135.1 to 305.2 ms over the 4 runs of this sweep (highest / lowest = 2.26)" in table
    assert "between 0.44x and 2.26x is within that spread" in table
    assert "**Every speed-up in this table is within the run-to-run spread" in table
    assert [p["vs. spread"] for p in _table_rows(table, "point")] == ["-", "within", "within", "within"]


def test_speedups_beyond_the_spread_are_told_apart(tmp_path):
    rows = [row(0, "baseline", 130.0, 0.357, 1.0, base_ms=100.0), row(1, "expedit", 67.0, 0.362, 1.6, base_ms=104.0),
            row(2, "pool", 67.0, 0.420, 1.02, base_ms=98.0)]
    for r in rows:
        append_row(tmp_path, None, r)
    write_report(tmp_path)
    table = (tmp_path / "table.md").read_text()
    assert "took 98.0 to 104.0 ms over the 3 runs" in table and "between 0.94x and 1.06x" in table
    assert [p["vs. spread"] for p in _table_rows(table, "point")] == ["-", "beyond", "within"]
    assert "Every speed-up in this table is within" not in table
    assert [b["vs. spread"] for b in _table_rows(table, "method")] == ["beyond", "within"]


def test_rows_without_a_recorded_same_run_baseline_show_the_one_their_speedup_implies(tmp_path):
    """Rows written before ``baseline_latency_ms_same_run`` was recorded: speed-up x point time."""
    from dataclasses import replace

    rows = [replace(r, baseline_latency_ms_same_run=None) for r in DEMO_ROWS]
    for r in rows:
        append_row(tmp_path, None, r)
    write_report(tmp_path)
    tome = next(p for p in _table_rows((tmp_path / "table.md").read_text(), "point") if p["point"] == "tome_r215")
    assert (tome["point ms"], tome["baseline ms, same run"], tome["speed-up"]) == ("181.2", "212.0", "1.17x")


def test_plot_draws_one_series_per_method(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from expedit_d2.sweep import report

    figures, close = [], plt.close
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figure to look at
    report.plot_pareto(ROWS, tmp_path / "pareto.png")
    (fig,) = figures
    for ax, x in zip(fig.axes, ("backbone_gmacs", "speedup_vs_baseline")):
        labels = ax.get_legend_handles_labels()[1]
        assert labels == ["expedit", "tome", "evit", "pool", "baseline"]
        series = {c.get_label(): c.get_offsets()[:, 0].tolist() for c in ax.collections}
        assert series["tome"] == [getattr(r, x) for r in ROWS if r.method == "tome"]
        assert len(ax.lines) == 4  # each method's front, through the baseline
    close(fig)


# --------------------------------------------------------------------------------------
# points: labels, methods, translation by expedit_d2.reduction.config
# --------------------------------------------------------------------------------------
def test_points_of_several_methods_and_their_labels():
    s = SweepSpec(config_file=DPT_TINY, input_size=(480, 640), points=[
        TOME, {**TOME, "MODEL.TOKEN_REDUCTION.TOME.R": 4},
        {"MODEL.TOKEN_REDUCTION.METHOD": "evit", "MODEL.TOKEN_REDUCTION.EVIT.LOCATIONS": [1, 3],
         "MODEL.TOKEN_REDUCTION.EVIT.KEEP_RATE": 0.7},
        {"MODEL.TOKEN_REDUCTION.METHOD": "pool", "MODEL.TOKEN_REDUCTION.POOL.LOCATION": 2,
         "MODEL.TOKEN_REDUCTION.POOL.SIZE": [8, 8]},
        {"MODEL.TOKEN_REDUCTION.METHOD": "expedit", "MODEL.EXPEDIT.CLUSTERING_LOCATION": 1,
         "MODEL.EXPEDIT.NUM_CLUSTERS": [12, 12]},
        {"MODEL.EXPEDIT.CLUSTERING_LOCATION": 1, "MODEL.EXPEDIT.NUM_CLUSTERS": [12, 12]},  # the same point
        {"MODEL.TOKEN_REDUCTION.METHOD": "none"},
    ])
    points = expand_points(s)
    assert [p.label for p in points] == ["baseline", "tome_r8_s0", "tome_r4_s0", "evit_l1-3_k0.7", "pool_a2_8x8",
                                         "a1_12x12", "none"]
    assert [p.method for p in points] == ["baseline", "tome", "tome", "evit", "pool", "expedit", "none"]
    assert Point((("MODEL.EXPEDIT.ITERS", 3), ("MODEL.TOKEN_REDUCTION.METHOD", "tome"))).label == "tome_ITERS=3"
    official = "MODEL.SWIN.TOKEN_CLUSTERING_BLOCK.NUM_SPIXELS"
    with pytest.raises(SweepError, match=rf"point \{{'{official}': 10\}}: {official}=10: clusters per window"):
        expand_points(SweepSpec(config_file=DPT_TINY, input_size=(480, 640),
                                points=[{official: 10}]))


def _cfg(config_file, *opts):
    project = load_project(Path(config_file).parents[2])
    return project.build_config(default_argument_parser().parse_args(["--config-file", config_file, *opts]))


def test_point_opts_of_a_tome_point_on_a_plain_backbone():
    base = _cfg(DPT_TINY)
    assert base.MODEL.BACKBONE.NAME == "D2ViT"
    point = Point(tuple(sorted(TOME.items())))
    opts = point_opts(base, point)
    pairs = dict(zip(opts[::2], opts[1::2]))
    assert pairs == {"MODEL.BACKBONE.NAME": "TokenReductionBackbone", "MODEL.TOKEN_REDUCTION.BASE": "D2ViT",
                     "MODEL.TOKEN_REDUCTION.METHOD": "tome", "MODEL.TOKEN_REDUCTION.TOME.R": "8",
                     "MODEL.TOKEN_REDUCTION.TOME.START_BLOCK": "0"}
    cfg = _cfg(DPT_TINY, *opts)  # the opts build: every key exists, values have the right types
    assert (cfg.MODEL.BACKBONE.NAME, cfg.MODEL.TOKEN_REDUCTION.BASE, cfg.MODEL.TOKEN_REDUCTION.METHOD,
            cfg.MODEL.TOKEN_REDUCTION.TOME.R) == ("TokenReductionBackbone", "D2ViT", "tome", 8)
    assert point_opts(base, Point((), baseline=True)) == []  # a plain baseline stays as it is


def test_point_opts_names_the_point_the_base_config_cannot_take():
    base = _cfg(DPT_TINY, "MODEL.BACKBONE.NAME", "MyBackbone")
    with pytest.raises(SweepError, match=r"point tome_r8_s0 \(.*\): MODEL.BACKBONE.NAME='MyBackbone': token-reduction"):
        point_opts(base, Point(tuple(sorted(TOME.items()))))


# --------------------------------------------------------------------------------------
# the project protocol (train_net.py's SWEEP)
# --------------------------------------------------------------------------------------
def test_projects_declare_their_metrics():
    dpt = sweep_protocol(load_project(ROOT / "projects/DPT"))
    m2f = sweep_protocol(load_project(ROOT / "projects/Mask2Former"))
    spec = SweepSpec(config_file=DPT_TINY, input_size=(480, 640))
    assert primary_metric(spec, dpt, {"depth/d1": 0.9, "depth/rmse": 0.4}) == ("depth/rmse", "min")
    assert primary_metric(SweepSpec(config_file=DPT_TINY, input_size=(480, 640), metric="depth/d1"), dpt,
                          {"depth/d1": 0.9, "depth/rmse": 0.4}) == ("depth/d1", "max")
    assert primary_metric(spec, m2f, {"sem_seg/mIoU": 1.0, "panoptic_seg/PQ": 2.0}) == ("panoptic_seg/PQ", "max")
    assert m2f.size_divisibility(_cfg(M2F_TINY)) == 32 and dpt.size_divisibility(_cfg(DPT_TINY)) == 0
    with pytest.raises(SweepError, match=r"metric None is not among the evaluator's results \['x/y'\]"):
        primary_metric(spec, dpt, {"x/y": 1.0})


def test_protocol_default_and_malformed_declarations():
    assert sweep_protocol(types.SimpleNamespace()) == SweepProtocol()
    assert SweepProtocol().primary_metrics[0] == "panoptic_seg/PQ" and not SweepProtocol().lower_is_better_for("a/rmse")
    declared = sweep_protocol(types.SimpleNamespace(SWEEP={"lower_is_better": ["rmse"]}))
    assert declared.lower_is_better_for("depth/rmse") and not declared.lower_is_better_for("depth/d1")
    with pytest.raises(ValueError, match=r"unknown keys \['primary_metric'\]"):
        sweep_protocol(types.SimpleNamespace(SWEEP={"primary_metric": ["a"]}))
    with pytest.raises(TypeError, match=r"SWEEP\['lower_is_better'\] must be a list of strings, got 'rmse'"):
        sweep_protocol(types.SimpleNamespace(SWEEP={"lower_is_better": "rmse"}))
