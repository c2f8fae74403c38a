"""tools/device/: what stage.sh carries covers what check.sh imports on a GPU machine's image."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGE, CHECK = ROOT / "tools/device/stage.sh", ROOT / "tools/device/check.sh"

#: top-level modules of the lent GPU machines' image that check.sh's code imports (from the image's
#: package list as the device tool documents it, read 2026-11-17; names as imported)
DEVICE_IMAGE = {"torch", "torchgen", "torchvision", "triton", "numpy", "scipy", "matplotlib", "cv2", "PIL", "yaml",
                "tabulate", "portalocker", "cloudpickle", "tqdm", "sympy", "mpmath", "typing_extensions", "pytest",
                "_pytest", "pluggy", "iniconfig", "pygments", "py", "packaging", "cuda", "filelock", "fsspec",
                "jinja2", "markupsafe", "networkx", "h5py", "timm", "safetensors", "huggingface_hub", "six",
                "dateutil", "pyparsing", "kiwisolver", "cycler", "fontTools", "contourpy", "nvidia"}

#: what check.sh runs: the benchmarks and the tests it selects
IMPORTS = """
import sys
sys.path[:0] = ["projects/DPT", "projects/Mask2Former", "."]
import tools.benchmark_model, tools.benchmark_backbone
import tests.conftest, tests.test_ops, tests.test_methods_ops, tests.test_accelerator_models
import detectron2.engine, detectron2.evaluation, pycocotools.mask
import sysconfig
site = {sysconfig.get_paths()[k] for k in ("purelib", "platlib")}
tops = set()
for m in list(sys.modules.values()):
    f = getattr(m, "__file__", None) or ""
    for s in site:
        if f.startswith(s + "/"):
            tops.add(f[len(s) + 1:].split("/")[0].split(".")[0])
print(" ".join(sorted(tops)))
"""


def staged_packages():
    match = re.search(r"^for pkg in ([\w ]+); do", STAGE.read_text(), re.M)
    assert match, "stage.sh's package loop"
    return set(match.group(1).split()) | {"pycocotools"}  # the wheel it unpacks


def test_staged_and_image_packages_cover_what_the_check_imports():
    out = subprocess.run([sys.executable, "-c", IMPORTS], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    imported = set(out.stdout.split()) - {"__editable___expedit_d2_0_1_0_finder", "_distutils_hack"}
    assert "detectron2" in imported and "torch" in imported  # the listing works
    missing = imported - staged_packages() - DEVICE_IMAGE
    assert not missing, f"imported on the GPU machine but neither staged by stage.sh nor in its image: {missing}"


def test_scripts_parse():
    for script in (STAGE, CHECK):
        out = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert out.returncode == 0, (script, out.stderr)
