"""Drop-in: expedit-d2 next to a user's own Detectron2 project (tests/user_project), whose
Swin follows the upstream layout and is registered as ``D2SwinTransformer``.

The user's project registers names that our Mask2Former project provides in this process,
so it runs in a fresh interpreter per import order (tests/user_project/run_checks.py); the
assertions are here.
"""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from expedit_d2 import ExpeditSettings, apply_patch

ROOT = Path(__file__).resolve().parents[1]
#: float32 rounding of two implementations of the same arithmetic (the user's blocks vs ours)
SAME_ARITHMETIC = 1e-5


def run_python(*args, timeout=600):
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


@pytest.fixture(scope="module", params=["expedit-first", "project-first"])
def checks(request):
    out = run_python("tests/user_project/run_checks.py", "--order", request.param, "--snippet", "docs/drop-in.md")
    line = [x for x in out.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def test_both_import_orders_keep_the_users_registration(checks):
    assert checks["registered_is_users"]  # no collision, and D2SwinTransformer is theirs
    # the official Expedit name is free in the user's project, theirs is kept
    assert checks["official_names_registered"] == ["D2HourglassSwinTransformer"]


@pytest.mark.parametrize("size", ["200x296", "192x384"])  # padded and unpadded windows at alpha
def test_users_swin_expedited_equals_ours_by_config_and_by_apply_patch(checks, size):
    r = checks["backbone"][size]
    assert r["config_is_users_class"] and r["config_load_missing"] == [] and r["config_load_unexpected"] == []
    assert r["config_vs_ours"] <= SAME_ARITHMETIC and r["patch_vs_ours"] <= SAME_ARITHMETIC
    assert r["expedited_vs_plain"] > 0.01  # it is expedited: res4/res5 change
    assert r["res2_res3_equal_plain"]  # stages before alpha run the user's own code, untouched


@pytest.mark.parametrize("size", ["200x296", "192x384"])
def test_patch_keeps_the_users_classes_and_names_and_comes_off_bitwise(checks, size):
    r = checks["backbone"][size]
    assert r["patched_stage_types"] == ["BasicLayer", "BasicLayer", "ExpeditBasicLayer", "BasicLayer"]
    assert r["patched_stages_are_users_subclasses"] and r["patched_state_dict_keys_unchanged"]
    assert r["removed_bitwise_plain"]


@pytest.mark.parametrize("size", ["200x296", "192x384"])
def test_pool_and_the_consistent_mask_on_the_users_swin_equal_ours(checks, size):
    r = checks["backbone"][size]
    assert r["pool_vs_ours"] <= SAME_ARITHMETIC and r["consistent_mask_vs_ours"] <= SAME_ARITHMETIC


def test_a_users_block_run_at_its_own_window_by_us_equals_its_forward(checks):
    """block_at_window (blocks on a reduced map) at the block's own window equals the user's
    forward: the two paths of run_upstream_blocks agree where both apply."""
    assert checks["block_at_own_window_vs_forward"] <= SAME_ARITHMETIC


def test_official_expedit_keys_on_the_users_swin(checks):
    assert checks["hourglass_is_users_class"] and checks["hourglass_vs_ours"] <= SAME_ARITHMETIC


def test_users_meta_architecture_runs_end_to_end_expedited(checks):
    m = checks["model"]
    assert m["loaded"] and m["missing"] == [] and m["unexpected"] == []  # the whole-model checkpoint loads
    assert m["backbone_is_users_class"] and m["sem_seg_shape"] == [5, 100, 148] and m["finite"]
    assert m["vs_base"] > 0  # the expedited backbone changed the prediction


def test_the_documented_lines_expedite_the_users_project(checks):
    s = checks["snippet"]
    assert s["backbone_is_users_class"] and s["outputs"] == ["res2", "res3", "res4", "res5"]
    assert s["reducers"] == ["NoneType", "NoneType", "ExpeditSwinWindows", "NoneType"]  # alpha 10: stage 3
    assert s["one_call_removed_bitwise"]


def test_importing_expedit_d2_registers_only_its_own_names():
    code = textwrap.dedent("""
        import json
        from detectron2.data import DatasetCatalog
        from detectron2.modeling import BACKBONE_REGISTRY, META_ARCH_REGISTRY, SEM_SEG_HEADS_REGISTRY
        from detectron2.modeling import ROI_HEADS_REGISTRY, PROPOSAL_GENERATOR_REGISTRY
        regs = {"backbone": BACKBONE_REGISTRY, "meta_arch": META_ARCH_REGISTRY, "sem_seg_head": SEM_SEG_HEADS_REGISTRY,
                "roi_heads": ROI_HEADS_REGISTRY, "proposal": PROPOSAL_GENERATOR_REGISTRY}
        before = {k: set(r._obj_map) for k, r in regs.items()}
        datasets = set(DatasetCatalog.list())
        import expedit_d2, expedit_d2.config, expedit_d2.methods
        added = {k: sorted(set(r._obj_map) - before[k]) for k, r in regs.items()}
        added["datasets"] = sorted(set(DatasetCatalog.list()) - datasets)
        print("ADDED " + json.dumps(added))
    """)
    out = run_python("-c", code)
    added = json.loads([x for x in out.splitlines() if x.startswith("ADDED ")][-1][len("ADDED "):])
    assert added == {
        "backbone": ["D2TimmViT", "D2ViT", "D2ViTHybrid", "ExpeditBackbone", "ExpeditD2SwinTransformer",
                     "ExpeditD2ViTDet", "TokenReductionBackbone", "build_bottom_up_fpn_backbone",
                     "build_bottom_up_retinanet_fpn_backbone"],
        "meta_arch": [], "sem_seg_head": [], "roi_heads": [], "proposal": [], "datasets": []}


# ---- in process: a Swin of neither layout --------------------------------------------------
class _Attention(nn.Module):  # an attention without a relative-position bias table
    def __init__(self):
        super().__init__()
        self.qkv, self.proj, self.num_heads, self.scale = nn.Linear(4, 12), nn.Linear(4, 4), 1, 0.5


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.window_size, self.shift_size = 4, 0
        self.norm1, self.norm2, self.mlp, self.drop_path = nn.LayerNorm(4), nn.LayerNorm(4), nn.Identity(), nn.Identity()
        self.attn = _Attention()


class _Stage(nn.Module):
    def __init__(self, with_window=True):
        super().__init__()
        self.blocks = nn.ModuleList([_Block(), _Block()])
        self.shift_size, self.downsample = 2, None
        if with_window:
            self.window_size = 4


class _Swin(nn.Module):
    def __init__(self, with_window=True):
        super().__init__()
        self.layers = nn.ModuleList([_Stage(with_window)])


@pytest.mark.parametrize("with_window, missing", [
    (True, r"swin: layers\[0\]\.blocks\[0\]\.attn \(_Attention\) has no 'relative_position_bias_table'"),
    (False, r"swin: layers\[0\] \(_Stage\) has no 'window_size'"),
])
def test_a_swin_of_neither_layout_is_refused_naming_what_it_lacks(with_window, missing):
    model = _Swin(with_window)
    with pytest.raises(ValueError, match=r"_Swin follows no token-reduction family protocol \(vit: no method "
                                         r"'embed_tokens'; " + missing):
        apply_patch(model, ExpeditSettings(clustering_location=0, num_clusters=(2, 2), recon_k=2))
    assert not any(hasattr(m, "token_reduction") for m in model.modules())  # nothing half-patched


def test_readme_drop_in_lines_are_the_tested_ones():
    """The README's three additions are lines of docs/drop-in.md's blocks, which
    test_the_documented_lines_expedite_the_users_project runs on the user's project."""
    import re

    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Expedite your own Detectron2 project", 1)[1].split("\n## ", 1)[0]
    doc = (ROOT / "docs" / "drop-in.md").read_text()
    tested = {line.strip() for block in re.findall(r"```(?:python|yaml)\n(.*?)```", doc, re.S)
              for line in block.splitlines()}
    lines = [line.strip() for block in re.findall(r"```(?:python|yaml)\n(.*?)```", section, re.S)
             for line in block.splitlines() if line.strip()]
    assert len(lines) >= 8 and [line for line in lines if line not in tested] == []
