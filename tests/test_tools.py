"""FLOP counting and the measurement tools, on tiny configs."""
import json
import mmap
import statistics

import pytest

import torch
import torch.nn.functional as F
from torch import nn

from expedit_d2.flops import backbone_flops
from expedit_d2.ops import token_clustering, token_reconstruction
from tests.project_opts import TINY_SWIN
from tools import analyze_model, benchmark_backbone


class _Attn(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v)


class _Ops(nn.Module):
    def forward(self, x):
        clusters, state = token_clustering(x, (8, 8), (4, 4), iters=2, temperature=0.1, window=7)
        return token_reconstruction(clusters, state, k=3, temperature=0.1)


def test_fused_attention_is_counted():
    q, k, v = torch.randn(2, 3, 10, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 5)
    from fvcore.nn import FlopCountAnalysis

    from expedit_d2.flops import EXTRA_HANDLES

    fca = FlopCountAnalysis(_Attn(), (q, k, v)).set_op_handle(**EXTRA_HANDLES)
    assert fca.total() == 2 * 3 * 10 * 7 * (8 + 5)


def test_operator_matmuls_are_counted():
    B, N, M, C = 2, 64, 16, 12
    x = torch.randn(B, N, C)
    total = backbone_flops(_Ops(), x).total()
    # clustering: 2 iterations x (distances + centre update), window 7 reaches all 4x4
    # clusters; reconstruction: distances + mixing; plus the initial pooling
    matmuls = 2 * 2 * B * N * M * C + 2 * B * N * M * C
    assert matmuls <= total <= matmuls + 2 * B * N * C


def run_analyze(capsys, *extra):
    analyze_model.main(["--config-file", "configs/examples/faster_rcnn_swin_l_fpn_expedit.yaml",
                        "--input-size", "192", "256", *extra, *TINY_SWIN])
    out = dict(line.split("\t") for line in capsys.readouterr().out.splitlines() if "\t" in line)
    return {k: float(v) for k, v in out.items()}


def test_analyze_model_prints_backbone_and_model_gmacs(capsys):
    expedited = run_analyze(capsys)
    plain = run_analyze(capsys, "MODEL.EXPEDIT.ENABLED", "False")
    assert 0 < expedited["backbone_gmacs"] < plain["backbone_gmacs"]
    assert plain["model_gmacs"] > plain["backbone_gmacs"]
    saved = plain["backbone_gmacs"] - expedited["backbone_gmacs"]
    assert abs((plain["model_gmacs"] - expedited["model_gmacs"]) - saved) < 0.05 * plain["model_gmacs"]
    # labelled units: GFLOPs (two flops per multiply-add) printed beside the GMACs
    for part in ("backbone", "model"):
        assert plain[f"{part}_gflops"] == pytest.approx(2 * plain[f"{part}_gmacs"], abs=2e-3)


def test_benchmark_backbone_writes_its_table(tmp_path):
    out = tmp_path / "bench"
    benchmark_backbone.main([
        "--config-file", "configs/backbones/swin_large_expedit_coco_panoptic.yaml",
        "--input-size", "192", "256", "--repeats", "1", "--warmup", "0", "--device", "cpu",
        "--output", str(out), *TINY_SWIN])
    rows = json.loads(out.with_suffix(".json").read_text())
    assert len(rows) == 1
    row = rows[0]
    assert 0 < row["gmacs_ratio"] < 1
    assert row["ms_base"] > 0 and row["ms_expedited"] > 0
    # one round: the per-round ratio is the ratio of the medians, its interval that one value
    assert row["latency_ratio"] == pytest.approx(row["ms_expedited"] / row["ms_base"])
    assert row["latency_ratio_ci95"] == [row["latency_ratio"]] * 2
    assert row["ratio_gap_ci95"] == [pytest.approx(row["latency_ratio"] - row["gmacs_ratio"])] * 2
    assert len(row["ms_rounds_base"]) == len(row["ms_rounds_expedited"]) == 1
    assert set(row["cosine"]) == {"res2", "res3", "res4", "res5"}
    assert row["cosine"]["res2"] > 0.999  # before the clustering point
    assert row["threads"] == torch.get_num_threads() and row["cpu_linear"] == "blas"  # what --pool checks
    assert "| swin_large_expedit_coco_panoptic | 256x192 |" in out.with_suffix(".md").read_text()


def test_vit_backbone_flops_drop_when_expedited(tiny_vit_cfg, seeded_backbone):
    cfg = tiny_vit_cfg("D2ViTHybrid", hybrid=True)
    image = torch.randn(1, 3, 160, 224)
    base = backbone_flops(seeded_backbone(cfg), image).total()
    cfg.MODEL.BACKBONE.NAME = "ExpeditBackbone"
    expedited = backbone_flops(seeded_backbone(cfg), image).total()
    assert 0 < expedited < base


def test_benchmark_backbone_takes_a_project_config(tmp_path):
    """A Mask2Former config carries MODEL.SEM_SEG_HEAD.* etc.: it is built as the project's
    train_net.py builds it (project found from the path)."""
    out = tmp_path / "bench"
    benchmark_backbone.main([
        "--config-file", "projects/Mask2Former/configs/demo/tiny_swin_coco_panoptic.yaml",
        "--input-size", "128", "192", "--repeats", "1", "--warmup", "0", "--device", "cpu",
        "--no-memory", "--output", str(out), "MODEL.EXPEDIT.CLUSTERING_LOCATION", "6",
        "MODEL.EXPEDIT.NUM_CLUSTERS", "[5, 5]", "MODEL.EXPEDIT.RECON_K", "10"])
    (row,) = json.loads(out.with_suffix(".json").read_text())
    assert 0 < row["gmacs_ratio"] < 1 and row["ms_expedited"] > 0


def test_benchmark_model_times_the_whole_model_by_parts(tmp_path):
    from tools import benchmark_model

    out = tmp_path / "model"
    benchmark_model.main([
        "--config-file", "projects/Mask2Former/configs/demo/tiny_swin_coco_panoptic.yaml",
        "--input-size", "96", "128", "--repeats", "1", "--warmup", "0", "--device", "cpu",
        "--grid", "MODEL.EXPEDIT.CLUSTERING_LOCATION=[4]", "--grid", "MODEL.EXPEDIT.NUM_CLUSTERS=[[5, 5]]",
        "--output", str(out), "MODEL.EXPEDIT.RECON_K", "10"])
    base, point = json.loads(out.with_suffix(".json").read_text())
    assert (base["setting"], point["setting"]) == ("baseline", "a4_5x5")
    assert base["latency_ratio"] == 1.0 and base["model_gmacs_ratio"] == 1.0
    assert 0 < point["backbone_gmacs_ratio"] < 1 and point["model_gmacs"] < base["model_gmacs"]
    parts = set(base["parts_ms"])
    assert parts == {"backbone", "pixel_decoder", "transformer_decoder", "rest"}
    assert all(v > 0 for k, v in base["parts_ms"].items() if k != "rest")  # every part was entered
    assert base["parts_ratio"] == dict.fromkeys(parts, 1.0)  # each round over itself
    # every part's rounds are kept, and the rest is each round's call less its parts
    rounds = point["parts_ms_rounds"]
    assert set(rounds) == parts | {"total"}
    assert rounds["rest"][0] == pytest.approx(rounds["total"][0] - sum(rounds[k][0] for k in parts - {"rest"}))
    # page faults per part and call, counted the same way
    faults = point["parts_faults_rounds"]
    assert set(faults) == parts | {"total"} and all(isinstance(n, int) and n >= 0 for ns in faults.values() for n in ns)
    assert faults["rest"][0] == max(faults["total"][0] - sum(faults[k][0] for k in parts - {"rest"}), 0)
    assert point["faults"] == faults["total"][0]  # the median of one round
    assert "page faults (k)" in out.with_suffix(".md").read_text()
    assert point["parts_ratio"]["backbone"] > 0
    assert point["gap"] == pytest.approx(point["latency_ratio"] - point["model_gmacs_ratio"])
    # one round: the interval is that round's ratio, the gap's is shifted by the GMACs ratio
    assert point["latency_ratio_ci95"] == [point["latency_ratio"]] * 2
    assert point["gap_ci95"] == pytest.approx([point["gap"]] * 2)
    assert "| a4_5x5 |" in out.with_suffix(".md").read_text()
    assert set(base["outputs"]) == {"segments", "instances"} and base["outputs"]["instances"] > 0


def test_benchmark_model_parts_of_dpt_include_the_token_taps(tmp_path):
    """DPT calls backbone.forward_taps, not forward: the backbone's time is still counted."""
    from tools import benchmark_model

    out = tmp_path / "dpt"
    benchmark_model.main([
        "--config-file", "projects/DPT/configs/demo/tiny_vit_nyuv2.yaml", "--input-size", "96", "128",
        "--repeats", "1", "--warmup", "0", "--device", "cpu", "--output", str(out),
        "--point", "MODEL.EXPEDIT.CLUSTERING_LOCATION=1;MODEL.EXPEDIT.NUM_CLUSTERS=[4, 4]",
        "--point", "MODEL.EXPEDIT.CLUSTERING_LOCATION=1;MODEL.EXPEDIT.NUM_CLUSTERS=[4, 4];MODEL.CPU_LINEAR=onednn"])
    base, point, fast = json.loads(out.with_suffix(".json").read_text())
    assert set(base["parts_ms"]) == {"backbone", "reassemble", "scratch", "rest"}
    assert base["parts_ms"]["backbone"] > 0 and point["setting"] == "a1_4x4"
    report = out.with_suffix(".md").read_text()
    assert base["outputs"] == {} and "| - |" in report  # depth: nothing to count
    # MODEL.CPU_LINEAR is a setting like any other: recorded per row, named in the header
    assert [r["cpu_linear"] for r in (base, point, fast)] == ["blas", "blas", "onednn"]
    assert fast["model_gmacs"] == pytest.approx(point["model_gmacs"])  # the same products, counted as convs
    assert f"linear layers baseline: blas, a1_4x4: blas, {fast['setting']}: onednn" in report


def test_benchmark_model_compiles_the_backbone_the_head_calls(tmp_path):
    """``--compile backbone`` on DPT (which enters the backbone through forward_taps): each
    setting's backbone is compiled by inductor, one graph per model, and the run reports."""
    from torch._dynamo.utils import counters

    from tools import benchmark_model

    out = tmp_path / "dpt_compiled"
    graphs = counters["stats"]["unique_graphs"]
    benchmark_model.main([
        "--config-file", "projects/DPT/configs/demo/tiny_vit_nyuv2.yaml", "--input-size", "96", "128",
        "--repeats", "1", "--warmup", "1", "--device", "cpu", "--compile", "backbone", "--output", str(out),
        "--point", "MODEL.EXPEDIT.CLUSTERING_LOCATION=1;MODEL.EXPEDIT.NUM_CLUSTERS=[4, 4]"])
    assert counters["stats"]["unique_graphs"] - graphs == 2  # baseline and a1_4x4, no break, no recompile
    rows = json.loads(out.with_suffix(".json").read_text())
    assert [(r["setting"], r["compile"]) for r in rows] == [("baseline", "backbone"), ("a1_4x4", "backbone")]
    assert all(r["parts_ms"]["backbone"] > 0 for r in rows)
    assert "compile backbone" in out.with_suffix(".md").read_text()


def test_compiled_backbone_covers_the_token_taps_and_survives_the_part_timers():
    """DPT enters its backbone through forward_taps: compiling the backbone compiles that
    entry point (a wrapping torch.compile(module) would leave it eager), the outputs stay
    the same, and the part timers put the compiled entry points back."""
    from torch._dynamo.testing import CompileCounter

    from expedit_d2.engine import config_from_file
    from expedit_d2.benchmark.model import compile_entry_points, timed_parts

    cfg, project = config_from_file("projects/DPT/configs/demo/tiny_vit_nyuv2.yaml",
                                    opts=["MODEL.EXPEDIT.CLUSTERING_LOCATION", 1, "MODEL.EXPEDIT.NUM_CLUSTERS", [4, 4]])
    torch.manual_seed(0)
    model = project.Trainer.build_model(cfg).eval()
    x = torch.randn(1, 3, 96, 128)
    taps = model.backbone.taps
    with torch.inference_mode():
        eager, grid, _ = model.backbone.forward_taps(x, taps)
    counter = CompileCounter()
    assert compile_entry_points(model.backbone, backend=counter, fullgraph=True) == ["forward", "forward_taps"]
    compiled = {k: vars(model.backbone)[k] for k in ("forward", "forward_taps")}
    with torch.inference_mode():
        ours, grid2, _ = model.backbone.forward_taps(x, taps)
    assert counter.frame_count == 1 and counter.op_count > 0 and grid2 == grid
    for a, b in zip(ours, eager, strict=True):
        torch.testing.assert_close(a, b)
    with timed_parts(model, "cpu") as (spent, faults):
        for entries in (*spent.values(), *faults.values()):
            entries.append(0)  # the call's entry, as part_seconds makes it
        with torch.inference_mode():
            model([{"image": x[0] * 255, "height": 96, "width": 128}])
    assert spent["backbone"][-1] > 0
    assert {k: vars(model.backbone)[k] for k in compiled} == compiled  # the compiled ones, not the class's
    assert "forward" not in vars(model.scratch)


def test_part_timers_do_not_recompile_a_compiled_model():
    """Under ``--compile model`` the timers sit inside the compiled call: their own
    bookkeeping stays out of the graphs (else every call would guard on it and recompile),
    the parts they call are still compiled, once."""
    from torch._dynamo.testing import CompileCounter

    from expedit_d2.benchmark.model import timed_parts

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone, self.head = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.backbone(x).relu())

    torch._dynamo.reset()
    model, x = Model().eval(), torch.randn(3, 4)
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, dynamic=False)
    with torch.inference_mode():
        want = model(x)
        frames = []
        with timed_parts(model, "cpu") as (spent, faults):
            for _ in range(4):
                for entries in (*spent.values(), *faults.values()):
                    entries.append(0)
                torch.testing.assert_close(compiled(x), want)
                frames.append(counter.frame_count)
    assert frames[0] > 0 and frames == frames[:1] * 4, frames
    assert all(t > 0 for ts in spent.values() for t in ts)


def test_part_seconds_warm_up_calls_are_not_counted():
    from expedit_d2.benchmark.model import part_seconds

    calls = []

    class Model(nn.Module):
        def __init__(self, name):
            super().__init__()
            self.name, self.backbone = name, nn.Linear(1, 1)

        def forward(self, x):
            calls.append(self.name)
            return self.backbone(x)

    models = {"baseline": Model("baseline"), "other": Model("other")}
    out, faults = part_seconds(models, {k: (lambda m=m: m(torch.ones(1))) for k, m in models.items()}, "cpu",
                               repeats=2, warmup=1)
    assert calls == ["baseline", "other", "other", "baseline", "baseline", "other"]  # warm-up round first
    assert all(len(ts) == 2 for per in (*out.values(), *faults.values()) for ts in per.values())


def test_with_rest_subtracts_the_parts_round_by_round():
    """The rest is the median of the per-round rests, not the median call less the parts'
    medians: here those would give 9 - 6 - 1 = 2, while every round's rest is 1."""
    from expedit_d2.benchmark.model import with_rest

    per = {"backbone": [8.0, 2.0, 6.0], "head": [1.0, 6.0, 1.0], "total": [10.0, 9.0, 8.0]}
    out = with_rest(per)
    assert out["rest"] == pytest.approx([1.0, 1.0, 1.0]) and out["backbone"] is per["backbone"]
    assert with_rest({"backbone": [3.0], "total": [2.9]})["rest"] == [0.0]  # timer jitter: never negative


def test_part_seconds_interleaves_the_settings_and_unwraps_the_parts():
    """The instrumented pass interleaves the settings round by round (as the timing pass),
    counts each part's outermost entry only (time and page faults), and leaves no wrapper on
    the modules."""

    from expedit_d2.benchmark.model import part_seconds

    calls = []

    class Part(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(1))

        def forward(self, x, inner=True):
            return self(x, inner=False) if inner else x * self.w  # re-enters its own forward

    class Fresh(Part):
        def forward(self, x, inner=True):
            if inner:  # a new anonymous mapping, touched: its pages fault in (malloc could reuse freed memory)
                page = mmap.PAGESIZE
                with mmap.mmap(-1, 64 * page) as fresh:
                    for i in range(0, 64 * page, page):
                        fresh[i] = 1
            return super().forward(x, inner)

    class Model(nn.Module):
        def __init__(self, name):
            super().__init__()
            self.name, self.backbone, self.head = name, Part(), Fresh()

        def forward(self, x):
            calls.append(self.name)
            return self.head(self.backbone(x))

    models = {"baseline": Model("baseline"), "other": Model("other")}
    x = torch.ones(1)
    out, faults = part_seconds(models, {k: (lambda m=m: m(x)) for k, m in models.items()}, "cpu", repeats=3)
    assert calls == ["baseline", "other", "other", "baseline", "baseline", "other"]
    assert set(out["other"]) == {"backbone", "head", "total"}
    # one entry per round, each part's time within its call's
    assert all(len(ts) == 3 for per in out.values() for ts in per.values())
    assert all(0 < b <= t for k in models for b, t in zip(out[k]["backbone"], out[k]["total"]))
    # the part that touches fresh memory faults (once per page, fewer with huge pages), inside its call's count
    assert set(faults["other"]) == {"backbone", "head", "total"}
    assert all(len(ns) == 3 for ns in faults["other"].values())
    assert all(0 < h <= t for k in models for h, t in zip(faults[k]["head"], faults[k]["total"]))
    assert all("forward" not in vars(m.backbone) and "forward" not in vars(m.head) for m in models.values())


def test_interleaved_samples_alternate_the_order_round_by_round():
    """Warm-up rounds untimed; then every function once per round, forwards and backwards in
    turn (each as often first as last); one time per function and round."""
    from expedit_d2.measure import interleaved_samples

    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    times = interleaved_samples(fns, "cpu", repeats=3, warmup=1)
    assert "".join(calls) == "abc" + "abc" + "cba" + "abc"
    assert list(times) == ["a", "b", "c"] and all(len(ts) == 3 and min(ts) >= 0 for ts in times.values())
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        interleaved_samples(fns, "cpu", repeats=0)


def test_median_interval_is_the_binomial_order_statistics():
    from expedit_d2.measure import median_interval

    xs = [float(v) for v in (9, 3, 14, 1, 7, 12, 5, 15, 2, 11, 4, 13, 6, 10, 8)]  # 1 .. 15 shuffled
    assert median_interval(xs) == (4.0, 12.0)  # n = 15 at 0.95: the 4th and 12th (coverage 0.965)
    assert median_interval(xs, level=0.80) == (5.0, 11.0)  # coverage 0.882; the 6th-10th cover 0.698
    assert median_interval([3.0, 1.0, 2.0]) == (1.0, 3.0)  # too few for the level: the range
    assert median_interval(list(range(1, 101))) == (40, 61)  # n = 100: the textbook 40th and 61st
    with pytest.raises(ValueError, match="no values"):
        median_interval([])


def test_round_ratios_pair_each_round_with_the_baseline():
    from expedit_d2.measure import round_ratios

    samples = {"baseline": [1.0, 2.0, 4.0], "x": [0.5, 1.2, 2.0]}
    assert round_ratios(samples, "baseline") == {"baseline": [1.0, 1.0, 1.0], "x": [0.5, 0.6, 0.5]}


def test_benchmark_head_times_each_part_against_the_official_order(tmp_path):
    """Every part on the tiny Mask2Former: ours and the official order give the same outputs
    (panoptic and instance masks exactly), both were timed, the report is written."""
    from tools import benchmark_head

    out = tmp_path / "head"
    benchmark_head.main(["--config-file", "projects/Mask2Former/configs/demo/tiny_swin_coco_panoptic.yaml",
                         "--sides", "96", "128", "--kept", "8", "--repeats", "1", "--warmup", "0",
                         "--device", "cpu", "--output", str(out)])
    rows = json.loads(out.with_suffix(".json").read_text())
    assert [(r["part"], r["side"]) for r in rows] == [(p, s) for s in (96, 128) for p in benchmark_head.PARTS]
    for r in rows:
        assert r["official_ms"] > 0 and r["ours_ms"] > 0
        assert r["ratio_range"][0] <= r["ratio"] <= r["ratio_range"][1]
        assert 0 < r["max_abs"] and r["max_abs_diff"] < 1e-4 * r["max_abs"]
        if r["part"] == "inference":
            assert r["panoptic_equal"] and r["instances_equal"] and r["segments"] >= 4
    table = out.with_suffix(".md").read_text()
    assert "| deform_attn | 96 |" in table and "panoptic equal" in table


def test_benchmark_head_rejects_a_side_off_the_stride_and_a_config_of_another_project():
    from tools import benchmark_head

    with pytest.raises(ValueError, match="--sides 100: .* multiple of 32"):
        benchmark_head.main(["--config-file", "projects/Mask2Former/configs/demo/tiny_swin_coco_panoptic.yaml",
                             "--sides", "96", "100", "--repeats", "1", "--device", "cpu"])
    with pytest.raises(ValueError, match="not a Mask2Former config"):
        benchmark_head.main(["--config-file", "projects/DPT/configs/demo/tiny_vit_nyuv2.yaml", "--device", "cpu"])


def _run_rows(base_ms, exp_ms, gmacs=(10.0, 8.0), size=(64, 64)):
    """The rows of one benchmark_model run as its JSON holds them (the fields --pool reads)."""
    rows = []
    for setting, ms, g in (("baseline", base_ms, gmacs[0]), ("a4_5x5", exp_ms, gmacs[1])):
        ratios = [t / b for t, b in zip(ms, base_ms)]
        rows.append({"setting": setting, "overrides": {} if setting == "baseline" else {"K": 5},
                     "input": list(size), "device": "cpu", "amp": None, "compile": None, "ms_rounds": list(ms),
                     "model_gmacs": g, "model_gmacs_ratio": g / gmacs[0],
                     "gap": statistics.median(ratios) - g / gmacs[0]})
    return rows


def test_pool_runs_takes_the_median_over_every_round_of_every_run(tmp_path):
    """Pooled: each round's ratio to the baseline of the same round, over all runs; the
    interval is that median's; each run's own gap is kept. Runs of another input or model
    are refused with the file named."""
    from tools import benchmark_model

    a = _run_rows([10.0, 10.0, 20.0], [9.0, 8.0, 16.0])  # ratios 0.9, 0.8, 0.8
    b = _run_rows([10.0, 10.0, 10.0, 10.0], [7.0, 8.5, 9.5, 9.0])  # 0.7, 0.85, 0.95, 0.9
    paths = []
    for name, rows in (("a", a), ("b", b)):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(rows))
    out = tmp_path / "pooled"
    assert benchmark_model.main(["--pool", *map(str, paths), "--output", str(out)]) == 0
    base, point = json.loads(out.with_suffix(".json").read_text())
    assert base["latency_ratio"] == 1.0 and point["rounds"] == 7
    assert point["latency_ratio"] == pytest.approx(0.85)  # median of 0.7 0.8 0.8 0.85 0.9 0.9 0.95
    assert point["latency_ratio_ci95"] == pytest.approx([0.7, 0.95])  # 7 values: their whole range
    assert point["gap"] == pytest.approx(0.85 - 0.8) and point["gap_ci95"] == pytest.approx([-0.1, 0.15])
    assert point["run_gaps"] == pytest.approx([0.0, 0.075]) and point["runs"] == [str(p) for p in paths]
    assert "| a4_5x5 | 7 | 0.850 [0.700, 0.950] | 0.800 | +0.050 [-0.100, +0.150] | +0.000, +0.075 |" in \
        out.with_suffix(".md").read_text()

    threads = _run_rows([10.0], [9.0])
    for row in threads:
        row["threads"] = 7
    (tmp_path / "old.json").write_text(json.dumps(threads))  # the runs above recorded no threads: accepted
    assert benchmark_model.main(["--pool", str(paths[0]), str(tmp_path / "old.json")]) == 0
    assert "backbone_latency_ratio" not in point  # these runs kept no per-part rounds
    # with the per-part pass's rounds, the backbone's per-round ratios are pooled the same way
    with_parts = []
    for rows, backbone in ((a, ([4.0, 4.0, 8.0], [3.0, 3.2, 6.0])), (b, ([5.0] * 4, [4.0, 3.5, 4.5, 5.0]))):
        rows = [dict(r, backbone_gmacs_ratio=1.0 if i == 0 else 0.75, parts_ms_rounds={"backbone": ms})
                for i, (r, ms) in enumerate(zip(rows, backbone))]
        with_parts.append(tmp_path / f"parts_{len(with_parts)}.json")
        with_parts[-1].write_text(json.dumps(rows))
    assert benchmark_model.main(["--pool", *map(str, with_parts), "--output", str(out)]) == 0
    point = json.loads(out.with_suffix(".json").read_text())[1]
    # ratios 0.75 0.8 0.75 | 0.8 0.7 0.9 1.0: median 0.8, 7 values: their whole range
    assert point["backbone_latency_ratio"] == pytest.approx(0.8)
    assert point["backbone_latency_ratio_ci95"] == pytest.approx([0.7, 1.0])
    assert "| 0.800 [0.700, 1.000] | 0.750 |" in out.with_suffix(".md").read_text()
    # runs before MODEL.CPU_LINEAR was recorded computed with "blas": they pool with blas runs only
    blas = [dict(r, cpu_linear="blas") for r in _run_rows([10.0], [9.0])]
    (tmp_path / "blas.json").write_text(json.dumps(blas))
    assert benchmark_model.main(["--pool", str(paths[0]), str(tmp_path / "blas.json"), "--output", str(out)]) == 0
    assert "linear layers blas" in out.with_suffix(".md").read_text()
    for ref, bad, what in ((paths[0], [dict(r, cpu_linear="onednn") for r in blas], "cpu_linear='onednn'"),
                           (paths[0], _run_rows([10.0], [9.0], size=(32, 32)), "input"),
                           (tmp_path / "old.json", [dict(r, threads=3) for r in threads], "threads"),
                           (paths[0], _run_rows([10.0], [9.0], gmacs=(10.0, 7.0)), "GMACs"),
                           (paths[0], _run_rows([10.0], [9.0])[:1], "settings")):
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        with pytest.raises(benchmark_model.SweepError, match=rf"bad\.json.*{what}|{what}.*bad\.json"):
            benchmark_model.main(["--pool", str(ref), str(tmp_path / "bad.json")])
    (tmp_path / "torn.json").write_text('[{"setting": ')
    with pytest.raises(benchmark_model.SweepError, match=r"cannot read .*torn\.json"):
        benchmark_model.main(["--pool", str(paths[0]), str(tmp_path / "torn.json")])
    (tmp_path / "backbone.json").write_text(json.dumps([{"case": "swin_l_640", "gmacs_ratio": 0.78}]))
    with pytest.raises(benchmark_model.SweepError, match=r"backbone\.json is not a benchmark_model\.py run"):
        benchmark_model.main(["--pool", str(tmp_path / "backbone.json")])


def _backbone_rows(base_ms, exp_ms, gmacs=(10.0, 6.0), **extra):
    """The row of one benchmark_backbone run as its JSON holds it (the fields --pool reads)."""
    ratios = [e / b for b, e in zip(base_ms, exp_ms)]
    return [{"case": "vit_hybrid_640x480", "input": [480, 640], "device": "cpu", "gmacs_base": gmacs[0],
             "gmacs_expedited": gmacs[1], "gmacs_ratio": gmacs[1] / gmacs[0], "ms_rounds_base": list(base_ms),
             "ms_rounds_expedited": list(exp_ms), "ratio_gap": statistics.median(ratios) - gmacs[1] / gmacs[0],
             "operator_share": 0.02, **extra}]


def test_benchmark_backbone_pools_the_rounds_of_earlier_runs(tmp_path):
    """--pool: the median of every round's expedited / base time over all runs, its interval,
    each run's gap; runs of other backbones, inputs, threads or linear layers are refused
    with the file named, and so is a file that is not a run."""
    a = _backbone_rows([10.0, 10.0, 20.0], [6.0, 7.0, 14.0])  # ratios 0.6 0.7 0.7
    b = _backbone_rows([10.0, 10.0, 10.0, 10.0], [6.5, 6.6, 8.0, 9.0], threads=2)  # 0.65 0.66 0.8 0.9
    paths = []
    for name, rows in (("a", a), ("b", b)):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(rows))
    out = tmp_path / "pooled"
    benchmark_backbone.main(["--pool", *map(str, paths), "--output", str(out)])
    (row,) = json.loads(out.with_suffix(".json").read_text())
    assert row["rounds"] == 7 and row["runs"] == [str(p) for p in paths]
    assert row["latency_ratio"] == pytest.approx(0.7)  # median of 0.6 0.65 0.66 0.7 0.7 0.8 0.9
    assert row["latency_ratio_ci95"] == pytest.approx([0.6, 0.9])  # 7 values: their whole range
    assert row["ratio_gap"] == pytest.approx(0.1) and row["ratio_gap_ci95"] == pytest.approx([0.0, 0.3])
    assert row["run_gaps"] == pytest.approx([0.1, 0.13])
    assert "| vit_hybrid_640x480 | 640x480 | 7 | 0.600 | 0.700 [0.600, 0.900] | +0.100 [+0.000, +0.300] | " \
        "+0.100, +0.130 | 2.0%, 2.0% |" in out.with_suffix(".md").read_text()

    for bad, what in ((_backbone_rows([10.0], [6.0], gmacs=(10.0, 5.0)), "gmacs_expedited"),
                      (_backbone_rows([10.0], [6.0], threads=3), "threads=3"),
                      (_backbone_rows([10.0], [6.0], threads=2, cpu_linear="onednn"), None),
                      ([dict(_backbone_rows([10.0], [6.0])[0], input=[240, 320])], "input"),
                      ([dict(_backbone_rows([10.0], [6.0])[0], case="swin_l_640")], "cases"),
                      (_backbone_rows([10.0, 10.0], [6.0]), "rounds")):
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        if what is None:  # b recorded no linear layers: accepted beside a run that did
            benchmark_backbone.main(["--pool", str(paths[1]), str(tmp_path / "bad.json")])
            (tmp_path / "ref.json").write_text(json.dumps(_backbone_rows([10.0], [6.0], cpu_linear="blas")))
            with pytest.raises(ValueError, match=r"bad\.json.*cpu_linear='onednn'"):
                benchmark_backbone.main(["--pool", str(tmp_path / "ref.json"), str(tmp_path / "bad.json")])
            continue
        with pytest.raises(ValueError, match=rf"bad\.json.*{what}"):
            benchmark_backbone.main(["--pool", str(paths[1]), str(tmp_path / "bad.json")])
    (tmp_path / "model.json").write_text(json.dumps([{"setting": "baseline", "ms_rounds": [1.0]}]))
    with pytest.raises(ValueError, match=r"model\.json is not a benchmark_backbone\.py run"):
        benchmark_backbone.main(["--pool", str(tmp_path / "model.json")])
