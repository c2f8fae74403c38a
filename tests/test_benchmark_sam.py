"""The backbone benchmark (expedit_d2.benchmark, tools/benchmark_backbone.py) on SAM image
encoders: the cases at the published Expedit-SAM rows, the encoders as segment-anything
builds them, fvcore's count of SAM's attention, and the tiny case through the tool end to
end (GMACs, timing, memory children, cosines)."""
import json

import pytest
import torch
from fvcore.nn import FlopCountAnalysis
from segment_anything import sam_model_registry

from expedit_d2 import apply_patch
from expedit_d2.checkpoint import WeightsError
from expedit_d2.flops import backbone_flops
from expedit_d2.methods import PoolSettings, ToMeSettings
from expedit_d2.sam import PUBLISHED_SPEED, SAM_PRESETS, sam_settings
from expedit_d2.benchmark import backbone as bench
from expedit_d2.benchmark.cases import CASES, DEFAULT_CASES, build_sam_encoder
from tools import benchmark_backbone as bb

TINY = "sam_tiny_416_a8_81"


@pytest.fixture(autouse=True)
def restore_torch_state():
    """The tool sets the thread count and flushes denormals: give both back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
    torch.set_flush_denormal(False)


def test_the_cases_hold_the_published_rows_with_their_settings():
    # the Detectron2 cases stay the default, the SAM cases run when named
    assert DEFAULT_CASES == ("swin_l_640", "swin_l_1024", "vit_hybrid_640x480", "vit_l16_640x480")
    rows = {"a18_121": (18, 11, 7), "a14_100": (14, 10, 5), "a8_100": (8, 10, 3), "a8_81": (8, 9, 3),
            "a6_81": (6, 9, 2)}  # ViT-H alpha, s; ViT-B alpha: round(alpha x 12 / 32)
    assert {f"h_{r}" for r in rows} == set(PUBLISHED_SPEED)
    for row, (alpha_h, side, alpha_b) in rows.items():
        for model_type, depth, alpha in (("vit_h", 32, alpha_h), ("vit_b", 12, alpha_b)):
            case = CASES[f"sam_{model_type}_1024_{row}"]
            assert (case.model_type, case.row, case.size, case.depth) == (model_type, f"h_{row}", 1024, depth)
            e = case.settings("expedit")
            if model_type == "vit_h":  # the official preset as it is
                assert e == SAM_PRESETS[f"h_{row}"]
            assert e == sam_settings(f"h_{row}", depth)
            assert (e.clustering_location, e.num_clusters) == (alpha, (side, side))
            assert (e.iters, e.temperature, e.window, e.recon_k, e.recon_temperature) == (5, 5e-3, 5, 20, 5e-3)
            # pool and tome: the same s x s per window from the same block
            assert case.settings("pool") == PoolSettings(location=alpha, size=(side, side))
            assert case.settings("tome") == ToMeSettings(r=196 - side * side, start_block=alpha)
            job = bench.sam_job("x", case, "expedit", 1024, "cpu")
            assert job.extra["sam"]["published_speedup_v100_amg_vit_h"] == PUBLISHED_SPEED[f"h_{row}"][1]


@pytest.mark.parametrize("model_type", ["vit_b", "vit_l", "vit_h"])
def test_encoders_are_the_ones_sam_model_registry_builds(model_type):
    """Same parameter names and shapes, windows, global blocks and norms (on the meta device)."""
    with torch.device("meta"):
        ours = build_sam_encoder(model_type)
        theirs = sam_model_registry[model_type]().image_encoder
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    assert [b.window_size for b in ours.blocks] == [b.window_size for b in theirs.blocks]
    assert [b.attn.use_rel_pos for b in ours.blocks] == [b.attn.use_rel_pos for b in theirs.blocks]
    assert {m.eps for m in ours.modules() if isinstance(m, torch.nn.LayerNorm)} == {1e-6}
    assert ours.img_size == theirs.img_size == 1024


def _attention_macs(grid, ws, windowed, embed):
    """q k^T and attn v, and the two relative-position einsums, of one SAM block on a grid x
    grid token map: windows of ws (padded) or one global window."""
    if windowed:
        n, side = (-(-grid // ws)) ** 2, ws
    else:
        n, side = 1, grid
    tokens = side * side
    return n * 2 * tokens * tokens * embed, n * tokens * 2 * side * embed


def test_fvcore_counts_sam_attention_matmuls_and_rel_pos_einsums():
    """SAM's attention is explicit (q @ k^T, attn @ v, einsums for the relative positions),
    counted by fvcore's matmul and einsum handles, on the full and on the reduced grid."""
    encoder = build_sam_encoder("tiny", 416)
    image = torch.randn(1, 3, 416, 416)
    embed, grid = 64, 26  # 416 / 16 tokens per side, windows of 14: padded to 28
    windowed = [b.window_size > 0 for b in encoder.blocks]
    with torch.inference_mode():
        ops = backbone_flops(encoder, image).by_operator()
        want = [_attention_macs(grid, 14, w, embed) for w in windowed]
        assert ops["matmul"] == sum(m for m, _ in want)
        assert ops["einsum"] == pytest.approx(sum(e for _, e in want), rel=1e-3)  # fvcore: 4 digits
        case = CASES[TINY]
        alpha, side = case.settings("expedit").clustering_location, 9
        reduced = apply_patch(build_sam_encoder("tiny", 416), case.settings("pool"))
        ops = backbone_flops(reduced, image).by_operator()
        # after alpha: windows of 9 on the 2 x 2 windows' 18 x 18 grid, global blocks on it
        want = want[:alpha] + [_attention_macs(2 * side, side, w, embed) for w in windowed[alpha:]]
        assert ops["matmul"] == sum(m for m, _ in want)
        assert ops["einsum"] == pytest.approx(sum(e for _, e in want), rel=1e-3)
        # what plain fvcore sees is what the tool counts (no SAM op goes uncounted)
        plain = FlopCountAnalysis(encoder, (image,))
        plain.unsupported_ops_warnings(False)
        plain.uncalled_modules_warnings(False)
        assert backbone_flops(encoder, image).total() == plain.total()


def test_the_tiny_sam_case_runs_through_the_tool(tmp_path):
    out = tmp_path / "sam"
    bb.main(["--cases", TINY, "--repeats", "1", "--warmup", "0", "--device", "cpu", "--threads", "1",
             "--output", str(out)])
    (row,) = json.loads(out.with_suffix(".json").read_text())
    assert row["case"] == TINY and row["input"] == [416, 416]
    assert 0 < row["gmacs_ratio"] < 1
    assert row["ms_base"] > 0 and row["ms_expedited"] > 0 and len(row["ms_rounds_base"]) == 1
    assert row["latency_ratio"] == pytest.approx(row["ms_expedited"] / row["ms_base"])
    assert row["peak_mb_base"] is not None and row["peak_mb_expedited"] is not None  # the memory children
    assert row["operator_share"] > 0  # the clustering/reconstruction hooks found the operators
    assert set(row["cosine"]) == {"embedding"} and -1 <= row["cosine"]["embedding"] <= 1
    assert row["sam"]["row"] == "h_a8_81" and (row["sam"]["location"], row["sam"]["side"]) == (1, 9)
    table = out.with_suffix(".md").read_text()
    assert f"| {TINY} | 416x416 |" in table
    assert f"| {TINY} | expedit alpha 1, 9x9/window (iters 5, temperature 0.005, window 5, k 20) | 1.44x |" in table


def test_methods_at_about_equal_gmacs_and_gmacs_only(tmp_path, monkeypatch):
    """--method expedit pool tome on a SAM case: the same s x s per window from the same block;
    --repeats 0 counts GMACs (the base's once) and runs nothing else."""
    out, counted = tmp_path / "methods", []
    monkeypatch.setattr(bench, "backbone_flops", lambda m, image: counted.append(m) or backbone_flops(m, image))
    bb.main(["--cases", TINY, "--method", "expedit", "pool", "tome", "--repeats", "0", "--no-memory",
             "--input-size", "224", "224", "--device", "cpu", "--threads", "1", "--output", str(out)])
    rows = json.loads(out.with_suffix(".json").read_text())
    assert [r["case"] for r in rows] == [f"{TINY} {m}" for m in ("expedit", "pool", "tome")]
    assert len({r["gmacs_base"] for r in rows}) == 1
    assert len(counted) == 4  # the base once, each reduced encoder
    expedit, pool, tome = (r["gmacs_ratio"] for r in rows)
    assert 0 < pool < 1 and abs(tome - pool) < 0.05 * pool
    # expedit's blocks are pool's; its operators add what they cost (a large share of this
    # 64-wide encoder's GMACs)
    assert pool < expedit < 1
    for r in rows:
        assert r["latency_ratio"] is None and r["ms_rounds_base"] == [] and r["operator_share"] is None
        assert r["cosine"] is None
    table = out.with_suffix(".md").read_text()
    assert f"| {TINY} tome | 224x224 |" in table and "| n/a | n/a | n/a | n/a | n/a | n/a |" in table
    assert "tome r 115/window before block 1 (9x9/window)" in table
    # --pool refuses a run without rounds
    with pytest.raises(ValueError, match="0 base and 0 expedited rounds"):
        bb.main(["--pool", str(out.with_suffix(".json"))])


@pytest.mark.parametrize("extra, message", [
    (["--method", "evit"], "--method evit has no setting for SAM's windows"),
    (["--input-size", "400", "416"], "square inputs"),
    (["--taps-only"], "--taps-only"),
    (["MODEL.EXPEDIT.CLUSTERING_LOCATION", "2"], "no config overrides but MODEL.CPU_LINEAR"),
    (["--repeats", "-1"], "--repeats must be >= 0"),
])
def test_what_a_sam_case_cannot_take_is_refused_before_measuring(extra, message, capsys):
    with pytest.raises(SystemExit):
        bb.main(["--cases", TINY, "--no-memory", *extra])
    assert message in capsys.readouterr().err


def test_a_sam_checkpoint_loads_strictly_into_both_encoders(tmp_path):
    from expedit_d2.sam import build_tiny_sam

    sam = build_tiny_sam(seed=3)
    path = tmp_path / "sam_tiny.pth"
    torch.save(sam.state_dict(), path)  # as segment-anything's checkpoints: the whole Sam's keys
    base, reduced = bench.build_sam_pair(CASES[TINY], "expedit", 416, "cpu", checkpoint=str(path))
    want = sam.image_encoder.state_dict()
    for model in (base, reduced):
        got = model.state_dict()
        assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
    state = {k: v for k, v in sam.state_dict().items() if not k.startswith("image_encoder.neck.")}
    torch.save(state, path)
    with pytest.raises(WeightsError, match=r"sam_tiny\.pth"):
        bench.build_sam_pair(CASES[TINY], "expedit", 416, "cpu", checkpoint=str(path))
