#!/usr/bin/env python
"""Install detectron2 v0.6 (pure Python) into the running interpreter's environment.

Run by ``tools/install.sh`` with the virtual environment's Python.

* If ``import detectron2`` already works (for example a user who built it from
  source with its C++/CUDA ops), nothing is done.
* Otherwise the source release ``pb1-detectron2==0.6`` is fetched from the package
  index with pip (cached under ``$XDG_CACHE_HOME/expedit-d2``), its sha256 is
  checked, and it is built *without* the C++ extension:

  - its Python files are upstream detectron2 v0.6, but the sdist lacks
    ``detectron2/layers/csrc``, so its own ``setup.py`` cannot build;
  - v0.6 predates numpy 2, Pillow 10 and setuptools 81; :func:`patch_tree`
    applies a small compatibility patch (listed in ``PATCHES`` below);
  - a ``detectron2/_C.py`` placeholder makes ``import detectron2.layers`` work
    and turns a call of a C++-only op into a clear error naming the op;
  - ``detectron2.projects.{point_rend,deeplab,panoptic_deeplab}`` are installed
    the way upstream's setup.py maps them.

Usage: ``python tools/install/install_detectron2.py [--force] [--cache-dir DIR]``.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

SDIST_NAME = "pb1-detectron2"
SDIST_VERSION = "0.6"
SDIST_FILE = f"{SDIST_NAME}-{SDIST_VERSION}.tar.gz"
SDIST_SHA256 = "5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"

# Upstream setup.py installs these project folders as detectron2.projects.*.
PROJECTS = {
    "detectron2.projects.point_rend": "projects/PointRend/point_rend",
    "detectron2.projects.deeplab": "projects/DeepLab/deeplab",
    "detectron2.projects.panoptic_deeplab": "projects/Panoptic-DeepLab/panoptic_deeplab",
}


def log(msg: str) -> None:
    print(f"[expedit-d2 install] {msg}", file=sys.stderr, flush=True)


def detectron2_importable() -> bool:
    return importlib.util.find_spec("detectron2") is not None


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_sdist(cache_dir: Path) -> Path:
    """Return the verified sdist, downloading it with pip into ``cache_dir`` if needed."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / SDIST_FILE
    if target.exists() and sha256_of(target) == SDIST_SHA256:
        log(f"using cached {target}")
        return target
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        log(f"downloading {SDIST_NAME}=={SDIST_VERSION} (source release)")
        # --no-build-isolation: pip prepares the sdist's metadata by running its
        # setup.py, which imports torch; this environment has torch already.
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
             "--no-binary", ":all:", "--no-build-isolation",
             f"{SDIST_NAME}=={SDIST_VERSION}", "--dest", tmp],
            check=True,
        )
        got = Path(tmp) / SDIST_FILE
        if not got.exists():
            raise SystemExit(f"pip did not produce {SDIST_FILE} in {tmp}: {os.listdir(tmp)}")
        digest = sha256_of(got)
        if digest != SDIST_SHA256:
            raise SystemExit(
                f"sha256 mismatch for {SDIST_FILE}: got {digest}, expected {SDIST_SHA256}; "
                "refusing to install it"
            )
        os.replace(got, target)
    return target


# --------------------------------------------------------------------------------------
# Compatibility patch: (relative file, regex, replacement, expected number of matches).
# Every rule must match exactly as often as stated, so a different source tree fails
# loudly instead of being half-patched.
# --------------------------------------------------------------------------------------
_NP_ALIAS = r"\bnp\.(int|float|bool|str|object)\b"
PATCHES: list[tuple[str, str, str, int | None]] = [
    # numpy >= 1.24 removed the deprecated aliases np.int/np.float/np.bool/np.str/np.object.
    ("*", _NP_ALIAS, r"\1", None),
    # Pillow 10 removed Image.LINEAR (it was an alias of BILINEAR).
    ("detectron2/data/transforms/transform.py", r"\bImage\.LINEAR\b", "Image.BILINEAR", 1),
    # setuptools >= 81 no longer provides pkg_resources; use the package folder directly.
    ("detectron2/model_zoo/model_zoo.py", r"^import pkg_resources\n", "", 1),
    (
        "detectron2/model_zoo/model_zoo.py",
        r"pkg_resources\.resource_filename\(\s*\"detectron2\.model_zoo\",\s*"
        r"os\.path\.join\(\"configs\", config_path\)\s*\)",
        'os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", config_path)',
        1,
    ),
    # caffe2 is not part of PyTorch 2; export.api imports it at module level, which broke
    # `import detectron2.export` and therefore detectron2.utils.analysis (TracingAdapter).
    (
        "detectron2/export/__init__.py",
        r"^from \.api import \*\n",
        "try:\n"
        "    from .api import *  # caffe2 export; needs caffe2, absent from PyTorch 2\n"
        "except ImportError:\n"
        "    pass\n",
        1,
    ),
]

C_PLACEHOLDER = '''"""Placeholder for detectron2's compiled extension (written by expedit-d2's installer).

This detectron2 was built from the pb1-detectron2 0.6 source release, which ships
without the C++/CUDA sources (detectron2/layers/csrc), so the extension was not
compiled. Everything written in Python works; calling an op that exists only in the
extension raises a RuntimeError that names the op.
"""

_WHY = (
    "detectron2 was installed without its C++/CUDA extension (the pb1-detectron2 0.6 "
    "source release lacks detectron2/layers/csrc). Build detectron2 from source with "
    "its C++ ops to use it"
)

_OPS = {
    "deform_conv_forward": "deformable convolution (DeformConv)",
    "deform_conv_backward_input": "deformable convolution (DeformConv)",
    "deform_conv_backward_filter": "deformable convolution (DeformConv)",
    "modulated_deform_conv_forward": "modulated deformable convolution (ModulatedDeformConv)",
    "modulated_deform_conv_backward": "modulated deformable convolution (ModulatedDeformConv)",
    "box_iou_rotated": "rotated-box IoU (pairwise_iou_rotated)",
    "nms_rotated": "rotated-box NMS (nms_rotated)",
    "roi_align_rotated_forward": "rotated RoIAlign (ROIAlignRotated)",
    "roi_align_rotated_backward": "rotated RoIAlign (ROIAlignRotated)",
    "InstanceAnnotation": "the fast COCO evaluation (COCOeval_opt)",
    "ImageEvaluation": "the fast COCO evaluation (COCOeval_opt)",
    "COCOevalEvaluateImages": "the fast COCO evaluation (COCOeval_opt)",
    "COCOevalAccumulate": "the fast COCO evaluation (COCOeval_opt)",
}

_HINTS = {
    "the fast COCO evaluation (COCOeval_opt)": "; or pass use_fast_impl=False to COCOEvaluator",
}


def get_compiler_version():
    return "not built (pure-Python detectron2)"


def get_cuda_version():
    return "not built (pure-Python detectron2)"


def has_cuda():
    return False


def _unavailable(name):
    what = _OPS.get(name, "a C++ op")

    def op(*args, **kwargs):
        raise RuntimeError(
            f"detectron2._C.{name} ({what}) is unavailable: {_WHY}{_HINTS.get(what, '')}."
        )

    op.__name__ = name
    return op


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return _unavailable(name)
'''


def patch_tree(root: Path) -> list[str]:
    """Apply ``PATCHES`` to the extracted source tree; returns a log of what changed."""
    changes = []
    py_files = sorted(p for p in root.rglob("*.py") if "configs" not in p.parts)
    for rel, pattern, repl, expected in PATCHES:
        files = py_files if rel == "*" else [root / rel]
        total = 0
        for f in files:
            text = f.read_text()
            new, n = re.subn(pattern, repl, text, flags=re.MULTILINE)
            if n:
                f.write_text(new)
                changes.append(f"{f.relative_to(root)}: {n} x {pattern!r}")
                total += n
        if expected is not None and total != expected:
            raise SystemExit(
                f"compatibility patch {pattern!r} matched {total} times in {rel}, expected "
                f"{expected}: the source tree is not the detectron2 0.6 release we know"
            )
    (root / "detectron2" / "_C.py").write_text(C_PLACEHOLDER)
    changes.append("detectron2/_C.py: placeholder for the absent C++ extension")
    return changes


SETUP_PY = '''# Written by expedit-d2's installer: builds detectron2 0.6 without its C++ extension.
import glob
from setuptools import find_packages, setup

PROJECTS = {projects!r}
setup(
    name="detectron2",
    version="0.6",
    description="detectron2 0.6 (pure Python build by expedit-d2)",
    packages=find_packages(exclude=("configs", "tests*", "tools*", "projects*")) + list(PROJECTS),
    package_dir=PROJECTS,
    package_data={{"detectron2.model_zoo": [
        p[len("detectron2/model_zoo/"):] for p in
        glob.glob("detectron2/model_zoo/configs/**/*.yaml", recursive=True)
        + glob.glob("detectron2/model_zoo/configs/**/*.py", recursive=True)
    ]}},
    python_requires=">=3.7",
)
'''


def build_and_install(sdist: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(sdist) as tf:
            tf.extractall(tmp, filter="data")
        src = Path(tmp) / f"{SDIST_NAME}-{SDIST_VERSION}"
        for line in patch_tree(src):
            log(f"patched {line}")
        # Our own setup.py (the sdist's one compiles the extension and pins 2021 tools).
        (src / "setup.py").write_text(SETUP_PY.format(projects=PROJECTS))
        shutil.rmtree(src / f"{SDIST_NAME.replace('-', '_')}.egg-info", ignore_errors=True)
        (src / "setup.cfg").unlink(missing_ok=True)
        log("building and installing detectron2 0.6 (pure Python)")
        # Dependencies come from requirements.txt, so --no-deps; --no-build-isolation
        # uses this environment's setuptools (no download).
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
             "--no-build-isolation", str(src)],
            check=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true",
                        help="reinstall even if detectron2 already imports")
    default_cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "expedit-d2"
    parser.add_argument("--cache-dir", type=Path, default=default_cache)
    args = parser.parse_args()

    if detectron2_importable() and not args.force:
        import detectron2

        log(f"detectron2 {detectron2.__version__} already installed at "
            f"{os.path.dirname(detectron2.__file__)}; keeping it")
        return
    build_and_install(fetch_sdist(args.cache_dir))
    out = subprocess.run(
        [sys.executable, "-c", "import detectron2.layers, detectron2.utils.analysis, "
         "detectron2.evaluation; import detectron2; print(detectron2.__version__)"],
        check=True, capture_output=True, text=True, cwd="/",
    )
    log(f"detectron2 {out.stdout.strip()} installed")


if __name__ == "__main__":
    main()
